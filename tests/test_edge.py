"""The generated Envoy config, validated and run by the real Envoy binary."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from devstack.infra import free_port as _free_port
from services.edge.config import (
    MESH_CLUSTER,
    SERVICE_OWNERS,
    EdgeSettings,
    Upstream,
    build_config,
    render,
)
from services.proto.janna.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    mesh_pb2,
    mesh_pb2_grpc,
    rag_pb2_grpc,
)
from services.runtime import errors, identity
from services.runtime.config import ConfigError, Env

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "envoy" / "janna.pb"
ENVOY = Path(sys.executable).parent / "envoy"
FRONTEND = "http://app.example.test"
EVENT_GAP_S = 0.3
STARTUP_S = 20.0
TOKEN = "ok"
"""The one credential the fake authorizer admits, as alice."""


@pytest.fixture(scope="module")
def descriptor() -> Path:
    if not DESCRIPTOR.exists():
        subprocess.run([sys.executable, "protos/build.py"], cwd=ROOT, check=True)
    return DESCRIPTOR


def _settings(descriptor: Path, upstream_port: int, log: Path) -> EdgeSettings:
    return EdgeSettings(
        descriptor_path=descriptor,
        upstreams=tuple(
            Upstream(n, "127.0.0.1", upstream_port) for n in SERVICE_OWNERS
        ),
        listen_host="127.0.0.1",
        listen_port=_free_port(),
        admin_port=_free_port(),
        frontend_url=FRONTEND,
        access_log_path=str(log),
    )


# --- the config itself -------------------------------------------------------


def test_envoy_validates_the_generated_config(descriptor: Path, tmp_path: Path) -> None:
    settings = _settings(descriptor, 50051, tmp_path / "access.log")
    config = tmp_path / "envoy.yaml"
    config.write_text(render(settings))

    result = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def _manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def _routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    [host] = _manager(config)["route_config"]["virtual_hosts"]
    return {r["name"]: r for r in host["routes"]}


def test_routes_follow_the_http_annotations(descriptor: Path, tmp_path: Path) -> None:
    routes = _routes(build_config(_settings(descriptor, 1, tmp_path / "a.log")))

    stream = routes["/janna.v1.ChatService/StreamChat"]["route"]
    assert stream["cluster"] == "chat"
    assert stream["timeout"] == "0s"
    assert stream["idle_timeout"] == "300s"
    assert routes["/janna.v1.UserAdmin/ListUsers"]["route"]["timeout"] == "60s"
    assert routes["/janna.v1.MeshHealth/Check"]["route"]["cluster"] == MESH_CLUSTER
    assert "/janna.v1.ModelGateway/Generate" not in routes
    assert "/janna.v1.ModelGateway/Embed" not in routes
    assert list(routes)[-1] == "not_found"


def test_settings_from_env() -> None:
    env = Env(
        {
            "JANNA_EDGE_PORT": "8080",
            "JANNA_EDGE_ADMIN_PORT": "9000",
            "FRONTEND_URL": "https://app.janna.ai",
            "JANNA_CHAT_ADDR": "chat:6000",
        }
    )

    settings = EdgeSettings.from_env(Path("envoy/janna.pb"), env)

    assert settings.listen_port == 8080
    assert settings.admin_port == 9000
    assert settings.admin_host == "127.0.0.1"
    assert settings.frontend_url == "https://app.janna.ai"
    assert settings.upstreams[0] == Upstream("auth", "127.0.0.1", 50051)
    assert settings.upstreams[2] == Upstream("chat", "chat", 6000)
    assert settings.upstreams[4] == Upstream("ingest", "127.0.0.1", 50055)
    assert settings.authz_timeout_s == 2.0


def test_check_timeouts_from_env(descriptor: Path) -> None:
    env = Env(
        {"JANNA_EDGE_AUTHZ_TIMEOUT_S": "2.5", "JANNA_EDGE_RATE_LIMIT_TIMEOUT_S": "0.5"}
    )

    manager = _manager(build_config(EdgeSettings.from_env(descriptor, env)))
    filters = {f["name"]: f["typed_config"] for f in manager["http_filters"]}

    authz = filters["envoy.filters.http.ext_authz"]
    assert authz["grpc_service"]["timeout"] == "2.5s"
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    limit = filters["envoy.filters.http.ratelimit"]
    assert limit["timeout"] == "0.5s"
    assert limit["failure_mode_deny"] is False
    assert manager["xff_num_trusted_hops"] == 0


def test_trusted_proxies_name_the_client(descriptor: Path) -> None:
    env = Env({"JANNA_EDGE_TRUSTED_PROXY_HOPS": "2"})

    manager = _manager(build_config(EdgeSettings.from_env(descriptor, env)))

    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 2


def test_a_malformed_address_names_its_variable() -> None:
    with pytest.raises(ConfigError, match="JANNA_RAG_ADDR"):
        EdgeSettings.from_env(Path("x.pb"), Env({"JANNA_RAG_ADDR": "rag"}))


def test_dns_names_make_dns_clusters(descriptor: Path, tmp_path: Path) -> None:
    settings = _settings(descriptor, 1, tmp_path / "a.log")
    named = tuple(replace(u, host=f"{u.name}.svc") for u in settings.upstreams)

    dns = build_config(replace(settings, upstreams=named))
    static = build_config(settings)

    assert {c["type"] for c in dns["static_resources"]["clusters"]} == {"STRICT_DNS"}
    assert {c["type"] for c in static["static_resources"]["clusters"]} == {"STATIC"}


def test_every_owner_needs_an_upstream(descriptor: Path, tmp_path: Path) -> None:
    settings = _settings(descriptor, 1, tmp_path / "a.log")

    with pytest.raises(ConfigError, match="upstreams must be exactly"):
        build_config(replace(settings, upstreams=settings.upstreams[1:]))


def test_filters_run_cors_transcoder_limit_authz_router(
    descriptor: Path, tmp_path: Path
) -> None:
    config = build_config(_settings(descriptor, 1, tmp_path / "a.log"))

    assert [f["name"] for f in _manager(config)["http_filters"]] == [
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]


def test_only_health_and_the_catch_all_skip_the_checks(
    descriptor: Path, tmp_path: Path
) -> None:
    routes = _routes(build_config(_settings(descriptor, 1, tmp_path / "a.log")))

    open_routes = {
        name
        for name, route in routes.items()
        if route.get("typed_per_filter_config", {})
        .get("envoy.filters.http.ext_authz", {})
        .get("disabled")
    }
    assert open_routes == {"/janna.v1.MeshHealth/Check", "not_found"}


# --- a real Envoy in front of a fake service ----------------------------------


class _Mesh(mesh_pb2_grpc.MeshHealthServicer):
    def __init__(self) -> None:
        self.down: list[str] = []
        self.calls = 0

    async def Check(
        self, request: mesh_pb2.MeshHealthRequest, context: Any
    ) -> mesh_pb2.MeshHealthReport:
        self.calls += 1
        report = mesh_pb2.MeshHealthReport(
            status="degraded" if self.down else "ok",
            services=[mesh_pb2.ServiceState(service="chat", state="SERVING")],
            down=self.down,
        )
        if self.down:
            await errors.abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"unavailable: {', '.join(self.down)}",
                "SERVICE_DOWN",
                report,
            )
        return report


class _Chat(chat_pb2_grpc.ChatServiceServicer):
    async def StreamChat(
        self, request: chat_pb2.ChatTurnRequest, context: Any
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        if request.message == "busy":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
        for text in ("one", "two", "three"):
            yield chat_pb2.ChatEvent(type="token", token=chat_pb2.Token(text=text))
            await asyncio.sleep(EVENT_GAP_S)
        if request.message == "fail":
            await context.abort(grpc.StatusCode.INTERNAL, "model went away")
        yield chat_pb2.ChatEvent(
            type="done", done=chat_pb2.Done(conversation_id=request.conversation_id)
        )


class _Rag(rag_pb2_grpc.RetrievalServiceServicer):
    async def Search(self, request: Any, context: Any) -> Any:
        await errors.abort(
            context, grpc.StatusCode.INVALID_ARGUMENT, "query is empty", "EMPTY_QUERY"
        )


class _Ingest(ingest_pb2_grpc.IngestServiceServicer):
    async def UploadAttachment(
        self, request: ingest_pb2.UploadAttachmentRequest, context: Any
    ) -> ingest_pb2.Attachment:
        return ingest_pb2.Attachment(
            filename=request.filename,
            content_type=request.file.content_type,
            size_bytes=len(request.file.data),
        )


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class _Authorizer(external_auth_pb2_grpc.AuthorizationServicer):
    """Admits the one token as alice, naming only her id; refuses the rest."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        self.paths.append(http.path)
        if http.headers.get("authorization") == f"Bearer {TOKEN}":
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=0),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[_header(identity.USER_ID, "alice")]
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=16),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
                headers=[_header("content-type", "application/json")],
                body='{"code":16,"message":"who are you"}',
            ),
        )


