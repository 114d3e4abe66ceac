"""Fake OpenAI and Anthropic HTTP APIs that speak the real wire formats.

Each fake is an aiohttp server on a free port. A test scripts what the next
requests for a model get (a stream of tokens, an HTTP error, a hang, a cut
connection, a malformed chunk) and afterwards reads what the fake received
and whether the client hung up on it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class Behaviour:
    kind: str
    """ok, status, hang, cut, malformed or slow."""
    tokens: tuple[str, ...] = ()
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    after: int = 0
    """cut/malformed: how many tokens go out first."""
    interval: float = 0.0


def ok(*tokens: str) -> Behaviour:
    return Behaviour("ok", tokens=tokens or ("Hello", " there", "!"))


def status(code: int, retry_after: str | None = None) -> Behaviour:
    headers = (("Retry-After", retry_after),) if retry_after is not None else ()
    return Behaviour("status", status=code, headers=headers)


def hang() -> Behaviour:
    """Sends the headers (and, for OpenAI, the role chunk), then nothing."""
    return Behaviour("hang")


def cut(after: int = 3) -> Behaviour:
    """Sends ``after`` tokens, then drops the connection mid-body."""
    return Behaviour("cut", tokens=tuple(f"t{i} " for i in range(after)), after=after)


def malformed(after: int = 0) -> Behaviour:
    """Sends ``after`` tokens, then a chunk that is not JSON."""
    return Behaviour(
        "malformed", tokens=tuple(f"t{i} " for i in range(after)), after=after
    )


def slow(count: int = 200, interval: float = 0.02) -> Behaviour:
    return Behaviour(
        "slow", tokens=tuple(f"w{i} " for i in range(count)), interval=interval
    )


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float


@dataclass
class Fake:
    """One fake provider API; ``wire`` is "openai" or "anthropic"."""

    wire: str
    requests: list[Received] = field(default_factory=list)
    disconnects: int = 0
    sent_before_disconnect: list[int] = field(default_factory=list)
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    embed_statuses: list[Behaviour] = field(default_factory=list)
    """Behaviours for the next /v1/embeddings calls, in order (then 200s)."""
    _scripts: dict[str, list[Behaviour]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    port: int = 0

    def behave(self, model: str, *behaviours: Behaviour) -> None:
        """The next requests for ``model`` get these, in order; the last sticks."""
        self._scripts[model] = list(behaviours)

    def calls(self, model: str | None = None) -> list[Received]:
        return [
            r for r in self.requests if model is None or r.body.get("model") == model
        ]

    @property
    def base_url(self) -> str:
        suffix = "/v1" if self.wire == "openai" else ""
        return f"http://127.0.0.1:{self.port}{suffix}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/messages", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        # Cancelling the handler when the client goes away is how the fake
        # notices a closed connection.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _next(self, model: str) -> Behaviour:
        script = self._scripts.get(model)
        if not script:
            return ok("Hello", " from", f" {model}")
        return script.pop(0) if len(script) > 1 else script[0]

    async def _record(self, request: web.Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append(
            Received(
                request.path,
                body,
                {k.lower(): v for k, v in request.headers.items()},
                time.monotonic(),
            )
        )
        return dict(body)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._record(request)
        behaviour = self._next(str(body.get("model")))
        if behaviour.kind == "status":
            return web.json_response(
                _error_body(self.wire, behaviour.status),
                status=behaviour.status,
                headers=dict(behaviour.headers),
            )
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        frames = (
            _OpenAIFrames(body) if self.wire == "openai" else _AnthropicFrames(body)
        )
        sent = 0
        try:
            for frame in frames.opening():
                await response.write(frame)
            if behaviour.kind == "hang":
                await asyncio.sleep(3600)
            for token in behaviour.tokens:
                await response.write(frames.token(token))
                sent += 1
                if behaviour.interval:
                    await asyncio.sleep(behaviour.interval)
            if behaviour.kind == "cut":
                assert request.transport is not None
                request.transport.close()
                return response
            if behaviour.kind == "malformed":
                await response.write(frames.malformed())
                return response
            for frame in frames.closing(len(behaviour.tokens)):
                await response.write(frame)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            self.sent_before_disconnect.append(sent)
            self.disconnected.set()
            raise
        return response

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if self.embed_statuses:
            behaviour = self.embed_statuses.pop(0)
            return web.json_response(
                _error_body("openai", behaviour.status),
                status=behaviour.status,
                headers=dict(behaviour.headers),
            )
        texts = body["input"]
        return web.json_response(
            {
                "object": "list",
                "model": body["model"],
                # Shuffled on purpose: clients must order by index.
                "data": [
                    {"object": "embedding", "index": i, "embedding": _vector(text)}
                    for i, text in reversed(list(enumerate(texts)))
                ],
                "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)},
            }
        )


def _vector(text: str) -> list[float]:
    """1536 numbers that identify ``text`` (its length first)."""
    return [float(len(text))] + [0.001 * (ord(text[0]) % 7)] * 1535


def _error_body(wire: str, code: int) -> dict[str, Any]:
    if wire == "anthropic":
        kind = {429: "rate_limit_error", 401: "authentication_error"}.get(
            code, "api_error"
        )
        return {"type": "error", "error": {"type": kind, "message": f"fake {code}"}}
    return {"error": {"message": f"fake {code}", "type": "server_error", "code": None}}


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class _OpenAIFrames:
    def __init__(self, body: dict[str, Any]) -> None:
        self._model = body["model"]

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": self._model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    def opening(self) -> list[bytes]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def token(self, text: str) -> bytes:
        return self._chunk({"content": text})

    def malformed(self) -> bytes:
        return b'data: {"choices": [{"delta": {"content": \n\n'

    def closing(self, count: int) -> list[bytes]:
        usage = {
            "prompt_tokens": 5,
            "completion_tokens": count,
            "total_tokens": 5 + count,
        }
        return [
            self._chunk({}, "stop"),
            _sse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": self._model,
                    "choices": [],
                    "usage": usage,
                }
            ),
            b"data: [DONE]\n\n",
        ]


class _AnthropicFrames:
    def __init__(self, body: dict[str, Any]) -> None:
        self._model = body["model"]

    def opening(self) -> list[bytes]:
        return [
            _sse(
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_fake",
                        "type": "message",
                        "role": "assistant",
                        "content": [],
                        "model": self._model,
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 7, "output_tokens": 1},
                    },
                },
                "message_start",
            ),
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            ),
            _sse({"type": "ping"}, "ping"),
        ]

    def token(self, text: str) -> bytes:
        return _sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            },
            "content_block_delta",
        )

    def malformed(self) -> bytes:
        return b'event: content_block_delta\ndata: {"type": "content_bl\n\n'

    def closing(self, count: int) -> list[bytes]:
        return [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": count},
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ]


_HELD: list[socket.socket] = []


def free_port() -> int:
    """A port free right now, for a server that is about to listen on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def closed_port() -> int:
    """A port nothing listens on, for "connection refused".

    The socket stays bound (never listening) until the tests end, so that no
    server takes the port and no client connects to itself through it.
    """
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    _HELD.append(holder)
    return int(holder.getsockname()[1])


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], within: float = 10.0
) -> None:
    """Polls until ``condition`` holds; fails the test after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
