"""A fake OpenAI-compatible HTTP API that speaks the real streaming wire format.

It runs in its own thread and event loop, so a session-scoped, synchronous
fixture can start it before the stack. What it answers depends on the last
user message:

- contains ``midstream-fail``: three tokens, then the connection is cut;
- contains ``slow-answer``: many tokens, 0.25 s apart (for disconnects);
- contains ``slow-start``: the short answer after ``SLOW_START_S`` of silence;
- otherwise: a short answer, 0.15 s between tokens; when the system prompt
  carries numbered passages, the answer cites ``[1]``.

Every request body is recorded, and a streaming request that the client
abandons is counted in ``disconnects``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from aiohttp import web

TOKEN_DELAY_S = 0.15
SLOW_START_S = 1.5


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self.completed = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(
                10
            )
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return False

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [0.0] * 1536}
            for i, _ in enumerate(texts)
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", ""),
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        messages = body.get("messages", [])
        last = next(
            (m["content"] for m in reversed(messages) if m["role"] == "user"), ""
        )
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        if "midstream-fail" in last:
            tokens, cut_after, delay = ["Partial", " answer", " so"], 3, TOKEN_DELAY_S
        elif "slow-answer" in last:
            tokens, cut_after, delay = [f" word{i}" for i in range(80)], None, 0.25
        elif "[1] (" in system:
            tokens, cut_after, delay = (
                ["The", " answer", " is", " here", " [1]", "."],
                None,
                TOKEN_DELAY_S,
            )
        else:
            tokens, cut_after, delay = (
                ["Hello", " from", " the", " fake", " model", "."],
                None,
                TOKEN_DELAY_S,
            )

        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        model = body.get("model", "gpt-4o-mini")

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(payload)}\n\n".encode()

        try:
            if "slow-start" in last:
                await asyncio.sleep(SLOW_START_S)
            await response.write(chunk({"role": "assistant", "content": ""}))
            for index, token in enumerate(tokens):
                await asyncio.sleep(delay)
                await response.write(chunk({"content": token}))
                if cut_after is not None and index + 1 == cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
            await response.write(chunk({}, "stop"))
            usage = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": {
                    "prompt_tokens": 42,
                    "completion_tokens": len(tokens),
                    "total_tokens": 42 + len(tokens),
                },
            }
            await response.write(f"data: {json.dumps(usage)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            self.completed += 1
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        return response