class _Limiter(rls_pb2_grpc.RateLimitServiceServicer):
    """Counts nothing; says OVER_LIMIT while told to."""

    def __init__(self) -> None:
        self.over = False
        self.addresses: list[str] = []

    async def ShouldRateLimit(
        self, request: rls_pb2.RateLimitRequest, context: Any
    ) -> rls_pb2.RateLimitResponse:
        self.addresses += [e.value for d in request.descriptors for e in d.entries]
        if not self.over:
            return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)
        return rls_pb2.RateLimitResponse(
            overall_code=rls_pb2.RateLimitResponse.OVER_LIMIT,
            response_headers_to_add=[
                base_pb2.HeaderValue(key="retry-after", value="7")
            ],
        )


class _Me(auth_pb2_grpc.AuthServiceServicer):
    """Answers with the caller exactly as the metadata names them."""

    async def GetMe(
        self, request: auth_pb2.GetMeRequest, context: Any
    ) -> auth_pb2.User:
        found = identity.from_metadata(context.invocation_metadata())
        metadata = dict(context.invocation_metadata())
        if found is None:
            return auth_pb2.User(email=metadata.get(identity.USER_EMAIL, ""))
        return auth_pb2.User(id=found.user_id, email=found.email, groups=found.groups)


@dataclass
class FakeService:
    """One gRPC server standing in for every service of the mesh."""

    server: grpc.aio.Server
    port: int
    mesh: _Mesh
    authorizer: _Authorizer
    limiter: _Limiter

    @classmethod
    async def start(cls) -> FakeService:
        server = grpc.aio.server()
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        mesh = _Mesh()
        mesh_pb2_grpc.add_MeshHealthServicer_to_server(mesh, server)
        chat_pb2_grpc.add_ChatServiceServicer_to_server(_Chat(), server)
        rag_pb2_grpc.add_RetrievalServiceServicer_to_server(_Rag(), server)
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(_Ingest(), server)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(_Me(), server)
        authorizer = _Authorizer()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authorizer, server)
        limiter = _Limiter()
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(limiter, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        return cls(server, port, mesh, authorizer, limiter)

    async def stop(self) -> None:
        await self.server.stop(None)


@dataclass
class Edge:
    settings: EdgeSettings
    process: asyncio.subprocess.Process
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.listen_port}"

    async def stop(self) -> None:
        if self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), timeout=10)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def _start_envoy(settings: EdgeSettings, folder: Path) -> Edge:
    config = folder / "envoy.yaml"
    config.write_text(render(settings))
    log = folder / "envoy.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            str(ENVOY),
            "-c",
            str(config),
            # Envoys of parallel runs must not share hot-restart memory; the
            # listen port is free, so it makes a unique id.
            "--base-id",
            str(settings.listen_port),
            "--log-level",
            "warn",
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    edge = Edge(settings, process, log)
    try:
        await _wait_ready(edge)
    except BaseException:
        await edge.stop()
        raise
    return edge


