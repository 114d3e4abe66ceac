"""Fixtures shared by the tests: the whole embedded stack, started once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import Stack, StackSettings
from services.runtime.config import SERVICE_NAMES
from tests.fakes.openai_server import FakeOpenAI

# Small enough that a test can overflow it with a few long turns.
HISTORY_TOKENS = 300


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    """The OpenAI API the stack's gateway talks to, on the real wire format."""
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, fake_openai: FakeOpenAI
) -> Iterator[Stack]:
    """Every process of the product, on free ports, in a fresh data folder."""
    root: Path = tmp_path_factory.mktemp("janna")
    settings = StackSettings(
        root=root,
        edge_port=0,
        edge_admin_port=0,
        service_ports={name: 0 for name in SERVICE_NAMES},
        env={
            "JANNA_SHUTDOWN_GRACE_S": "5",
            "OPENAI_API_KEY": "sk-test-stack-key",
            "OPENAI_BASE_URL": fake_openai.base_url,
            # Documents are embedded in-process (384 dimensions), as offline.
            "JANNA_EMBEDDINGS_PROVIDER": "embedded",
            "JANNA_CHAT_HISTORY_TOKENS": str(HISTORY_TOKENS),
        },
    )
    with Stack(settings) as running:
        yield running


@pytest.fixture(scope="session")
def database_url(stack: Stack) -> str:
    assert stack.addresses is not None
    return stack.addresses.database_url


@pytest.fixture
def service_env(stack: Stack) -> dict[str, str]:
    return {**os.environ, **stack.service_env()}
