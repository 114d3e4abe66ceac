"""One generation through a fallback chain, the way the runbook describes it.

Models marked failing in the health cache are skipped, unless every model of
the chain is (then all are tried, so that stale keys never black out the
service). Each model gets its turn until one produces a first token; a
failure before that moves on to the next model, a failure after it ends the
stream with :class:`StreamInterrupted`, since text already sent can be
neither taken back nor repeated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from services.gateway import metrics
from services.gateway.config import DEFAULT_ROUTE, GatewayConfig, ModelRef
from services.gateway.health import Health, HealthCache
from services.gateway.metrics import Metrics
from services.gateway.provider import (
    ChatProvider,
    Chunk,
    ErrorKind,
    Finish,
    Message,
    Options,
    ProviderError,
    TextDelta,
)
from services.runtime.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chosen:
    """The model that answers, before its first delta."""

    ref: ModelRef
    fallback: bool
    skipped: tuple[str, ...]


@dataclass(frozen=True)
class Done:
    ref: ModelRef
    finish: Finish


Event = Chosen | TextDelta | Done


class GatewayError(Exception):
    """A generation that cannot be answered; the servicer turns it into a status."""


class InvalidRequest(GatewayError):
    pass


class AllModelsFailed(GatewayError):
    """Every model of the chain failed before its first token."""

    def __init__(self, route: str, failures: Sequence[tuple[ModelRef, ProviderError]]):
        super().__init__(f"every model of {route} failed")
        self.route = route
        self.failures = tuple(failures)

    @property
    def rate_limited(self) -> bool:
        return all(e.kind == ErrorKind.RATE_LIMITED for _, e in self.failures)

    @property
    def warming(self) -> bool:
        return any(e.kind == ErrorKind.WARMING for _, e in self.failures)

    @property
    def retry_after_s(self) -> float | None:
        """The soonest any of the models said it would take requests again."""
        waits = [
            e.retry_after_s for _, e in self.failures if e.retry_after_s is not None
        ]
        return min(waits) if waits else None


class StreamInterrupted(GatewayError):
    """A model failed after its first token had been sent."""

    def __init__(self, ref: ModelRef, error: ProviderError) -> None:
        super().__init__(f"{ref} failed mid-stream: {error.detail}")
        self.ref = ref
        self.error = error


def describe(error: ProviderError) -> str:
    """One line for the stream's ``skipped`` list and the logs; no payloads."""
    return f"{error.kind}: {error.detail}"


