"""The mesh stands up: health, reflection, /health through Envoy, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.infra import free_port as _free_port
from devstack.stack import ROOT, Stack, StackSettings
from services.proto.janna.v1 import mesh_pb2, mesh_pb2_grpc
from services.runtime.config import SERVICE_NAMES

EXPECTED_SERVICES = {
    "auth": {"janna.v1.AuthService", "janna.v1.UserAdmin"},
    "gateway": {"janna.v1.ModelGateway", "janna.v1.ModelAdmin"},
    "chat": {
        "janna.v1.ChatService",
        "janna.v1.RateLimitAdmin",
        "janna.v1.MetricsAdmin",
    },
    "rag": {"janna.v1.RetrievalService"},
    "ingest": {"janna.v1.IngestService", "janna.v1.QueueAdmin"},
}


def address(stack: Stack, name: str) -> str:
    return f"127.0.0.1:{stack.ports[name]}"


@pytest.mark.parametrize("name", SERVICE_NAMES)
async def test_service_answers_health_and_reflection(stack: Stack, name: str) -> None:
    async with grpc.aio.insecure_channel(address(stack, name)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for service in EXPECTED_SERVICES[name]:
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed: set[str] = set()
        async for answer in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        ):
            listed |= {s.name for s in answer.list_services_response.service}
        assert EXPECTED_SERVICES[name] <= listed
        assert {"grpc.health.v1.Health", "janna.v1.MeshHealth"} <= listed


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "grpcurl"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_grpcurl_lists_describes_and_calls(stack: Stack) -> None:
    target = address(stack, "chat")
    listed = grpcurl("-plaintext", target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "janna.v1.ChatService" in listed.stdout.split()

    described = grpcurl("-plaintext", target, "describe", "janna.v1.ChatService")
    assert described.returncode == 0, described.stderr
    assert "rpc StreamChat" in described.stdout

    checked = grpcurl("-plaintext", target, "grpc.health.v1.Health/Check")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}

    anonymous = grpcurl(
        "-plaintext", "-d", "{}", target, "janna.v1.ChatService/ListConversations"
    )
    assert anonymous.returncode != 0
    assert "Unauthenticated" in anonymous.stderr
    assert "authentication required" in anonymous.stderr


def test_health_through_the_edge(stack: Stack) -> None:
    for path in ("/health", "/api/health"):
        reply = httpx.get(stack.edge_url + path, timeout=10)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["status"] == "ok"
        assert {s["service"]: s["state"] for s in body["services"]} == {
            name: "SERVING" for name in SERVICE_NAMES
        }


def test_health_names_a_killed_service(stack: Stack) -> None:
    stack.stop_service("rag", signal.SIGKILL)
    try:
        reply = httpx.get(stack.edge_url + "/health", timeout=10)
        assert reply.status_code == 503
        assert "rag" in reply.json()["message"]
        assert "gateway" not in reply.json()["message"]
    finally:
        stack.start_service("rag")
        stack.wait_healthy(30)
    assert httpx.get(stack.edge_url + "/health", timeout=10).status_code == 200


def _black_hole() -> socket.socket:
    """A listener that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