async def _wait_ready(edge: Edge) -> None:
    admin = f"http://127.0.0.1:{edge.settings.admin_port}/ready"
    deadline = time.monotonic() + STARTUP_S
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if edge.process.returncode is not None:
                raise RuntimeError(f"envoy exited: {edge.log.read_text()}")
            try:
                if (await client.get(admin)).text.strip() == "LIVE":
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"envoy not ready: {edge.log.read_text()}")


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeService]:
    service = await FakeService.start()
    yield service
    await service.stop()


@pytest_asyncio.fixture(scope="module")
async def edge(
    descriptor: Path, fake: FakeService, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Edge]:
    folder = tmp_path_factory.mktemp("edge")
    running = await _start_envoy(
        _settings(descriptor, fake.port, folder / "access.log"), folder
    )
    yield running
    await running.stop()


@pytest_asyncio.fixture
async def client(edge: Edge) -> AsyncIterator[httpx.AsyncClient]:
    """A client with the credential the fake authorizer admits."""
    async with httpx.AsyncClient(
        base_url=edge.url,
        timeout=10.0,
        headers={"authorization": f"Bearer {TOKEN}"},
    ) as http:
        yield http


async def test_health_is_json(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/api/health"):
        response = await client.get(path)

        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json()["status"] == "ok"
        # always_print_primitive_fields: empty lists are printed too.
        assert response.json()["down"] == []


async def test_unknown_query_parameters_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/health", params={"_": "1733250000"})

    assert response.status_code == 200


async def test_chat_stream_is_sse_and_not_buffered(client: httpx.AsyncClient) -> None:
    arrivals: list[tuple[float, dict[str, Any]]] = []
    body = {"conversationId": "c1", "message": "hello"}

    async with client.stream("POST", "/api/chat/stream", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-store"
        async for line in response.aiter_lines():
            if line:
                assert line.startswith("data: ")
                arrivals.append((time.monotonic(), json.loads(line[6:])))

    events = [event for _, event in arrivals]
    assert [e["type"] for e in events] == ["token", "token", "token", "done"]
    assert events[0]["token"] == {"text": "one"}
    assert events[3]["done"]["conversationId"] == "c1"
    assert arrivals[-1][0] - arrivals[0][0] >= 2 * EVENT_GAP_S


async def test_an_error_mid_stream_just_ends_the_stream(
    client: httpx.AsyncClient,
) -> None:
    # Over HTTP/1.1 the gRPC status travels in trailers, which Envoy drops:
    # the stream ends cleanly after the events already sent. That is why a
    # failed chat turn must send an `error` event before it ends.
    body = {"conversationId": "c1", "message": "fail"}

    async with client.stream("POST", "/api/chat/stream", json=body) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines() if line]

    assert [json.loads(line[6:])["type"] for line in lines] == ["token"] * 3


async def test_an_error_before_the_first_event_is_an_http_error(
    client: httpx.AsyncClient,
) -> None:
    body = {"conversationId": "c1", "message": "busy"}

    response = await client.post("/api/chat/stream", json=body)

    assert response.status_code == 429
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": 8, "message": "slow down", "details": []}


async def test_grpc_error_becomes_http_status_with_json(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/api/rag/search", json={"query": "", "limit": 5})

    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["code"], body["message"]) == (3, "query is empty")
    assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert body["details"][0]["reason"] == "EMPTY_QUERY"
    assert response.headers["cache-control"] == "no-store"


async def test_raw_upload_body_reaches_the_service(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/attachments/upload",
        params={"filename": "notes.txt"},
        content=b"hello world",
        headers={"content-type": "text/plain"},
    )

    assert response.status_code == 200
    assert response.json()["filename"] == "notes.txt"
    assert response.json()["contentType"] == "text/plain"
    assert response.json()["sizeBytes"] == "11"


async def test_cors_admits_only_the_frontend(client: httpx.AsyncClient) -> None:
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }

    allowed = await client.options(
        "/api/chat/stream", headers={"origin": FRONTEND, **preflight}
    )
    denied = await client.options(
        "/api/chat/stream", headers={"origin": "http://evil.test", **preflight}
    )
    actual = await client.get("/api/health", headers={"origin": FRONTEND})

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == FRONTEND
    assert "PATCH" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"]
    assert "access-control-allow-origin" not in denied.headers
    assert actual.headers["access-control-allow-origin"] == FRONTEND
    assert actual.headers["access-control-expose-headers"] == "x-request-id"
    assert "x-request-id" in actual.headers


