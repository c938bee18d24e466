"""Trace readers: Azure LLM trace CSV and Fairway JSONL."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

from services.scheduler.traces import (
    TraceError,
    TraceRecord,
    load_trace,
    parse_azure_timestamp,
    write_jsonl,
)

AZURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure_llm_2023_conv_trace.csv"


def test_azure_timestamp_keeps_all_seven_fractional_digits() -> None:
    a = parse_azure_timestamp("2023-11-16 18:15:46.6805900")
    b = parse_azure_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-6)
    assert parse_azure_timestamp("2023-11-16 18:15:46") == pytest.approx(a - 0.68059, abs=1e-6)


def test_azure_csv_is_read_relative_to_the_first_arrival(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:16:00.0000000,10,1\n"
    )
    records = load_trace(path)
    assert [(round(r.timestamp, 6), r.input_tokens, r.output_tokens) for r in records] == [
        (0.0, 374, 44),
        (4.314579, 396, 109),
        (13.31941, 10, 1),
    ]
    assert all(r.tenant is None and r.prompt is None for r in records)
    assert len(load_trace(path, limit=2)) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a,b,c\n1,2,3\n", "expected header"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,x,3\n", ":2:"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,3\n", ":2:"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,5,0\n", "GeneratedTokens"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
    ],
)
def test_bad_azure_csv_says_where_and_why(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(body)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_jsonl_with_optional_fields_sorted_and_relative(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {
            "timestamp": 105.5,
            "input_tokens": 7,
            "output_tokens": 3,
            "tenant": "b",
            "prompt": "hi",
            "deadline_s": 2,
            "priority": -1,
        },
        {"timestamp": 100.0, "input_tokens": 5, "output_tokens": 9, "model": "m", "max_tokens": 64},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    first, second = load_trace(path)
    assert first == TraceRecord(0.0, 5, 9, model="m", max_tokens=64)
    assert second == TraceRecord(5.5, 7, 3, tenant="b", prompt="hi", deadline_s=2.0, priority=-1)


def test_gzipped_jsonl_round_trips_through_write_jsonl(tmp_path: Path) -> None:
    records = [TraceRecord(0.0, 5, 9, tenant="a"), TraceRecord(1.25, 6, 2, prompt="why?", priority=2)]
    plain = tmp_path / "t.jsonl"
    write_jsonl(records, plain)
    packed = tmp_path / "t.jsonl.gz"
    with gzip.open(packed, "wb") as handle:
        handle.write(plain.read_bytes())
    assert load_trace(packed) == records


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"input_tokens": 1, "output_tokens": 1}', "missing timestamp"),
        ('{"timestamp": "soon", "input_tokens": 1, "output_tokens": 1}', "timestamp"),
        ('{"timestamp": 1, "input_tokens": 1.5, "output_tokens": 1}', "input_tokens"),
        ('{"timestamp": 1, "input_tokens": 1, "output_tokens": -2}', "output_tokens"),
        ('{"timestamp": 1, "input_tokens": 1, "output_tokens": 2, "tenant": 3}', "tenant"),
        ('{"timestamp": 1, "input_tokens": 1, "output_tokens": 2, "priority": 0.5}', "priority"),
        ("[1, 2]", "JSON object"),
        ("{oops", "invalid JSON"),
    ],
)
def test_bad_jsonl_says_which_line_and_why(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_tokens": 1, "output_tokens": 1}\n' + line + "\n")
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert ":2:" in str(info.value)


def test_unknown_extension_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    path.write_text("x")
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(path)


@pytest.mark.skipif(not AZURE.exists(), reason="shared data not present")
def test_the_real_azure_conversation_trace() -> None:
    records = load_trace(AZURE)
    assert len(records) == 19_366
    assert records[-1].timestamp == pytest.approx(3501.72, abs=0.01)
    assert max(r.output_tokens for r in records) == 1000
    assert all(a.timestamp <= b.timestamp for a, b in itertools.pairwise(records))