async def test_sigterm_lets_an_inflight_call_finish(
    stack: Stack, service_env: dict[str, str]
) -> None:
    # The mesh check of this extra rag process waits about a second for a
    # peer that never answers, which keeps a call in flight during SIGTERM.
    hole = _black_hole()
    port = _free_port()
    env = {
        **service_env,
        "JANNA_RAG_PORT": str(port),
        "JANNA_RAG_ADDR": f"127.0.0.1:{port}",
        "JANNA_RAG_METRICS_PORT": "0",
        "JANNA_GATEWAY_ADDR": f"127.0.0.1:{hole.getsockname()[1]}",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.rag"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 20)
            stub = mesh_pb2_grpc.MeshHealthStub(channel)
            call = stub.Check(mesh_pb2.MeshHealthRequest(), timeout=10)
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            # The call ran to its own end (the peer is reported down); it was
            # not cut off by the shutdown.
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "gateway" in (caught.value.details() or "")
        assert process.wait(15) == 0
        output = process.stdout.read().decode() if process.stdout else ""
        assert "rag stopped" in output
        assert "Traceback" not in output
    finally:
        if process.poll() is None:
            process.kill()
        hole.close()


def test_stopping_the_stack_leaves_no_process(tmp_path: Path) -> None:
    settings = StackSettings(
        root=tmp_path,
        edge_port=0,
        edge_admin_port=0,
        service_ports={name: 0 for name in SERVICE_NAMES},
        # A configured provider keeps the gateway from converting the
        # embedded model, which this test does not need.
        env={
            "OPENAI_API_KEY": "sk-unused",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
            "JANNA_EMBEDDINGS_PROVIDER": "embedded",
        },
    )
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    stack = Stack(settings)
    stack.start()
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert len(started) >= 8  # five services, Envoy, Postgres, Valkey, moto
    stack.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [
            pid
            for pid in started
            if psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]
        if not alive:
            break
        time.sleep(0.2)
    assert not alive, alive


def test_second_run_says_one_is_running(tmp_path: Path) -> None:
    import fcntl

    with open(tmp_path / "run.lock", "w") as held:
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run(
            [sys.executable, "-m", "devstack"],
            env={**os.environ, "JANNA_STACK_DIR": str(tmp_path)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "already running (pid 4242)" in result.stderr


def test_make_run_serves_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    ports = {"JANNA_EDGE_PORT": _free_port(), "JANNA_EDGE_ADMIN_PORT": _free_port()}
    ports.update({f"JANNA_{name.upper()}_PORT": _free_port() for name in SERVICE_NAMES})
    env = {
        **os.environ,
        **{key: str(port) for key, port in ports.items()},
        "JANNA_STACK_DIR": str(tmp_path),
        # A developer's own setting, which must reach the services.
        "JANNA_CHAT_MAX_MESSAGE_CHARS": "50",
        "OPENAI_API_KEY": "sk-unused",
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        "JANNA_EMBEDDINGS_PROVIDER": "embedded",
    }
    run = subprocess.Popen(
        [sys.executable, "-m", "devstack"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in run.stdout or ()], daemon=True
    ).start()
    printed: list[str] = []
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not any("Ctrl-C stops everything" in line for line in printed):
            assert run.poll() is None, "".join(printed)
            assert time.monotonic() < deadline, "".join(printed)
            with contextlib.suppress(queue.Empty):
                printed.append(lines.get(timeout=1))
        edge = f"http://127.0.0.1:{ports['JANNA_EDGE_PORT']}"
        assert f"running at http://localhost:{ports['JANNA_EDGE_PORT']}" in "".join(
            printed
        )
        assert "DATABASE_URL=" in (tmp_path / "stack.env").read_text()
        assert httpx.get(f"{edge}/health", timeout=10).status_code == 200
        refused = httpx.post(
            f"{edge}/api/chat/stream",
            json={"message": "x" * 60},
            headers={"Authorization": "Bearer dev:u1:test@dev.local"},
            timeout=10,
        )
        assert refused.status_code == 400
        assert "longer than 50 characters" in refused.json()["message"]
        started = psutil.Process(run.pid).children(recursive=True)
        assert len(started) >= 8  # five services, Envoy, Postgres, Valkey, moto
    finally:
        run.send_signal(signal.SIGINT)
        assert run.wait(60) == 0
    deadline = time.monotonic() + 10
    alive = started
    while alive and time.monotonic() < deadline:
        alive = [
            p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        time.sleep(0.2)
    assert not alive, alive


def test_make_run_refuses_a_port_that_is_not_a_number(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devstack"],
        env={**os.environ, "JANNA_STACK_DIR": str(tmp_path), "JANNA_CHAT_PORT": "x"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "cannot start: JANNA_CHAT_PORT must be an integer" in result.stderr
