"""Envoy's configuration for the edge, built from settings and the descriptor set."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from services.runtime import identity
from services.runtime.config import DEFAULT_PORTS, SERVICE_NAMES, ConfigError, Env
from services.runtime.errors import DOMAIN as ERROR_DOMAIN

logger = logging.getLogger(__name__)

SERVICE_OWNERS: dict[str, tuple[str, ...]] = {
    "auth": ("janna.v1.AuthService", "janna.v1.UserAdmin"),
    "gateway": ("janna.v1.ModelGateway", "janna.v1.ModelAdmin"),
    "chat": (
        "janna.v1.ChatService",
        "janna.v1.RateLimitAdmin",
        "janna.v1.MetricsAdmin",
    ),
    "rag": ("janna.v1.RetrievalService",),
    "ingest": ("janna.v1.IngestService", "janna.v1.QueueAdmin"),
}
"""Which proto services each upstream serves: the single source of routing."""

MESH_HEALTH_SERVICE = "janna.v1.MeshHealth"
"""Served by every service, so it goes to the ``mesh`` cluster of all five."""

MESH_CLUSTER = "mesh"

CORS_METHODS = ("GET", "POST", "PATCH", "DELETE", "OPTIONS")
CORS_HEADERS = ("authorization", "content-type")
CORS_EXPOSE = ("x-request-id",)
CORS_MAX_AGE_S = 600

NOT_FOUND = "not_found"
"""The catch-all route, and the absent cluster it names."""

AUTH_CLUSTER = "auth"
"""The upstream that answers ext_authz checks and rate-limit questions."""

RATE_LIMIT_DOMAIN = "janna"
"""The domain the edge's rate-limit questions name; the auth service keys on it."""

OPEN_METHODS = (f"/{MESH_HEALTH_SERVICE}/Check",)
"""gRPC paths neither authorised nor counted against the per-IP limit: the
liveness check (``GET /health`` and ``/api/health``), which load balancers
and the runbook's ``curl -I .../api/health`` ask without credentials."""

CALLER_HEADERS = (identity.USER_ID, identity.USER_EMAIL, identity.USER_GROUPS)
"""Set only by ext_authz; a client's own are dropped before anything reads them."""

EXT_AUTHZ = "envoy.filters.http.ext_authz"
RATE_LIMIT = "envoy.filters.http.ratelimit"

_HTTP2_ONLY = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": (
            "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ),
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


@dataclass(frozen=True)
class Upstream:
    """One service of the mesh as the edge reaches it."""

    name: str
    """Service name: auth, gateway, chat, rag or ingest; also its cluster's name."""
    host: str
    """IP address or DNS name (a container's service name resolves by DNS)."""
    port: int
    """The service's gRPC port."""