class Router:
    def __init__(
        self,
        config: GatewayConfig,
        providers: Mapping[str, ChatProvider],
        health: HealthCache,
        stats: Metrics,
    ) -> None:
        self._config = config
        self._providers = providers
        self._health = health
        self._metrics = stats

    def resolve(self, name: str) -> tuple[str, tuple[ModelRef, ...]]:
        """A route name, or ``provider:model``, as (route label, chain)."""
        name = name.strip() or DEFAULT_ROUTE
        chain = self._config.routes.get(name)
        if chain is not None:
            return name, chain
        if ":" not in name:
            raise InvalidRequest(f"unknown route {name!r}")
        try:
            ref = ModelRef.parse(name)
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from exc
        if ref.provider not in self._providers:
            raise InvalidRequest(f"provider {ref.provider!r} is not configured")
        return name, (ref,)

    async def generate(
        self,
        route: str,
        chain: Sequence[ModelRef],
        messages: Sequence[Message],
        options: Options,
    ) -> AsyncGenerator[Event, None]:
        """Chosen, then deltas, then Done; or raises a :class:`GatewayError`."""
        health = await self._health.read(chain)
        eligible = [ref for ref in chain if health[ref] != Health.FAILING]
        skipped: list[str] = []
        if eligible:
            skipped = [
                f"{ref}: marked failing in the health cache"
                for ref in chain
                if ref not in eligible
            ]
        else:
            logger.warning(
                "every model of route %s is marked failing; trying them all", route
            )
            eligible = list(chain)

        failures: list[tuple[ModelRef, ProviderError]] = []
        for index, ref in enumerate(eligible):
            provider = self._providers[ref.provider]
            started = time.monotonic()
            stream = provider.stream(ref.model, messages, options)
            async with aclosing(stream):
                try:
                    first = await self._first(provider, stream)
                except ProviderError as exc:
                    has_next = index + 1 < len(eligible)
                    await self._failed(route, ref, exc, has_next=has_next)
                    failures.append((ref, exc))
                    skipped.append(f"{ref}: {describe(exc)}")
                    continue
                except asyncio.CancelledError:
                    self._count(ref, "cancelled")
                    raise
                ttft = time.monotonic() - started
                self._metrics.observe(
                    metrics.TTFT, ttft, provider=ref.provider, model=ref.model
                )
                yield Chosen(ref, fallback=ref != chain[0], skipped=tuple(skipped))
                answer = self._answer(route, ref, first, stream, started)
                async with aclosing(answer):
                    async for event in answer:
                        yield event
                return
        self._metrics.inc(metrics.UNANSWERED, route=route)
        raise AllModelsFailed(route, failures)

    async def _first(
        self, provider: ChatProvider, stream: AsyncGenerator[Chunk, None]
    ) -> Chunk:
        limit = self._config.ttft_limit_s
        try:
            if provider.ttft_limited:
                async with asyncio.timeout(limit):
                    return await anext(stream)
            return await anext(stream)
        except TimeoutError as exc:
            raise ProviderError(
                ErrorKind.TTFT, f"no first token within {limit:g}s"
            ) from exc
        except StopAsyncIteration as exc:
            raise ProviderError(ErrorKind.TRUNCATED, "empty stream") from exc

    async def _answer(
        self,
        route: str,
        ref: ModelRef,
        first: Chunk,
        stream: AsyncGenerator[Chunk, None],
        started: float,
    ) -> AsyncGenerator[Event, None]:
        finish = first if isinstance(first, Finish) else None
        try:
            if isinstance(first, TextDelta):
                yield first
            while finish is None:
                chunk = await anext(stream, None)
                if chunk is None:
                    raise ProviderError(ErrorKind.TRUNCATED, "stream ended early")
                if isinstance(chunk, Finish):
                    finish = chunk
                else:
                    yield chunk
        except ProviderError as exc:
            await self._failed(route, ref, exc, has_next=False)
            raise StreamInterrupted(ref, exc) from exc
        except (asyncio.CancelledError, GeneratorExit):
            self._count(ref, "cancelled")
            raise

        await self._health.mark_healthy(ref)
        self._count(ref, "ok")
        labels = {"provider": ref.provider, "model": ref.model}
        self._metrics.inc(metrics.TOKENS, finish.input_tokens, direction="in", **labels)
        self._metrics.inc(
            metrics.TOKENS, finish.output_tokens, direction="out", **labels
        )
        self._metrics.observe(metrics.DURATION, time.monotonic() - started, **labels)
        yield Done(ref, finish)

    async def _failed(
        self, route: str, ref: ModelRef, error: ProviderError, *, has_next: bool
    ) -> None:
        fields = {"provider": ref.provider, "model": ref.model, "kind": error.kind}
        logger.warning(
            "provider error provider=%s model=%s kind=%s detail=%s",
            ref.provider,
            ref.model,
            error.kind,
            error.detail,
            extra=fields,
        )
        self._count(ref, "error")
        self._metrics.inc(
            metrics.ERRORS, provider=ref.provider, model=ref.model, kind=error.kind
        )
        if has_next:
            logger.warning(
                "fallback route=%s from=%s kind=%s",
                route,
                ref,
                error.kind,
                extra={**fields, "route": route},
            )
            self._metrics.inc(
                metrics.FALLBACKS, route=route, provider=ref.provider, model=ref.model
            )
        if error.marks_failing:
            retry_after = (
                error.retry_after_s if error.kind == ErrorKind.RATE_LIMITED else None
            )
            await self._health.mark_failing(ref, retry_after)

    def _count(self, ref: ModelRef, outcome: str) -> None:
        self._metrics.inc(
            metrics.REQUESTS, provider=ref.provider, model=ref.model, outcome=outcome
        )
