"""Chat through the ``anthropic`` SDK, translating the system prompt and roles."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence

import anthropic
import httpx2
from anthropic.types import MessageParam

from services.gateway.config import Endpoint
from services.gateway.provider import (
    Chunk,
    ErrorKind,
    Finish,
    Message,
    Options,
    ProviderError,
    TextDelta,
    connection_error,
    retry_after,
    status_error,
)

logger = logging.getLogger(__name__)

_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


def client(
    endpoint: Endpoint, *, connect_s: float, idle_s: float
) -> anthropic.AsyncAnthropic:
    """A client that never retries on its own: the router decides what is next."""
    return anthropic.AsyncAnthropic(
        api_key=endpoint.api_key,
        base_url=endpoint.base_url,
        max_retries=0,
        timeout=anthropic.Timeout(idle_s, connect=connect_s),
    )


def translate(exc: anthropic.APIError | httpx2.TransportError) -> ProviderError:
    """An SDK or transport error as the gateway's :class:`ProviderError`."""
    if isinstance(exc, anthropic.APIStatusError):
        # Error events inside a stream arrive with the stream's 200.
        return status_error(exc.status_code, retry_after(exc.response.headers))
    if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
        return ProviderError(ErrorKind.TIMEOUT, "timed out")
    if isinstance(exc, anthropic.APIConnectionError):
        return connection_error(exc.__cause__)
    if isinstance(exc, httpx2.TransportError):
        return connection_error(exc)
    return ProviderError(ErrorKind.SERVER, "error in stream")


def split_system(messages: Sequence[Message]) -> tuple[str, list[MessageParam]]:
    """Anthropic's shape: one system prompt, then user and assistant turns.

    System messages, wherever they are, join the system prompt; consecutive
    turns of one role merge, since the API wants the roles to alternate.
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    turns: list[tuple[str, list[str]]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        if turns and turns[-1][0] == role:
            turns[-1][1].append(message.content)
        else:
            turns.append((role, [message.content]))
    params: list[MessageParam] = []
    for role, parts in turns:
        text = "\n\n".join(parts)
        if role == "assistant":
            params.append({"role": "assistant", "content": text})
        else:
            params.append({"role": "user", "content": text})
    return system, params


class AnthropicChat:
    """The ``anthropic`` provider: the Messages API, streamed."""

    name = "anthropic"
    ttft_limited = True

    def __init__(
        self, api: anthropic.AsyncAnthropic, *, default_max_tokens: int
    ) -> None:
        self._api = api
        self._default_max_tokens = default_max_tokens

    def health_override(self, model: str) -> str | None:
        return None

    async def stream(
        self, model: str, messages: Sequence[Message], options: Options
    ) -> AsyncGenerator[Chunk, None]:
        system, turns = split_system(messages)
        try:
            response = await self._api.messages.create(
                model=model,
                system=system or anthropic.omit,
                messages=turns,
                max_tokens=options.max_tokens or self._default_max_tokens,
                # No temperature: the Messages API of this SDK no longer takes
                # one, so Claude samples at its own default.
                stream=True,
            )
        except anthropic.APIError as exc:
            raise translate(exc) from exc

        stop_reason: str | None = None
        stopped = False
        input_tokens = output_tokens = 0
        async with response:
            try:
                async for event in response:
                    if event.type == "message_start":
                        input_tokens = event.message.usage.input_tokens
                        output_tokens = event.message.usage.output_tokens
                    elif event.type == "content_block_delta":
                        if event.delta.type == "text_delta" and event.delta.text:
                            yield TextDelta(event.delta.text)
                    elif event.type == "message_delta":
                        stop_reason = event.delta.stop_reason
                        output_tokens = event.usage.output_tokens
                    elif event.type == "message_stop":
                        stopped = True
            except (anthropic.APIError, httpx2.TransportError) as exc:
                raise translate(exc) from exc
            except ValueError as exc:
                raise ProviderError(ErrorKind.MALFORMED, "undecodable event") from exc

        if not stopped:
            raise ProviderError(ErrorKind.TRUNCATED, "stream ended before message_stop")
        reason = _FINISH.get(stop_reason or "end_turn", stop_reason or "stop")
        yield Finish(reason, input_tokens, output_tokens)