async def test_envoy_own_errors_are_json_too(client: httpx.AsyncClient) -> None:
    unknown = await client.get("/api/nothing-here")
    json_to_grpc_path = await client.post(
        "/janna.v1.ChatService/StreamChat", json={"message": "hi"}
    )
    bad_json = await client.post(
        "/api/rag/search",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )

    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/json"
    assert unknown.json() == {
        "code": 5,
        "message": "no such route",
        "requestId": unknown.headers["x-request-id"],
    }
    assert unknown.headers["cache-control"] == "no-store"
    assert json_to_grpc_path.status_code == 404
    assert bad_json.status_code == 400
    assert bad_json.json()["code"] == 3


async def test_unannotated_methods_are_unreachable(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/janna.v1.ModelGateway/Embed",
        content=b"\x00\x00\x00\x00\x00",
        headers={"content-type": "application/grpc", "te": "trailers"},
    )

    # Envoy answers a gRPC request's 404 the gRPC way: UNIMPLEMENTED.
    assert response.status_code == 200
    assert response.headers["grpc-status"] == str(
        grpc.StatusCode.UNIMPLEMENTED.value[0]
    )


async def test_the_caller_is_named_by_ext_authz_alone(
    client: httpx.AsyncClient,
) -> None:
    spoofed = {
        "x-user-id": "mallory",
        "x-user-email": "mallory@evil.test",
        "x-user-groups": "admin",
    }

    response = await client.get("/api/me", headers=spoofed)

    # The fake authorizer names only the id: the client's email and groups
    # were dropped before it ran, not just overwritten by it.
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "alice"
    assert response.json()["email"] == ""
    assert response.json()["groups"] == []