@dataclass(frozen=True)
class EdgeSettings:
    """Everything the generated Envoy configuration depends on."""

    descriptor_path: Path
    """``envoy/janna.pb``; written into the config as given, so a relative path
    is resolved against Envoy's working directory."""
    upstreams: tuple[Upstream, ...]
    """One per service of the mesh, each named after its ``SERVICE_OWNERS`` key."""
    listen_host: str = "0.0.0.0"
    """Interface of the public listener (``JANNA_EDGE_HOST``)."""
    listen_port: int = 3001
    """Port of the public listener (``JANNA_EDGE_PORT``)."""
    admin_host: str = "127.0.0.1"
    """Envoy's admin interface can stop the server, so it stays on loopback."""
    admin_port: int = 9901
    """Port of the admin interface (``JANNA_EDGE_ADMIN_PORT``)."""
    frontend_url: str = "http://localhost:3000"
    """The one origin CORS admits (``FRONTEND_URL``)."""
    request_timeout_s: float = 60.0
    """Whole-request timeout of unary routes."""
    stream_idle_timeout_s: float = 300.0
    """Server-streaming routes have no overall timeout, only this idle one."""
    access_log_path: str | None = None
    """Where Envoy writes one line per request; None means its stdout."""
    authz_timeout_s: float = 2.0
    """How long a request waits for the auth service's verdict; then it is 503.
    Generous: missing it refuses a user who may well be entitled."""
    trusted_proxy_hops: int = 0
    """``JANNA_EDGE_TRUSTED_PROXY_HOPS``: proxies in front of the edge (ALB,
    CloudFront) whose ``X-Forwarded-For`` entries are trusted; the client
    address, which the per-IP limit counts, is the one before them. 0 takes
    the peer of the connection itself."""
    max_request_bytes: int = 11 * 1024 * 1024
    """``JANNA_EDGE_MAX_REQUEST_BYTES``: the largest request body the edge
    transcodes; above the direct upload's 10 MiB, so that the ingest service,
    not Envoy, tells an uploader their file is too large."""
    rate_limit_timeout_s: float = 2.0
    """How long a request waits for the per-IP count; then it goes uncounted.
    Generous too: a slow answer means a busy auth service, just when the limit
    matters most. With Redis down the auth service admits at once itself."""

    @classmethod
    def from_env(cls, descriptor_path: Path, env: Env | None = None) -> EdgeSettings:
        env = env or Env()
        upstreams = tuple(
            _upstream(
                name,
                env.text(
                    f"JANNA_{name.upper()}_ADDR", f"127.0.0.1:{DEFAULT_PORTS[name]}"
                ),
            )
            for name in SERVICE_NAMES
        )
        return cls(
            descriptor_path=descriptor_path,
            upstreams=upstreams,
            listen_host=env.text("JANNA_EDGE_HOST", cls.listen_host),
            listen_port=env.integer("JANNA_EDGE_PORT", cls.listen_port),
            admin_port=env.integer("JANNA_EDGE_ADMIN_PORT", cls.admin_port),
            frontend_url=env.text("FRONTEND_URL", cls.frontend_url),
            authz_timeout_s=env.number(
                "JANNA_EDGE_AUTHZ_TIMEOUT_S", cls.authz_timeout_s
            ),
            rate_limit_timeout_s=env.number(
                "JANNA_EDGE_RATE_LIMIT_TIMEOUT_S", cls.rate_limit_timeout_s
            ),
            trusted_proxy_hops=env.integer(
                "JANNA_EDGE_TRUSTED_PROXY_HOPS", cls.trusted_proxy_hops
            ),
            max_request_bytes=env.integer(
                "JANNA_EDGE_MAX_REQUEST_BYTES", cls.max_request_bytes
            ),
        )


@dataclass(frozen=True)
class _HttpMethod:
    """A gRPC method that has a ``google.api.http`` binding, so the edge serves it."""

    service: str
    """Full service name, ``janna.v1.ChatService``."""
    name: str
    """Method name, ``StreamChat``."""
    server_streaming: bool
    """Answered as Server-Sent Events, so its route has only an idle timeout."""

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.name}"


def _http_methods(files: descriptor_pb2.FileDescriptorSet) -> tuple[_HttpMethod, ...]:
    return tuple(
        _HttpMethod(
            service=f"{file.package}.{service.name}",
            name=method.name,
            server_streaming=method.server_streaming,
        )
        for file in files.file
        for service in file.service
        for method in service.method
        if method.options.HasExtension(annotations_pb2.http)
    )


def build_config(settings: EdgeSettings) -> dict[str, Any]:
    """Envoy's bootstrap: the public listener, one cluster per upstream, admin."""
    files = descriptor_pb2.FileDescriptorSet.FromString(
        settings.descriptor_path.read_bytes()
    )
    methods = _http_methods(files)
    owners = _cluster_of_service(settings.upstreams)
    _check_owners(files, methods, owners)
    logger.debug("edge: %d HTTP-bound methods routed", len(methods))

    return {
        "admin": {"address": _address(settings.admin_host, settings.admin_port)},
        "static_resources": {
            "listeners": [_listener(settings, methods, owners)],
            "clusters": [
                *(_cluster(u.name, [u]) for u in settings.upstreams),
                _cluster(MESH_CLUSTER, settings.upstreams),
            ],
        },
    }


