"""Clients that drive the fault scenarios and log what they see into the checker.

``http_stream`` reads an SSE completion stream from the gateway (as an OpenAI client
would), ``AmqpTenant`` publishes straight to the broker as an AMQP producer. Both log
every chunk and terminal answer; neither retries, so what the checker sees is what a
client of the system saw.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Self

import httpx

from services import messages as m
from services.client import AmqpClient
from services.settings import DEFAULT_MODEL_NAME
from tests.faults.checker import Checker, RequestLog

MODEL = DEFAULT_MODEL_NAME
CLIENT_TIMEOUT_S = 90.0


DEFAULT_PROMPT = "Tell me a story about fault tolerance"


def say(text: str) -> None:
    """Print with the UTC time of day, as the services' logs stamp their events, so a
    failed run's output lines up with those logs."""
    print(f"{datetime.now(UTC).strftime('%H:%M:%S.%f')[:-3]} {text}")


def completion_body(prompt: str, max_tokens: int, **extra: object) -> dict:
    """A streamed completion; it asks for token ids (``return_token_ids``), which must come
    through the faults exactly once each, the prompt's once."""
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
            **extra}


def response_body(prompt: str, max_tokens: int, *, logprobs: bool = False, **extra: object) -> dict:
    """A streamed request of the Responses API (``/v1/responses``), which runs as a chat."""
    include = {"include": ["message.output_text.logprobs"], "top_logprobs": 2} if logprobs else {}
    return {"model": MODEL, "input": prompt, "max_output_tokens": max_tokens, "stream": True,
            "ignore_eos": True, **include, **extra}


def _completion_event(log: RequestLog, event: dict, finish: list[str]) -> list[str]:
    """The texts of a completion stream's event; its finish reason goes into ``finish``,
    its usage or error into the log."""
    if "error" in event:
        code = event["error"].get("code")
        log.final("error", code="timeout" if code == "timeout" else code)
        return []
    if event.get("usage") and not event.get("choices"):
        usage = event["usage"]
        log.final(finish[-1] if finish else "stop", usage["prompt_tokens"], usage["completion_tokens"])
        return []
    texts = []
    for choice in event.get("choices", []):
        if log.logprob_tokens is not None and choice.get("logprobs"):
            log.logprob_tokens += len(choice["logprobs"]["tokens"])
        if log.output_ids is not None:
            log.output_ids += len(choice.get("token_ids", []))
            log.prompt_ids += choice.get("prompt_token_ids") is not None
        if choice.get("text"):
            texts.append(choice["text"])
        if choice.get("finish_reason"):
            finish.append(choice["finish_reason"])
    return texts


def _response_event(log: RequestLog, event: dict) -> list[str]:
    """The texts of a Responses stream's event; its end (with usage) or failure into the log.
    Log-probabilities are counted once, from the text's done event, which holds all of them."""
    kind = event["type"]
    if kind == "response.output_text.delta":
        return [event["delta"]]
    if kind == "response.output_text.done" and log.logprob_tokens is not None:
        log.logprob_tokens += len(event["logprobs"])
    elif kind in ("response.completed", "response.incomplete"):
        usage = event["response"]["usage"]
        log.final("stop" if kind == "response.completed" else "length",
                  usage["input_tokens"], usage["output_tokens"])
    elif kind == "response.failed":
        log.final("error", code=event["response"]["error"]["code"])
    return []


async def http_stream(
    http: httpx.AsyncClient,
    checker: Checker,
    base_url: str,
    tenant: str,
    key: str,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 48,
    read_delay_s: float = 0.0,
    leave_after: int | None = None,
    on_token: Callable[[RequestLog], None] | None = None,
    body: dict | None = None,
) -> RequestLog:
    """One streamed completion. ``leave_after`` tokens: the client disconnects on purpose."""
    log = checker.new(tenant, "http")
    payload = body or completion_body(prompt, max_tokens)
    try:
        return await _http_stream(http, log, base_url, key, payload, read_delay_s, leave_after,
                                  on_token)
    finally:
        log.ended = time.monotonic()


