"""Chat through the ``openai`` SDK: OpenAI itself and any OpenAI-compatible server."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence

import openai
from openai.types.chat import ChatCompletionMessageParam

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


def client(
    endpoint: Endpoint, *, connect_s: float, idle_s: float
) -> openai.AsyncOpenAI:
    """A client that never retries on its own: the router decides what is next."""
    return openai.AsyncOpenAI(
        api_key=endpoint.api_key,
        base_url=endpoint.base_url,
        max_retries=0,
        timeout=openai.Timeout(idle_s, connect=connect_s),
    )


def translate(exc: openai.APIError) -> ProviderError:
    """An SDK error as the gateway's :class:`ProviderError`."""
    if isinstance(exc, openai.APIStatusError):
        return status_error(exc.status_code, retry_after(exc.response.headers))
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(ErrorKind.TIMEOUT, "timed out")
    if isinstance(exc, openai.APIConnectionError):
        return connection_error(exc.__cause__)
    # An ``error`` object inside the stream.
    return ProviderError(ErrorKind.SERVER, "error in stream")


class OpenAIChat:
    """The ``local`` and ``openai`` providers: chat.completions, streamed."""

    ttft_limited = True

    def __init__(
        self, name: str, api: openai.AsyncOpenAI, *, completion_tokens: bool
    ) -> None:
        self.name = name
        self._api = api
        # OpenAI's newer models take only max_completion_tokens; self-hosted
        # servers (vLLM, llama.cpp, Ollama) all know max_tokens.
        self._completion_tokens = completion_tokens

    def health_override(self, model: str) -> str | None:
        return None

    async def stream(
        self, model: str, messages: Sequence[Message], options: Options
    ) -> AsyncGenerator[Chunk, None]:
        limit = openai.omit if options.max_tokens is None else options.max_tokens
        try:
            response = await self._api.chat.completions.create(
                model=model,
                messages=[_message(m) for m in messages],
                stream=True,
                stream_options={"include_usage": True},
                temperature=(
                    openai.omit if options.temperature is None else options.temperature
                ),
                max_tokens=openai.omit if self._completion_tokens else limit,
                max_completion_tokens=limit if self._completion_tokens else openai.omit,
            )
        except openai.APIError as exc:
            raise translate(exc) from exc

        finish: str | None = None
        input_tokens = output_tokens = deltas = 0
        async with response:
            try:
                async for chunk in response:
                    if chunk.usage is not None:
                        input_tokens = chunk.usage.prompt_tokens
                        output_tokens = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        if choice.delta.content:
                            deltas += 1
                            yield TextDelta(choice.delta.content)
                        if choice.finish_reason is not None:
                            finish = choice.finish_reason
            except openai.APIError as exc:
                raise translate(exc) from exc
            except ValueError as exc:
                raise ProviderError(ErrorKind.MALFORMED, "undecodable chunk") from exc

        if finish is None:
            # A clean end of the body without a finish reason is still a cut.
            raise ProviderError(ErrorKind.TRUNCATED, "stream ended before finishing")
        # A server that ignores stream_options sends no usage; one delta is
        # one token for every server we know, so count them instead.
        yield Finish(finish, input_tokens, output_tokens or deltas)


def _message(message: Message) -> ChatCompletionMessageParam:
    if message.role == "system":
        return {"role": "system", "content": message.content}
    if message.role == "assistant":
        return {"role": "assistant", "content": message.content}
    return {"role": "user", "content": message.content}