def render(settings: EdgeSettings) -> str:
    """The configuration as YAML text, ready for ``envoy -c``."""
    header = "# Generated by `python -m services.edge`; edit services/edge instead.\n"
    return header + yaml.safe_dump(build_config(settings), sort_keys=False)


def http_filters(settings: EdgeSettings, services: Iterable[str]) -> list[Any]:
    """The HTTP filter chain, in the order a request passes it.

    CORS comes first so that a preflight is answered before anything asks for
    credentials. The transcoder then turns a JSON request into gRPC and
    re-routes it by its gRPC path, so the two checks after it see the route
    that will really be taken: the per-IP ``ratelimit`` (which skips routes
    without a real cluster, such as the 404 catch-all) and then ``ext_authz``,
    which decides on the gRPC method, however the HTTP path was spelt. The
    limit comes first so that a flood of made-up tokens is refused like any
    other flood instead of costing a token check each. The router is last.
    """
    return [
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {
                "@type": (
                    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                )
            },
        },
        _transcoder(settings, services),
        _rate_limit(settings),
        _ext_authz(settings),
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": (
                    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                )
            },
        },
    ]


def _ext_authz(settings: EdgeSettings) -> dict[str, Any]:
    return {
        "name": EXT_AUTHZ,
        "typed_config": {
            "@type": (
                "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
            ),
            "grpc_service": {
                "envoy_grpc": {"cluster_name": AUTH_CLUSTER},
                "timeout": _duration(settings.authz_timeout_s),
            },
            "transport_api_version": "V3",
            # No verdict is a refusal: an unreachable, failing or slow auth
            # service answers 503, and never lets a request through.
            "failure_mode_allow": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            # The check needs only the credentials, and the request's id for
            # its log lines and refusals; the (gRPC) method and path travel in
            # their own fields.
            "allowed_headers": {
                "patterns": [{"exact": "authorization"}, {"exact": "x-request-id"}]
            },
        },
    }


def _rate_limit(settings: EdgeSettings) -> dict[str, Any]:
    return {
        "name": RATE_LIMIT,
        "typed_config": {
            "@type": (
                "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3"
                ".RateLimit"
            ),
            "domain": RATE_LIMIT_DOMAIN,
            "timeout": _duration(settings.rate_limit_timeout_s),
            # The limit protects capacity, not secrets: when it cannot be
            # counted the request goes on (the chat limit still guards models).
            "failure_mode_deny": False,
            # gRPC clients get RESOURCE_EXHAUSTED, not UNAVAILABLE.
            "rate_limited_as_resource_exhausted": True,
            "rate_limit_service": {
                "grpc_service": {"envoy_grpc": {"cluster_name": AUTH_CLUSTER}},
                "transport_api_version": "V3",
            },
        },
    }


def _upstream(name: str, address: str) -> Upstream:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"JANNA_{name.upper()}_ADDR must be host:port, got {address!r}"
        )
    return Upstream(name=name, host=host.strip("[]"), port=int(port))


def _cluster_of_service(upstreams: Iterable[Upstream]) -> dict[str, str]:
    names = {u.name for u in upstreams}
    if names != set(SERVICE_OWNERS):
        raise ConfigError(
            f"upstreams must be exactly {sorted(SERVICE_OWNERS)}, got {sorted(names)}"
        )
    owners = {
        service: upstream
        for upstream, services in SERVICE_OWNERS.items()
        for service in services
    }
    owners[MESH_HEALTH_SERVICE] = MESH_CLUSTER
    return owners