async def test_refusals_keep_the_authorizer_body(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.url, timeout=10.0) as anonymous:
        response = await anonymous.get("/api/me", headers={"x-user-id": "alice"})

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": 16, "message": "who are you"}
    assert response.headers["cache-control"] == "no-store"


async def test_health_and_unknown_paths_are_neither_checked_nor_counted(
    client: httpx.AsyncClient, fake: FakeService
) -> None:
    checks, counts = len(fake.authorizer.paths), len(fake.limiter.addresses)

    for path in ("/health", "/api/health", "/api/nothing-here"):
        await client.get(path)
    await client.options(
        "/api/me",
        headers={"origin": FRONTEND, "access-control-request-method": "GET"},
    )
    assert fake.authorizer.paths[checks:] == []
    assert fake.limiter.addresses[counts:] == []

    assert (await client.get("/api/me")).status_code == 200
    # Both see the request as it will be routed: by its gRPC method.
    assert fake.authorizer.paths[checks:] == ["/janna.v1.AuthService/GetMe"]
    assert fake.limiter.addresses[counts:] == ["127.0.0.1"]


async def test_over_the_limit_is_429_with_retry_after(
    client: httpx.AsyncClient, fake: FakeService
) -> None:
    fake.limiter.over = True
    try:
        response = await client.get("/api/me")
    finally:
        fake.limiter.over = False

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["code"], body["message"]) == (8, "too many requests")
    assert body["details"][0]["reason"] == "RATE_LIMITED"


