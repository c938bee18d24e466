"""Request traces for the simulator: the Azure LLM trace CSV and Fairway's JSONL.

Azure CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``, wall-clock timestamps with up
to 7 fractional digits). JSONL: one object per line with ``timestamp`` (seconds),
``input_tokens``, ``output_tokens`` and optionally ``tenant``, ``prompt``, ``model``,
``max_tokens``, ``deadline_s`` (seconds after arrival) and ``priority`` (an integer,
lower first, as the API's). Either may be gzipped.
Timestamps come back relative to the first arrival, sorted.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


class TraceError(ValueError):
    """A trace file that cannot be read; the message says which line and why."""


@dataclass(slots=True)
class TraceRecord:
    timestamp: float
    """Seconds since the first arrival of the trace."""
    input_tokens: int
    output_tokens: int
    tenant: str | None = None
    prompt: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    deadline_s: float | None = None
    """Deadline relative to arrival, in seconds."""
    priority: int | None = None
    """The request's ``priority`` (lower first); None: the default, 0."""


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8", newline="")


def parse_azure_timestamp(text: str) -> float:
    """``2023-11-16 18:15:46.6805900`` -> unix seconds (UTC), keeping all fractional digits."""
    whole, _, frac = text.strip().partition(".")
    base = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds in {text!r}")
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def _positive_int(value: object, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name} must be an integer")  # noqa: TRY004 - reported as a bad trace line
    number = int(float(value)) if isinstance(value, str) else value
    if number != int(number):
        raise ValueError(f"{name} must be an integer")
    number = int(number)
    if number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}")
    return number


def read_azure_csv(path: str | Path) -> list[TraceRecord]:
    path = Path(path)
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:3]) != AZURE_COLUMNS:
            raise TraceError(f"{path}: expected header {','.join(AZURE_COLUMNS)}, got {header}")
        rows: list[tuple[float, int, int]] = []
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                rows.append(
                    (
                        parse_azure_timestamp(row[0]),
                        _positive_int(row[1], "ContextTokens"),
                        _positive_int(row[2], "GeneratedTokens"),
                    )
                )
            except (ValueError, IndexError) as exc:
                raise TraceError(f"{path}:{line}: {exc}") from exc
    return _relative([TraceRecord(t, i, o) for t, i, o in rows])


def iter_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL(.gz) file of objects."""
    path = Path(path)
    with _open_text(path) as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{line}: invalid JSON: {exc}") from exc
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{line}: expected a JSON object")
            yield line, obj


def read_jsonl(path: str | Path) -> list[TraceRecord]:
    path = Path(path)
    records = []
    for line, obj in iter_jsonl_objects(path):
        try:
            if "timestamp" not in obj:
                raise ValueError("missing timestamp")
            timestamp = obj["timestamp"]
            if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
                raise ValueError("timestamp must be a number of seconds")  # noqa: TRY004
            tenant, prompt, model = obj.get("tenant"), obj.get("prompt"), obj.get("model")
            for name, value in (("tenant", tenant), ("prompt", prompt), ("model", model)):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{name} must be a string")
            max_tokens = obj.get("max_tokens")
            deadline = obj.get("deadline_s")
            if deadline is not None and (
                isinstance(deadline, bool) or not isinstance(deadline, int | float)
            ):
                raise ValueError("deadline_s must be a number")
            priority = obj.get("priority")
            if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
                raise ValueError("priority must be an integer")
            records.append(
                TraceRecord(
                    timestamp=float(timestamp),
                    input_tokens=_positive_int(obj.get("input_tokens"), "input_tokens"),
                    output_tokens=_positive_int(obj.get("output_tokens"), "output_tokens"),
                    tenant=tenant or None,
                    prompt=prompt,
                    model=model,
                    max_tokens=None
                    if max_tokens is None
                    else _positive_int(max_tokens, "max_tokens"),
                    deadline_s=None if deadline is None else float(deadline),
                    priority=priority,
                )
            )
        except ValueError as exc:
            raise TraceError(f"{path}:{line}: {exc}") from exc
    return _relative(records)


def _relative(records: list[TraceRecord]) -> list[TraceRecord]:
    records.sort(key=lambda r: r.timestamp)
    if records:
        start = records[0].timestamp
        for record in records:
            record.timestamp -= start
    return records


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """Read a trace by its extension (``.csv`` or ``.jsonl``, optionally ``.gz``);
    ``limit`` keeps the first N arrivals."""
    path = Path(path)
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".csv":
        records = read_azure_csv(path)
    elif kind in (".jsonl", ".json", ".ndjson"):
        records = read_jsonl(path)
    else:
        raise TraceError(f"{path}: unknown trace format (expected .csv or .jsonl)")
    if not records:
        raise TraceError(f"{path}: no requests")
    return records[:limit] if limit is not None else records


def write_jsonl(records: list[TraceRecord], path: str | Path) -> None:
    """Write records in the JSONL format (optional fields only when set)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for r in records:
            obj: dict[str, object] = {
                "timestamp": r.timestamp,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
            }
            for name in ("tenant", "prompt", "model", "max_tokens", "deadline_s", "priority"):
                value = getattr(r, name)
                if value is not None:
                    obj[name] = value
            handle.write(json.dumps(obj) + "\n")