def _check_owners(
    files: descriptor_pb2.FileDescriptorSet,
    methods: Iterable[_HttpMethod],
    owners: Mapping[str, str],
) -> None:
    # A new service with HTTP bindings but no owner would otherwise be
    # silently unreachable, and an owned service missing from the descriptor
    # set would only fail once Envoy starts.
    unowned = sorted({m.service for m in methods} - set(owners))
    if unowned:
        raise ConfigError(f"services with HTTP bindings but no owner: {unowned}")
    declared = {f"{f.package}.{s.name}" for f in files.file for s in f.service}
    missing = sorted(set(owners) - declared)
    if missing:
        raise ConfigError(f"the descriptor set lacks services: {missing}")


def _listener(
    settings: EdgeSettings, methods: Iterable[_HttpMethod], owners: Mapping[str, str]
) -> dict[str, Any]:
    manager = {
        "@type": (
            "type.googleapis.com/envoy.extensions.filters.network"
            ".http_connection_manager.v3.HttpConnectionManager"
        ),
        "stat_prefix": "edge",
        "codec_type": "AUTO",
        # The edge is the first hop it trusts: the peer address, or the one
        # the trusted proxies in front of it name, is the client's, which the
        # per-IP rate limit keys on. A client's own X-Forwarded-For is not.
        "use_remote_address": True,
        "xff_num_trusted_hops": settings.trusted_proxy_hops,
        # Routes match exact paths, and authorization will too: "/a//b" and
        # "/a/./b" must not slip past them.
        "normalize_path": True,
        "merge_slashes": True,
        "always_set_request_id_in_response": True,
        # Applies to every stream; a chat answer may pause for a slow model.
        "stream_idle_timeout": _duration(settings.stream_idle_timeout_s),
        # Before routing and every filter: only ext_authz may name the caller.
        "early_header_mutation_extensions": [_drop_caller_headers()],
        "access_log": [_access_log(settings.access_log_path)],
        "local_reply_config": _local_reply_config(),
        "route_config": _route_config(settings, methods, owners),
        "http_filters": http_filters(settings, list(owners)),
    }
    return {
        "name": "edge",
        "address": _address(settings.listen_host, settings.listen_port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }


def _drop_caller_headers() -> dict[str, Any]:
    return {
        "name": "envoy.http.early_header_mutation.header_mutation",
        "typed_config": {
            "@type": (
                "type.googleapis.com/envoy.extensions.http.early_header_mutation"
                ".header_mutation.v3.HeaderMutation"
            ),
            "mutations": [{"remove": name} for name in CALLER_HEADERS],
        },
    }


def _local_reply_config() -> dict[str, Any]:
    # Clients should meet one error shape, the transcoder's google.rpc.Status
    # JSON, also when Envoy answers itself. Only these cases are rewritten, not
    # every local reply: ext_authz's 401 and 403 carry the auth service's own
    # bodies, already in that shape.
    no_upstream = ["UH", "UF", "UO", "URX", "UC"]
    # (access-log filter, gRPC code, message, reason); a None message keeps
    # Envoy's, a None reason adds no ErrorInfo.
    errors: list[tuple[dict[str, Any], int, str | None, str | None]] = [
        ({"response_flag_filter": {"flags": ["NC"]}}, 5, "no such route", None),
        ({"response_flag_filter": {"flags": no_upstream}}, 14, None, None),
        ({"response_flag_filter": {"flags": ["UT"]}}, 4, None, None),
        # The per-IP limit; the auth service adds Retry-After.
        (
            {"response_flag_filter": {"flags": ["RL"]}},
            8,
            "too many requests",
            "RATE_LIMITED",
        ),
        # No verdict from the auth service (down, failing or too slow).
        (
            {
                "and_filter": {
                    "filters": [
                        {"response_flag_filter": {"flags": ["UAEX"]}},
                        {"status_code_filter": _status_is(503)},
                    ]
                }
            },
            14,
            "authentication is unavailable",
            "AUTH_UNAVAILABLE",
        ),
        # The transcoder's: a body that is not JSON, or one that is too big.
        ({"status_code_filter": _status_is(400)}, 3, None, None),
        ({"status_code_filter": _status_is(413)}, 8, None, None),
    ]
    mappers = []
    for access_filter, code, message, reason in errors:
        body: dict[str, Any] = {
            "code": code,
            "message": "%LOCAL_REPLY_BODY%",
            # The id an operator greps the logs for, as in services' errors.
            "requestId": "%REQ(X-REQUEST-ID)%",
        }
        if reason is not None:
            body["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": reason,
                    "domain": ERROR_DOMAIN,
                }
            ]
        mapper: dict[str, Any] = {
            "filter": access_filter,
            "body_format_override": {
                "json_format": body,
                "content_type": "application/json",
            },
        }
        if message is not None:
            mapper["body"] = {"inline_string": message}
        mappers.append(mapper)
    return {"mappers": mappers}


