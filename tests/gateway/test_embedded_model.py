"""The embedded Gemma 3 270M: warming, then real tokens, then a cancelled stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from services.gateway.config import ModelRef
from services.gateway.gemma import StopTrimmer, build_prompt
from services.gateway.provider import Message
from services.proto.janna.v1 import gateway_pb2
from services.runtime.meshhealth import warming_models
from tests.gateway.conftest import StartGateway
from tests.gateway.fakes import wait_for
from tests.gateway.helpers import ask, collect, kinds, reason, text_of

NOTHING_CONFIGURED = {
    "JANNA_MODEL_ROUTES": None,
    "JANNA_LOCAL_BASE_URL": None,
    "OPENAI_API_KEY": None,
    "ANTHROPIC_API_KEY": None,
}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted weights, shared by every embedded test of the session."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.slow
async def test_embedded_model_warms_up_then_streams_real_tokens(
    start_gateway: StartGateway, model_cache: Path
) -> None:
    running = await start_gateway(
        **NOTHING_CONFIGURED, JANNA_MODEL_CACHE_DIR=str(model_cache)
    )
    embedded = running.gateway.embedded
    assert embedded is not None
    assert dict(running.gateway.config.routes) == {
        "chat": (ModelRef("embedded", "gemma-3-270m"),)
    }

    # The first start converts the GGUF, which takes a while: meanwhile the
    # gateway answers, and says the model is warming.
    listed = await running.stub.ListModels(gateway_pb2.ListModelsRequest())
    assert (listed.models[0].model, listed.models[0].health) == (
        "gemma-3-270m",
        "warming",
    )
    # /health names what is warming beside the gateway's state.
    assert "embedded:gemma-3-270m" in await warming_models(running.channel)
    events, error = await collect(running.stub.Generate(ask()))
    assert error is not None
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(error) == "MODEL_WARMING"

    await asyncio.wait_for(embedded.ready.wait(), 300)
    assert "embedded:gemma-3-270m" not in await warming_models(running.channel)
    assert (model_cache / "gemma-3-270m" / "model.safetensors").is_file()

    events, error = await collect(
        running.stub.Generate(
            ask("What is the capital of France?", temperature=0, max_tokens=12)
        )
    )

    assert error is None, error
    assert kinds(events)[0] == "model_chosen"
    assert events[0].model_chosen.provider == "embedded"
    assert kinds(events)[-1] == "done"
    assert kinds(events).count("delta") >= 1
    assert text_of(events).strip()
    done = events[-1].done
    assert done.finish_reason in ("stop", "length")
    assert 1 <= done.usage.output_tokens <= 12
    assert done.usage.input_tokens > 5
    listed = await running.stub.ListModels(gateway_pb2.ListModelsRequest())
    assert listed.models[0].health == "healthy"

    # A caller that goes away stops the generation: no tokens for nobody.
    before = embedded.produced_tokens
    call = running.stub.Generate(
        ask("Tell me a long story about a dragon.", temperature=0.8, max_tokens=400)
    )
    assert (await call.read()).WhichOneof("event") == "model_chosen"
    assert (await call.read()).WhichOneof("event") == "delta"
    call.cancel()
    await wait_for(lambda: embedded.active == 0, within=120)
    assert embedded.produced_tokens - before < 400


def test_the_transcript_a_base_model_continues() -> None:
    prompt = build_prompt(
        [
            Message("system", "Be kind."),
            Message("user", "Hi"),
            Message("assistant", "Hello!"),
            Message("user", "Who are you?"),
        ]
    )

    assert (
        prompt
        == "Be kind.\n\nUser: Hi\nAssistant: Hello!\nUser: Who are you?\nAssistant:"
    )


def test_the_answer_stops_where_the_next_user_turn_starts() -> None:
    trimmer = StopTrimmer()
    pieces = [" Paris", " is", " the capital.", "\n", "Us", "er: and", " more"]

    out = "".join(trimmer.feed(p) for p in pieces) + trimmer.flush()

    assert out == "Paris is the capital."
    assert trimmer.stopped


def test_text_that_only_looks_like_the_marker_passes() -> None:
    trimmer = StopTrimmer()

    out = (
        "".join(trimmer.feed(p) for p in ["A\n", "Useful", " line\n"]) + trimmer.flush()
    )

    assert out == "A\nUseful line"
    assert not trimmer.stopped
