"""The real benchmark loop against a small local OpenAI-style SSE server with known delays."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from services.benchmark import serve

TTFT_S = 0.05
ITL_S = 0.01


class StreamingServer:
    """HTTP/1.1 keep-alive server speaking just enough of the OpenAI completions API.

    Keys: ``key-a`` and ``key-b`` are served normally; ``key-err`` gets two tokens and
    then a stream error event; any other key gets 401. Tokens are one per chunk, the
    first after ``TTFT_S`` and the others ``ITL_S`` apart; ``prompt_tokens`` counts words.
    """

    def __init__(self, itl_s: float = ITL_S) -> None:
        self.itl_s = itl_s
        self.bodies: list[dict] = []
        self.keys: list[str] = []
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.handlers: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()  # idle keep-alive handlers see EOF and return
        await asyncio.wait_for(asyncio.gather(*self.handlers, return_exceptions=True), 5)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.handlers.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {
                    k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                key = headers.get("authorization", "").removeprefix("Bearer ")
                if method == "GET" and path == "/v1/models":
                    await self._json(writer, 200, {"object": "list", "data": [{"id": "tiny-test"}]})
                elif method == "POST" and path == "/v1/completions":
                    if key not in ("key-a", "key-b", "key-err"):
                        await self._json(writer, 401, {"error": {"message": "Invalid API key."}})
                        continue
                    request = json.loads(body)
                    self.bodies.append(request)
                    self.keys.append(key)
                    await self._stream(writer, request, fail_after=2 if key == "key-err" else None)
                else:
                    await self._json(writer, 404, {"error": {"message": "not found"}})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _json(self, writer, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _stream(self, writer, request: dict, fail_after: int | None) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )

        async def event(obj: dict | str) -> None:
            payload = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            await writer.drain()

        def chunk(text: str, finish: str | None = None) -> dict:
            return {
                "object": "text_completion",
                "usage": None,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            }

        n = request["max_tokens"]
        await asyncio.sleep(TTFT_S)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            if fail_after is not None and i == fail_after:
                await event({"error": {"message": "worker died", "type": "internal_error"}})
                break
            await event(chunk(f" t{i}"))
        else:
            await event(chunk("", "length"))
            prompt_tokens = len(request["prompt"].split())
            await event(
                {
                    "object": "text_completion",
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": n,
                        "total_tokens": prompt_tokens + n,
                    },
                }
            )
        await event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


@pytest.fixture
async def server():
    srv = StreamingServer()
    url = await srv.start()
    yield srv, url
    await srv.stop()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(argv)


def write_trace(path: Path, rows: list[tuple[float, int, int, str]]) -> Path:
    path.write_text(
        "".join(
            json.dumps({"timestamp": t, "input_tokens": i, "output_tokens": o, "tenant": who})
            + "\n"
            for t, i, o, who in rows
        ),
        encoding="utf-8",
    )
    return path


async def test_benchmark_against_a_streaming_server(server, tmp_path):
    srv, url = server
    tenants = ["acme", "globex"] * 6 + ["mallory", "erin"]
    trace = write_trace(
        tmp_path / "trace.jsonl", [(0.03 * k, 8 + k, 5, who) for k, who in enumerate(tenants)]
    )
    out = tmp_path / "out" / "result.json"
    args = parse(
        [
            "--url",
            url,
            "--trace",
            str(trace),
            "--tenants",
            "acme:key-a,globex:key-b,mallory:bad-key,erin:key-err",
            "--slo",
            "ttft_ms=5000,tpot_ms=5000",
            "--json",
            str(out),
            "--disable-tqdm",
            "--save-detailed",
            "--max-output-tokens",
            "4",
        ]
    )
    assert await serve.run_async(args) == 0
    report = json.loads(out.read_text())

    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99", "std"):
            assert f"{stat}_{name}_ms" in report
    for key in (
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "request_goodput",
        "completed",
        "failed",
        "duration",
        "total_input_tokens",
        "total_output_tokens",
        "per_tenant",
        "max_service_difference",
    ):
        assert key in report
    assert report["model_id"] == "tiny-test"
    assert report["completed"] == 12 and report["failed"] == 2 and report["not_sent"] == 0
    assert report["total_output_tokens"] == 12 * 4
    assert report["total_input_tokens"] == sum(
        8 + k for k, who in enumerate(tenants) if who in ("acme", "globex")
    )
    assert report["request_goodput"] == pytest.approx(report["request_throughput"])
    assert 0.03 * 13 < report["duration"] < 5.0

    # Delays the server was told to keep (upper bounds are loose for slow CI machines).
    assert TTFT_S <= report["median_ttft_ms"] / 1000 < TTFT_S + 0.5
    assert ITL_S * 0.8 <= report["median_itl_ms"] / 1000 < ITL_S + 0.2
    assert ITL_S * 0.8 <= report["median_tpot_ms"] / 1000 < ITL_S + 0.2
    assert report["median_e2el_ms"] / 1000 >= TTFT_S + 3 * ITL_S * 0.8

    per = report["per_tenant"]
    assert per["acme"]["completed"] == per["globex"]["completed"] == 6
    assert per["mallory"]["failed"] == 1 and per["mallory"]["service"] == 0
    assert per["erin"]["failed"] == 1 and per["erin"]["service"] > 0  # two tokens before the error
    assert per["acme"]["service"] == pytest.approx(
        sum(8 + k + 2 * 4 for k, w in enumerate(tenants) if w == "acme")
    )
    assert report["max_service_difference"] > 0
    assert any(e.startswith("HTTP 401: Invalid API key") for e in report["error_counts"])
    assert any(e.startswith("stream error: worker died") for e in report["error_counts"])
    assert len(report["itls"]) == 14 and len(report["itls"][0]) == 3

    # What the server received: the vLLM benchmark's request shape.
    assert len(srv.bodies) == 13
    for body in srv.bodies:
        assert body["stream"] is True and body["ignore_eos"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] == 4 and body["model"] == "tiny-test"
    assert srv.keys.count("key-a") == 6 and srv.keys.count("key-b") == 6


async def test_run_is_bounded_in_time(tmp_path):
    srv = StreamingServer(itl_s=0.2)  # 4 tokens take ~0.65 s
    url = await srv.start()
    try:
        trace = write_trace(
            tmp_path / "t.jsonl",
            [(0.0, 4, 4, "a"), (0.1, 4, 4, "a"), (0.6, 4, 4, "a"), (1.0, 4, 4, "a")],
        )
        out = tmp_path / "r.json"
        args = parse(
            [
                "--url",
                url,
                "--api-key",
                "key-a",
                "--trace",
                str(trace),
                "--model",
                "m",
                "--max-duration",
                "0.4",
                "--json",
                str(out),
                "--disable-tqdm",
            ]
        )
        assert await serve.run_async(args) == 1  # nothing completed
        report = json.loads(out.read_text())
        assert report["completed"] == 0 and report["failed"] == 2 and report["not_sent"] == 2
        assert report["error_counts"] == {"run time limit reached": 2}
        assert report["duration"] < 1.0

        args = parse(
            [
                "--url",
                url,
                "--api-key",
                "key-a",
                "--trace",
                str(trace),
                "--model",
                "m",
                "--num-requests",
                "1",
                "--request-timeout",
                "0.1",
                "--json",
                str(out),
                "--disable-tqdm",
            ]
        )
        assert await serve.run_async(args) == 1
        report = json.loads(out.read_text())
        assert report["error_counts"] == {"request timed out after 0.1 s": 1}
    finally:
        await srv.stop()


async def test_unreachable_server_is_recorded_not_raised(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 4, 2, "a"), (0.01, 4, 2, "a")])
    out = tmp_path / "r.json"
    args = parse(
        [
            "--url",
            "http://127.0.0.1:9",
            "--api-key",
            "k",
            "--trace",
            str(trace),
            "--model",
            "m",
            "--json",
            str(out),
            "--disable-tqdm",
        ]
    )
    assert await serve.run_async(args) == 1
    report = json.loads(out.read_text())
    assert report["failed"] == 2 and all(
        e.startswith("ConnectError") for e in report["error_counts"]
    )


async def test_bad_arguments_exit_2(tmp_path, capsys):
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 4, 2, "a")])
    args = parse(
        ["--url", "http://127.0.0.1:9", "--trace", str(trace), "--json", str(tmp_path / "r.json")]
    )
    assert await serve.run_async(args) == 2  # neither --api-key nor --tenants
    args = parse(
        [
            "--url",
            "http://127.0.0.1:9",
            "--api-key",
            "k",
            "--trace",
            str(trace),
            "--burstiness",
            "0.5",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert await serve.run_async(args) == 2
    assert "burstiness" in capsys.readouterr().err


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    from services.benchmark.metrics import RequestRecord
    from services.benchmark.plots import write_plots

    records = [
        RequestRecord(
            index=i,
            tenant="ab"[i % 2],
            scheduled_time=0.1 * i,
            send_time=0.1 * i,
            chunk_times=[0.1 * i + 0.05, 0.1 * i + 0.07],
            end_time=0.1 * i + 0.08,
            input_tokens=5,
            output_tokens=2,
            success=True,
        )
        for i in range(10)
    ]
    paths = write_plots(records, tmp_path / "plots")
    assert [p.name for p in paths] == ["latency_cdf.png", "tenant_service.png"]
    assert all(
        p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in paths
    )


async def test_per_tenant_rates_generate_their_own_arrivals(server, tmp_path):
    srv, url = server
    trace = write_trace(tmp_path / "t.jsonl", [(0.0, 4, 2, "x")] * 3)
    out = tmp_path / "r.json"
    args = parse([
        "--url", url, "--trace", str(trace), "--num-requests", "3",
        "--tenants", "acme:key-a:rate=40,globex:key-b:rate=20",
        "--json", str(out), "--disable-tqdm",
    ])  # fmt: skip
    assert await serve.run_async(args) == 0
    report = json.loads(out.read_text())
    assert report["arrivals"] == "gamma"
    assert report["per_tenant"]["acme"]["completed"] == 2
    assert report["per_tenant"]["globex"]["completed"] == 1
    assert srv.keys.count("key-a") == 2 and srv.keys.count("key-b") == 1