def _transcoder(settings: EdgeSettings, services: Iterable[str]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": (
                "type.googleapis.com/envoy.extensions.filters.http"
                ".grpc_json_transcoder.v3.GrpcJsonTranscoder"
            ),
            "proto_descriptor": str(settings.descriptor_path),
            "services": sorted(services),
            # A gRPC error becomes its HTTP status with a google.rpc.Status
            # JSON body, instead of 200 with the status hidden in headers.
            "convert_grpc_status": True,
            # Browsers and caches add query parameters of their own; without
            # this such a request is not transcoded at all and ends in 404.
            "ignore_unknown_query_parameters": True,
            "max_request_body_size": settings.max_request_bytes,
            "print_options": {
                "always_print_primitive_fields": True,
                # Each streamed message becomes "data: {...}\n\n", and the
                # response text/event-stream.
                "stream_sse_style_delimited": True,
            },
        },
    }


def _route_config(
    settings: EdgeSettings, methods: Iterable[_HttpMethod], owners: Mapping[str, str]
) -> dict[str, Any]:
    # The transcoder rewrites the path to the gRPC one and clears the route
    # cache, so routes match gRPC paths. `grpc: {}` keeps a JSON body sent
    # straight to a gRPC path from reaching a service untranscoded.
    routes: list[dict[str, Any]] = [
        {
            "name": method.grpc_path,
            "match": {"path": method.grpc_path, "grpc": {}},
            "route": _route_action(settings, method, owners[method.service]),
        }
        for method in methods
    ]
    for route in routes:
        if route["name"] in OPEN_METHODS:
            route["typed_per_filter_config"] = _open_route()
    # Everything else, including the HTTP path a request has before it is
    # transcoded, which is what the CORS filter sees. The CORS filter applies
    # its policy only on a forwarding route (never on a direct response), and
    # a preflight is never transcoded, so this must be one: to a cluster that
    # does not exist, which the router answers with 404.
    # It forwards nothing, so neither ext_authz nor the limit need asking:
    # an unknown path is 404 for everyone, and so is a preflight from
    # another origin (the CORS filter answered the frontend's own).
    routes.append(
        {
            "name": NOT_FOUND,
            "match": {"prefix": "/"},
            "route": {
                "cluster": NOT_FOUND,
                "cluster_not_found_response_code": "NOT_FOUND",
            },
            "typed_per_filter_config": _open_route(),
        }
    )
    return {
        "name": "edge",
        # The catch-all route names a cluster that is deliberately absent;
        # build_config checks the others itself.
        "validate_clusters": False,
        "virtual_hosts": [
            {
                "name": "janna",
                "domains": ["*"],
                "routes": routes,
                # Proxies between here and the browser (CloudFront, nginx)
                # must neither cache nor buffer API answers, SSE above all.
                "response_headers_to_add": [
                    _header("cache-control", "no-store"),
                    _header("x-accel-buffering", "no"),
                ],
                "typed_per_filter_config": {
                    "envoy.filters.http.cors": _cors_policy(settings.frontend_url)
                },
                # One count per client address; with use_remote_address that
                # is the peer's, which a client cannot forge in a header.
                "rate_limits": [{"actions": [{"remote_address": {}}]}],
            }
        ],
    }