async def test_admin_listens_on_loopback_only(edge: Edge) -> None:
    port = edge.settings.admin_port

    async with httpx.AsyncClient(timeout=2.0) as http:
        assert (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
        # A socket bound to 127.0.0.1 refuses the rest of 127.0.0.0/8, while
        # one bound to 0.0.0.0 would accept it.
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.2:{port}/ready")


async def test_a_degraded_mesh_is_503_with_the_report(
    client: httpx.AsyncClient, fake: FakeService
) -> None:
    fake.mesh.down = ["rag"]
    calls = fake.mesh.calls
    try:
        response = await client.get("/health")
    finally:
        fake.mesh.down = []

    assert response.status_code == 503
    body = response.json()
    assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert body["message"] == "unavailable: rag"
    [info, report] = body["details"]
    assert info["reason"] == "SERVICE_DOWN"
    assert report["@type"] == "type.googleapis.com/janna.v1.MeshHealthReport"
    assert report["down"] == ["rag"]
    # Every live service would give the same verdict: not retried.
    assert fake.mesh.calls == calls + 1


async def test_health_fails_when_the_services_are_gone(
    descriptor: Path, tmp_path: Path
) -> None:
    fake = await FakeService.start()
    edge = await _start_envoy(
        _settings(descriptor, fake.port, tmp_path / "a.log"), tmp_path
    )
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=5.0) as http:
            assert (await http.get("/health")).status_code == 200

            await fake.stop()
            deadline = time.monotonic() + 10.0
            response = await http.get("/health")
            while response.status_code != 503 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                response = await http.get("/health")
            # The limit fails open, the check fails closed.
            api = await http.get(
                "/api/me", headers={"authorization": f"Bearer {TOKEN}"}
            )

        assert response.status_code == 503
        assert response.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert api.status_code == 503
        assert api.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert api.json()["details"][0]["reason"] == "AUTH_UNAVAILABLE"
    finally:
        await edge.stop()
        await fake.stop()


async def test_behind_a_trusted_proxy_the_limit_counts_the_client(
    descriptor: Path, tmp_path: Path
) -> None:
    fake = await FakeService.start()
    settings = _settings(descriptor, fake.port, tmp_path / "a.log")
    edge = await _start_envoy(replace(settings, trusted_proxy_hops=1), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=5.0) as http:
            response = await http.get(
                "/api/me",
                headers={
                    "authorization": f"Bearer {TOKEN}",
                    # A client's claim, then what the trusted proxy saw.
                    "x-forwarded-for": "198.51.100.1, 203.0.113.9",
                },
            )

        assert response.status_code == 200
        assert fake.limiter.addresses == ["203.0.113.9"]
    finally:
        await edge.stop()
        await fake.stop()


async def test_mesh_health_skips_a_service_that_just_died(
    descriptor: Path, tmp_path: Path
) -> None:
    chat = await FakeService.start()
    others = await FakeService.start()
    settings = _settings(descriptor, others.port, tmp_path / "a.log")
    upstreams = tuple(
        replace(u, port=chat.port) if u.name == "chat" else u
        for u in settings.upstreams
    )
    edge = await _start_envoy(replace(settings, upstreams=upstreams), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=5.0) as http:
            await others.stop()
            # Until the next health check notices, four of the five mesh
            # endpoints are dead; retrying on other hosts must hide that.
            statuses = [(await http.get("/health")).status_code for _ in range(10)]

        assert statuses == [200] * 10
    finally:
        await edge.stop()
        await chat.stop()
