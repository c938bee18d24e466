"""GPU worker entry point: the engine on CUDA, or on the CPU with a clear warning."""

from __future__ import annotations

from services import worker
from services.logs import get_logger
from services.settings import Settings

log = get_logger(__name__)


def choose_device(requested: str) -> str:
    """``cuda`` when a GPU is present; otherwise fall back to the CPU and say so."""
    import torch

    if requested.startswith("cuda") and torch.cuda.is_available():
        return requested
    if requested == "cpu":
        return "cpu"
    log.warning("cuda_unavailable_falling_back_to_cpu", requested=requested,
                hint="install a CUDA build of torch and expose a GPU to run on the GPU")
    return "cpu"


async def main(settings: Settings) -> None:
    device = settings.device if settings.device != "cpu" else "cuda"
    await worker.main(settings, pool="gpu", device=choose_device(device))