def _open_route() -> dict[str, Any]:
    return {
        EXT_AUTHZ: {
            "@type": (
                "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3"
                ".ExtAuthzPerRoute"
            ),
            "disabled": True,
        },
        RATE_LIMIT: {
            "@type": (
                "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3"
                ".RateLimitPerRoute"
            ),
            "vh_rate_limits": "IGNORE",
        },
    }


def _route_action(
    settings: EdgeSettings, method: _HttpMethod, cluster: str
) -> dict[str, Any]:
    if method.server_streaming:
        action: dict[str, Any] = {
            "cluster": cluster,
            "timeout": "0s",
            "idle_timeout": _duration(settings.stream_idle_timeout_s),
        }
    else:
        action = {"cluster": cluster, "timeout": _duration(settings.request_timeout_s)}
    if cluster == MESH_CLUSTER:
        action["retry_policy"] = _mesh_retry_policy(len(settings.upstreams))
    return action


def _mesh_retry_policy(endpoints: int) -> dict[str, Any]:
    # Any live service can answer, so an endpoint that died since the last
    # health check is skipped by asking the next one, each at most once.
    # UNAVAILABLE is not retried: it is MeshHealth's verdict that a service is
    # down, which every other service would repeat after checking its peers.
    return {
        "retry_on": "connect-failure,refused-stream,reset",
        "num_retries": endpoints - 1,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": (
                        "type.googleapis.com/envoy.extensions.retry.host"
                        ".previous_hosts.v3.PreviousHostsPredicate"
                    )
                },
            }
        ],
        "host_selection_retry_max_attempts": 2 * endpoints,
    }


def _cors_policy(frontend_url: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": frontend_url}],
        "allow_methods": ", ".join(CORS_METHODS),
        "allow_headers": ", ".join(CORS_HEADERS),
        "expose_headers": ", ".join(CORS_EXPOSE),
        "max_age": str(CORS_MAX_AGE_S),
    }


def _cluster(name: str, upstreams: Iterable[Upstream]) -> dict[str, Any]:
    upstreams = list(upstreams)
    # STATIC needs IP literals; container addresses are DNS names, and
    # STRICT_DNS keeps every resolved address as an endpoint so that each
    # replica is health-checked on its own.
    dns = not all(_is_ip(u.host) for u in upstreams)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": _HTTP2_ONLY,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": _address(u.host, u.port)}}
                        for u in upstreams
                    ]
                }
            ],
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "2s",
                # One answer either way: a restarted service is back within
                # one interval, a stopped one out within one.
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                # Idle clusters (admin services) are otherwise checked only
                # once a minute, and would answer stale health.
                "no_traffic_interval": "2s",
                "grpc_health_check": {},
            }
        ],
        # Without this, a cluster with every host unhealthy sends traffic to
        # all of them anyway ("panic"); the mesh must skip a dead endpoint.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
    }
    if dns:
        # "localhost" may resolve to ::1 first while services bind IPv4.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    return cluster


def _access_log(path: str | None) -> dict[str, Any]:
    if path is None:
        return {
            "name": "envoy.access_loggers.stdout",
            "typed_config": {
                "@type": (
                    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3"
                    ".StdoutAccessLog"
                )
            },
        }
    return {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": (
                "type.googleapis.com/envoy.extensions.access_loggers.file.v3"
                ".FileAccessLog"
            ),
            "path": path,
        },
    }


def _status_is(code: int) -> dict[str, Any]:
    return {
        "comparison": {
            "op": "EQ",
            "value": {"default_value": code, "runtime_key": f"edge.status_{code}"},
        }
    }


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _header(key: str, value: str) -> dict[str, Any]:
    return {
        "header": {"key": key, "value": value},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _duration(seconds: float) -> str:
    # protobuf's JSON Duration: decimal seconds, at most nine fractional digits.
    text = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{text}s"
