"""``python -m services.gateway`` as a real process: configured, serving, stopping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import psutil  # type: ignore[import-untyped, unused-ignore]

from services.proto.janna.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import TEST_ENV
from tests.gateway.fakes import Fake, free_port
from tests.gateway.helpers import ask, collect, text_of

ROOT = Path(__file__).resolve().parents[2]


async def test_the_service_process_answers_and_stops_cleanly(
    valkey_url: str, fake_openai: Fake, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JANNA_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        {
            **TEST_ENV,
            "REDIS_URL": valkey_url,
            "OPENAI_BASE_URL": fake_openai.base_url,
            "JANNA_GATEWAY_PORT": str(port),
            "JANNA_DATA_DIR": str(tmp_path),
            "JANNA_SHUTDOWN_GRACE_S": "2",
        }
    )
    env.pop("ANTHROPIC_API_KEY")
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = gateway_pb2_grpc.ModelGatewayStub(channel)

            events, error = await collect(stub.Generate(ask(), timeout=10))
            assert error is None
            assert text_of(events) == "Hello from gpt-4o-mini"
            listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
            assert [m.model for m in listed.models] == [
                "gpt-4o-mini",
                "text-embedding-3-small",
            ]

        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
        output = process.stdout.read().decode() if process.stdout else ""
        assert "gateway stopped" in output
        assert "Traceback" not in output
        assert "sk-test-not-a-real-key" not in output
    finally:
        if process.poll() is None:
            process.kill()


async def test_stopping_during_the_first_conversion_leaves_no_child(
    valkey_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JANNA_", "OPENAI_", "ANTHROPIC_"))
    }
    env.update(
        {
            "REDIS_URL": valkey_url,
            "JANNA_GATEWAY_PORT": str(port),
            "JANNA_DATA_DIR": str(tmp_path),
            "JANNA_SHUTDOWN_GRACE_S": "2",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "services.gateway"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = gateway_pb2_grpc.ModelGatewayStub(channel)
            listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
            assert listed.models[0].health == "warming"

        children = psutil.Process(process.pid).children(recursive=True)
        assert children, "the conversion runs in a child process"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
        _, alive = psutil.wait_procs(children, timeout=5)
        assert alive == []
        output = process.stdout.read().decode() if process.stdout else ""
        assert "Traceback" not in output
        assert not (tmp_path / "models" / "gemma-3-270m").exists()
    finally:
        if process.poll() is None:
            process.kill()
