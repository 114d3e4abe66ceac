"""The gateway's configuration: routes from env or a file, defaults, mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.config import GatewayConfig, ModelRef
from services.runtime.config import ConfigError, Env

LOCAL = ModelRef("local", "llama-3.1-70b")
OPENAI = ModelRef("openai", "gpt-4o-mini")
CLAUDE = ModelRef("anthropic", "claude-haiku-4-5-20251001")
EMBEDDED = ModelRef("embedded", "gemma-3-270m")


def load(**environ: str) -> GatewayConfig:
    return GatewayConfig.from_env(Env(environ), Path("/data"))


@pytest.mark.parametrize(
    ("environ", "chain"),
    [
        ({}, (EMBEDDED,)),
        ({"OPENAI_API_KEY": "k"}, (OPENAI,)),
        (
            {"JANNA_LOCAL_BASE_URL": "http://gpu:8000/v1", "OPENAI_API_KEY": "k"},
            (LOCAL, OPENAI),
        ),
        (
            {
                "JANNA_LOCAL_BASE_URL": "http://gpu:8000/v1",
                "OPENAI_API_KEY": "k",
                "ANTHROPIC_API_KEY": "k",
            },
            (LOCAL, OPENAI, CLAUDE),
        ),
        ({"ANTHROPIC_API_KEY": "k"}, (CLAUDE,)),
    ],
    ids=["nothing", "openai", "runbook", "all-three", "anthropic"],
)
def test_default_chat_route_follows_what_is_configured(
    environ: dict[str, str], chain: tuple[ModelRef, ...]
) -> None:
    config = load(**environ)

    assert dict(config.routes) == {"chat": chain}


def test_embeddings_follow_the_openai_key_unless_told() -> None:
    assert load().embeddings.provider == "embedded"
    assert load(OPENAI_API_KEY="k").embeddings.provider == "openai"
    assert (
        load(
            OPENAI_API_KEY="k", JANNA_EMBEDDINGS_PROVIDER="embedded"
        ).embeddings.provider
        == "embedded"
    )


def test_routes_from_the_environment() -> None:
    config = load(
        OPENAI_API_KEY="k",
        JANNA_LOCAL_BASE_URL="http://127.0.0.1:11434/v1",
        JANNA_MODEL_ROUTES=(
            "chat=local:llama3.1:70b, openai:gpt-4o-mini ; title=openai:gpt-4.1-nano"
        ),
    )

    assert dict(config.routes) == {
        "chat": (ModelRef("local", "llama3.1:70b"), OPENAI),
        "title": (ModelRef("openai", "gpt-4.1-nano"),),
    }
    assert config.models == (
        ModelRef("local", "llama3.1:70b"),
        OPENAI,
        ModelRef("openai", "gpt-4.1-nano"),
    )


def test_routes_from_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "routes:\n"
        "  chat: [local:llama-3.1-70b, openai:gpt-4o-mini, embedded:gemma-3-270m]\n"
        "  summary:\n"
        "    - anthropic:claude-haiku-4-5-20251001\n"
    )

    config = load(
        JANNA_MODELS_FILE=str(path),
        JANNA_LOCAL_BASE_URL="http://gpu/v1",
        OPENAI_API_KEY="k",
        ANTHROPIC_API_KEY="k",
    )

    assert dict(config.routes) == {
        "chat": (LOCAL, OPENAI, EMBEDDED),
        "summary": (CLAUDE,),
    }


def test_keys_stay_out_of_repr() -> None:
    config = load(OPENAI_API_KEY="sk-secret-value", ANTHROPIC_API_KEY="sk-ant-secret")

    assert "secret" not in repr(config)


def test_defaults_and_overrides_of_the_limits() -> None:
    config = load()
    assert (config.health_ttl_s, config.ttft_limit_s) == (30.0, 10.0)
    assert config.embedded.model_dir == Path("/data/models")

    config = load(JANNA_HEALTH_TTL_S="5", JANNA_MODEL_CACHE_DIR="/cache")
    assert config.health_ttl_s == 5.0
    assert config.embedded.model_dir == Path("/cache")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"JANNA_MODEL_ROUTES": "chat=mistral:large"}, "unknown provider"),
        ({"JANNA_MODEL_ROUTES": "chat=openai:gpt-4o-mini"}, "OPENAI_API_KEY"),
        ({"JANNA_MODEL_ROUTES": "chat=local:x"}, "JANNA_LOCAL_BASE_URL"),
        ({"JANNA_MODEL_ROUTES": "title=embedded:gemma-3-270m"}, "'chat'"),
        ({"JANNA_MODEL_ROUTES": "chat=gpt-4o-mini"}, "provider:model"),
        ({"JANNA_MODEL_ROUTES": "chat"}, "name=chain"),
        ({"JANNA_MODEL_ROUTES": "chat="}, "no models"),
        (
            {"JANNA_MODEL_ROUTES": "chat=embedded:a,embedded:a"},
            "names a model twice",
        ),
        (
            {"JANNA_MODEL_ROUTES": "chat=embedded:a", "JANNA_MODELS_FILE": "x.yaml"},
            "not both",
        ),
        ({"JANNA_MODELS_FILE": "/nonexistent/models.yaml"}, "JANNA_MODELS_FILE"),
        ({"JANNA_HEALTH_TTL_S": "0"}, "positive"),
        ({"JANNA_EMBEDDINGS_PROVIDER": "openai"}, "OPENAI_API_KEY"),
        ({"JANNA_EMBEDDINGS_PROVIDER": "cohere"}, "openai or embedded"),
    ],
)
def test_mistakes_stop_the_start(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(**environ)
