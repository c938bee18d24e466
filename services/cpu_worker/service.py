"""CPU worker entry point: the engine on the CPU, consuming the ``cpu`` pool's queue."""

from __future__ import annotations

from services import worker
from services.settings import Settings


async def main(settings: Settings) -> None:
    await worker.main(settings, pool="cpu", device="cpu")