async def _http_stream(http, log, base_url, key, payload, read_delay_s, leave_after, on_token):
    try:
        path = "/v1/responses" if "input" in payload else "/v1/completions"
        async with asyncio.timeout(CLIENT_TIMEOUT_S), http.stream(
            "POST", f"{base_url}{path}", json=payload,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            log.status = response.status_code
            log.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                error = json.loads(await response.aread())["error"]
                # 429 and 503 come before admission (nothing was queued); any other
                # answer is the terminal answer of an accepted request.
                if response.status_code in (429, 503) and error.get("code") != "broker_connection_lost":
                    assert response.headers.get("retry-after"), "429/503 without Retry-After"
                    log.refusal = error["message"]
                    return log
                log.accepted = True
                log.final("error", code="timeout" if response.status_code == 504 else error.get("code"),
                          status=response.status_code)
                return log
            log.accepted = True
            finish: list[str] = []
            index = 0
            if payload.get("logprobs") is not None or payload.get("include"):
                log.logprob_tokens = 0
            if payload.get("return_token_ids"):
                log.output_ids = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                texts = (_response_event(log, event) if "type" in event
                         else _completion_event(log, event, finish))
                for text in texts:
                    log.text += text
                    log.token(index, 1)
                    index += 1
                    if on_token is not None:
                        on_token(log)
                    if leave_after is not None and index >= leave_after:
                        log.abandoned = True
                        return log
                    if read_delay_s:
                        await asyncio.sleep(read_delay_s)
    except httpx.ConnectError:
        return log  # nothing listened: not accepted
    except (httpx.HTTPError, TimeoutError) as exc:
        # Sent, and the answer broke off or never came: the client got no answer.
        log.accepted = True
        log.request_id = log.request_id or f"unanswered-{log.local_id}"
        say(f"http client {log.local_id} got no answer: {exc!r}")
    return log


class AmqpTenant:
    """An AMQP producer (its own RabbitMQ user) that logs replies into the checker."""

    def __init__(self, checker: Checker, url: str, tenant: str) -> None:
        self.checker = checker
        self.tenant = tenant
        self.client = AmqpClient(url)
        self.sent: set[str] = set()

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        router = self.client.router
        dispatch = router.dispatch

        def watched(msg: m.TokenChunk | m.FinalAnswer) -> None:
            if msg.request_id not in self.sent:
                self.checker.stray(self.tenant, msg.request_id)
            dispatch(msg)

        router.dispatch = watched  # type: ignore[method-assign]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.__aexit__(*exc)

    async def ready(self, timeout: float = 60.0) -> None:
        """Until the connection (and its channel) is back after a broker restart."""
        await asyncio.wait_for(self.client.channel.ready(), timeout)

    async def run(self, prompt: str = "over the wire", max_tokens: int = 32,
                  request: m.CompletionRequest | None = None) -> RequestLog:
        log = self.checker.new(self.tenant, "amqp")
        request = request or self.client.completion(MODEL, prompt, max_tokens=max_tokens, ignore_eos=True)
        log.request_id = request.request_id
        self.sent.add(request.request_id)
        try:
            stream = await self.client.publish(request)
        except Exception as exc:  # noqa: BLE001 - not confirmed by the broker: not accepted
            say(f"amqp publish of {request.request_id} failed: {exc!r}")
            return log
        log.accepted, log.status = True, 200
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                async for reply in self.client.replies(stream):
                    if isinstance(reply, m.TokenChunk):
                        log.token(reply.token_offset, len(reply.token_ids))
                    else:
                        error = reply.error
                        log.final(reply.finish_reason, reply.prompt_tokens, reply.completion_tokens,
                                  code=error.code if error else None, status=error.status if error else None)
        except TimeoutError:
            say(f"amqp request {request.request_id} got no answer")
        finally:
            log.ended = time.monotonic()
        return log


class PatientClient:
    """A tenant's client of work the gateways keep (batches, background responses),
    which reads it again while the gateway is away, as such clients do."""

    def __init__(self, http: httpx.AsyncClient, checker: Checker, base_url: str, tenant: str,
                 key: str) -> None:
        self.http, self.checker, self.base_url, self.tenant = http, checker, base_url, tenant
        self.auth = {"Authorization": f"Bearer {key}"}

    async def _call(self, method: str, path: str, stop: asyncio.Event | None = None,
                    **kw) -> httpx.Response | None:
        """The answer once the gateway gives one that is not a 5xx (None if ``stop`` is
        set first)."""
        while stop is None or not stop.is_set():
            try:
                answer = await self.http.request(method, f"{self.base_url}{path}", headers=self.auth,
                                                 timeout=10, **kw)
                if answer.status_code < 500:
                    return answer
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        return None



class BatchJobs(PatientClient):
    """A tenant's batches through the Batch API: every request of a batch the gateway
    accepted is one log, owed exactly one line in the batch's output or error file once
    the batch ends. Creating a batch and reading it are retried while the gateway is
    away (that is what a batch client does); nothing else is."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches: dict[str, dict[str, RequestLog]] = {}
        """Batch id -> custom id -> the log of that request."""

    async def submit(self, lines: int, max_tokens: int, stop: asyncio.Event) -> None:
        rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                 "body": {"model": MODEL, "prompt": DEFAULT_PROMPT, "max_tokens": max_tokens,
                          "ignore_eos": True}} for i in range(lines)]
        data = "\n".join(json.dumps(row) for row in rows).encode()
        uploaded = await self._call("POST", "/v1/files", stop, data={"purpose": "batch"},
                                    files={"file": ("jobs.jsonl", data)})
        if uploaded is None:
            return
        assert uploaded.status_code == 200, uploaded.text
        # Not retried: a create whose answer a fault cut would be a second batch.
        try:
            created = await self.http.post(f"{self.base_url}/v1/batches", headers=self.auth, timeout=10, json={
                "input_file_id": uploaded.json()["id"], "endpoint": "/v1/completions",
                "completion_window": "24h"})
        except httpx.HTTPError:
            return
        if created.status_code != 200:
            return
        batch = created.json()
        assert batch["status"] == "in_progress", batch
        logs = {}
        for row in rows:
            log = self.checker.new(self.tenant, "batch")
            log.accepted, log.status = True, 200
            logs[row["custom_id"]] = log
        self.batches[batch["id"]] = logs
        say(f"batch {batch['id']} of {lines} requests created")

    async def settle(self, timeout: float) -> dict[str, str]:
        """Wait for every batch to end; log each request's lines; each batch's status."""
        deadline = time.monotonic() + timeout
        statuses = {}
        for batch_id, logs in self.batches.items():
            while True:
                answer = await self._call("GET", f"/v1/batches/{batch_id}")
                batch = answer.json()
                if batch["status"] not in ("in_progress", "finalizing", "cancelling") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            statuses[batch_id] = batch["status"]
            for field in ("output_file_id", "error_file_id"):
                if batch.get(field):
                    content = await self._call("GET", f"/v1/files/{batch[field]}/content")
                    for line in content.text.splitlines():
                        self._answered(logs, json.loads(line))
            for log in logs.values():
                log.ended = time.monotonic()
        return statuses

    @staticmethod
    def _answered(logs: dict[str, RequestLog], line: dict) -> None:
        log = logs[line["custom_id"]]
        response = line["response"]
        if response is None:  # never run (the batch expired)
            log.final("error", code=line["error"]["code"])
            return
        log.request_id = response["request_id"]
        body = response["body"]
        if response["status_code"] == 200:
            usage = body["usage"]
            log.final(body["choices"][0]["finish_reason"], usage["prompt_tokens"], usage["completion_tokens"])
        else:
            log.final("error", code=body["error"]["code"], status=response["status_code"])


class BackgroundResponses(PatientClient):
    """A tenant's background responses (Responses API, ``background`` true), polled or
    streamed: each one the gateway queued is one log, owed its one answer once it ended.
    A stream cut (a gateway killed) is read on from the last event seen with ``GET
    ?stream=true&starting_after``, as a client that keeps its place does; its events must
    come in order, each once (:attr:`problems` says where they did not). Creating is not
    retried (a create whose answer a fault cut would be a second response)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.responses: dict[str, RequestLog] = {}
        self.readers: list[asyncio.Task[None]] = []
        self.problems: list[str] = []
        self.resumed = 0
        """Streams read on after a cut."""
        self.runs: dict[str, int] = {}
        """Per response, how many runs of it (its requests) the workers completed or cut."""

    async def submit(self, max_tokens: int, stream: bool) -> None:
        body = {"model": MODEL, "input": DEFAULT_PROMPT, "max_output_tokens": max_tokens, "ignore_eos": True,
                "background": True, "stream": stream}
        log = self.checker.new(self.tenant, "background")
        try:
            if not stream:
                created = await self.http.post(f"{self.base_url}/v1/responses", headers=self.auth, timeout=10,
                                               json=body)
                log.status = created.status_code
                if created.status_code == 200:
                    self._queued(log, created.json()["id"])
                return
            request = self.http.build_request("POST", f"{self.base_url}/v1/responses", headers=self.auth,
                                              json=body, timeout=CLIENT_TIMEOUT_S)
            answer = await self.http.send(request, stream=True)
        except httpx.HTTPError:
            return
        log.status = answer.status_code
        if answer.status_code != 200:
            await answer.aclose()
            return
        self.readers.append(asyncio.create_task(self._read(log, answer)))

    def _queued(self, log: RequestLog, response_id: str) -> None:
        log.accepted, log.request_id = True, response_id
        self.responses[response_id] = log
        say(f"background response {response_id} queued")

    async def _read(self, log: RequestLog, answer: httpx.Response) -> None:
        """Read a streamed one's events to its last, on from where a cut left it."""
        seen = -1
        while True:
            try:
                async for line in answer.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line.removeprefix("data: "))
                    if event["sequence_number"] <= seen:
                        self.problems.append(f"{log.request_id}: event {event['sequence_number']} after {seen}")
                    seen = event["sequence_number"]
                    if event["type"] == "response.created":
                        self._queued(log, event["response"]["id"])
                    if event["type"] in ("response.completed", "response.incomplete", "response.failed"):
                        return
            except httpx.HTTPError:
                pass
            finally:
                await answer.aclose()
            if log.request_id is None:
                return  # cut before it said its id: nothing to read on from
            self.resumed += 1
            while True:  # the gateway is away: try again until it answers
                try:
                    request = self.http.build_request(
                        "GET", f"{self.base_url}/v1/responses/{log.request_id}", headers=self.auth,
                        params={"stream": "true", "starting_after": seen}, timeout=CLIENT_TIMEOUT_S)
                    answer = await self.http.send(request, stream=True)
                    if answer.status_code == 200:
                        break
                    await answer.aclose()
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)

    async def settle(self, timeout: float) -> dict[str, str]:
        """Wait for every response to end; log each one's answer with the request id of
        the run that made it; each one's status."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self.readers)
            statuses = {}
            for response_id, log in self.responses.items():
                while True:
                    response = (await self._call("GET", f"/v1/responses/{response_id}")).json()
                    if response["status"] not in ("queued", "in_progress"):
                        break
                    await asyncio.sleep(0.5)
                statuses[response_id] = response["status"]
                log.ended = time.monotonic()
                if response["status"] == "failed":
                    log.final("error", code=response["error"]["code"])
                elif response["status"] != "cancelled":
                    usage = response["usage"]
                    log.final("length" if response["status"] == "incomplete" else "stop", usage["input_tokens"],
                              usage["output_tokens"])
            await self.checker.quiesce()
        for response_id, log in self.responses.items():
            # Each run of it has a request id of its own (itself, then itself-...): the
            # answer is the one whose completion is the answer's.
            runs = {rid: event for rid, event in self.checker.finished.items()
                    if rid == response_id or rid.startswith(f"{response_id}-")}
            self.runs[response_id] = len(runs)
            done = log.done
            answered = [rid for rid, event in runs.items() if done is not None
                        and (event.prompt_tokens, event.output_tokens) == (done.prompt_tokens, done.completion_tokens)]
            if answered:
                log.request_id = answered[-1]
        return statuses
