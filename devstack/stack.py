"""The whole product on one machine: backing stores, five services, Envoy.

:class:`Stack` is what ``make run`` starts and what the tests start on free
ports. It starts the embedded Postgres, Valkey and S3/SQS endpoint
(:mod:`devstack.infra`), applies migrations once, starts each service as its
own process (``python -m services.NAME``) with every address in its
environment, then the ingest worker (``python -m services.ingest.worker``,
one process by default), writes and starts Envoy's config, and waits until the edge's
``/health`` answers 200. :meth:`Stack.stop` stops everything it started, in
the reverse order, and leaves no process behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.infra import Infra, InfraAddresses, InfraSettings, free_port
from services.edge.config import EdgeSettings, Upstream, render
from services.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, SERVICE_NAMES

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DESCRIPTOR = ROOT / "envoy" / "janna.pb"
WORKER_METRICS_PORT = 9106
"""The first ingest worker's Prometheus port under ``make run``; then 9107, …"""


class StackError(RuntimeError):
    """A part of the stack did not start."""


@dataclass(frozen=True)
class StackSettings:
    """Where the stack keeps its files and which ports it uses (0 = any free)."""

    root: Path
    """Data, logs and generated config live below it (``.janna`` for make run)."""
    edge_port: int = 3001
    edge_admin_port: int = 9901
    service_ports: Mapping[str, int] = field(
        default_factory=lambda: dict(DEFAULT_PORTS)
    )
    postgres_port: int = 0
    redis_port: int = 0
    aws_port: int = 0
    sqs_visibility_timeout_s: int = 60
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for every service (it wins over the defaults)."""
    ingest_workers: int = 1
    """How many ingest worker processes to start; each polls the queue."""
    start_timeout_s: float = 60.0

    @property
    def logs(self) -> Path:
        return self.root / "logs"


class Stack:
    """Starts and stops every process of the embedded product."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.infra = Infra(
            InfraSettings(
                data_dir=settings.root,
                postgres_port=settings.postgres_port,
                redis_port=settings.redis_port,
                aws_port=settings.aws_port,
                sqs_visibility_timeout_s=settings.sqs_visibility_timeout_s,
            )
        )
        self.addresses: InfraAddresses | None = None
        self.ports = {
            name: port or free_port() for name, port in settings.service_ports.items()
        }
        # Services on their usual ports get their usual metrics ports too.
        self.metrics_ports = {
            name: DEFAULT_METRICS_PORTS[name]
            if port == DEFAULT_PORTS.get(name)
            else free_port()
            for name, port in settings.service_ports.items()
        }
        # Workers serve only metrics: 9106 on, or free ports beside free ones.
        usual = settings.service_ports.get("ingest") == DEFAULT_PORTS["ingest"]
        self.worker_metrics_ports = [
            WORKER_METRICS_PORT + index if usual else free_port()
            for index in range(settings.ingest_workers)
        ]
        self.edge_port = settings.edge_port or free_port()
        self.edge_admin_port = settings.edge_admin_port or free_port()
        self.services: dict[str, subprocess.Popen[bytes]] = {}
        self.workers: list[subprocess.Popen[bytes]] = []
        self.envoy: subprocess.Popen[bytes] | None = None

    @property
    def edge_url(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}"

    def service_env(self) -> dict[str, str]:
        """The environment every service process gets."""
        if self.addresses is None:
            raise StackError("the backing stores are not started")
        env = {
            key: value
            for key, value in os.environ.items()
            # A developer's shell may point at other servers; the stack's win.
            if not key.startswith(("JANNA_", "AWS_", "SQS_", "S3_"))
        }
        env.update(self.addresses.as_env())
        env.update(
            {
                "JANNA_ENV": "development",
                "JANNA_DEV_ADMINS": "admin",
                "JANNA_DATA_DIR": str(self.settings.root / "data"),
                "JANNA_GRPC_HOST": "127.0.0.1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        for name, port in self.ports.items():
            env[f"JANNA_{name.upper()}_PORT"] = str(port)
            env[f"JANNA_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
            env[f"JANNA_{name.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
            env[f"JANNA_{name.upper()}_METRICS_ADDR"] = (
                f"127.0.0.1:{self.metrics_ports[name]}"
            )
        env["JANNA_INGEST_WORKER_METRICS_ADDR"] = ",".join(
            f"127.0.0.1:{port}" for port in self.worker_metrics_ports
        )
        # A worker a test starts from this environment takes any free port;
        # the stack's own are given theirs by start_worker.
        env["JANNA_INGEST_WORKER_METRICS_PORT"] = "0"
        env.update(self.settings.env)
        return env

    def start(self) -> None:
        """Starts everything and returns once ``/health`` is 200."""
        self.settings.logs.mkdir(parents=True, exist_ok=True)
        try:
            self.addresses = self.infra.start()
            self._migrate()
            for name in SERVICE_NAMES:
                self.start_service(name)
            for index in range(self.settings.ingest_workers):
                self.start_worker(index)
            self._start_envoy()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _migrate(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "services.runtime.migrate"],
            env=self.service_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        (self.settings.logs / "migrate.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise StackError(f"migrations failed:\n{result.stderr.strip()}")

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        """Starts (or restarts) one service's process."""
        log = open(self.settings.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            env=self.service_env(),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.services[name] = process
        return process

    def start_worker(self, index: int = 0) -> subprocess.Popen[bytes]:
        """Starts (or restarts) ingest worker ``index``."""
        log = open(self.settings.logs / f"ingest-worker-{index}.log", "ab")
        while index >= len(self.worker_metrics_ports):
            self.worker_metrics_ports.append(free_port())
        env = self.service_env()
        env["JANNA_INGEST_WORKER_METRICS_PORT"] = str(self.worker_metrics_ports[index])
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ingest.worker"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if index < len(self.workers):
            self.workers[index] = process
        else:
            self.workers.append(process)
        return process

    def stop_worker(
        self, index: int = 0, sig: int = signal.SIGTERM, timeout: float = 15.0
    ) -> int:
        """Stops ingest worker ``index``; returns its exit status."""
        return _stop(self.workers[index], sig, timeout)

    def stop_service(
        self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0
    ) -> int:
        """Stops one service; returns its exit status."""
        return _stop(self.services[name], sig, timeout)

    def edge_settings(self) -> EdgeSettings:
        return EdgeSettings(
            descriptor_path=DESCRIPTOR,
            upstreams=tuple(
                Upstream(name=name, host="127.0.0.1", port=self.ports[name])
                for name in SERVICE_NAMES
            ),
            listen_host="127.0.0.1",
            listen_port=self.edge_port,
            admin_port=self.edge_admin_port,
            frontend_url=self.settings.env.get("FRONTEND_URL", "http://localhost:3000"),
        )

    def _start_envoy(self) -> None:
        config = self.settings.root / "envoy.yaml"
        config.write_text(render(self.edge_settings()))
        log = open(self.settings.logs / "envoy.log", "ab")
        self.envoy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "envoy"),
                "-c",
                str(config),
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def health(self) -> tuple[int, str]:
        """The edge's ``/health`` status and body (0 when the edge is not up)."""
        try:
            with urllib.request.urlopen(f"{self.edge_url}/health", timeout=3) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def wait_healthy(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.settings.start_timeout_s)
        status, body = 0, ""
        while time.monotonic() < deadline:
            self._check_alive()
            status, body = self.health()
            if status == 200 and self._edge_clusters_healthy():
                return
            time.sleep(0.2)
        raise StackError(f"/health did not answer 200 in time: {status} {body}")

    def _edge_clusters_healthy(self) -> bool:
        """Whether Envoy's own health checks have admitted every upstream.

        ``/health`` answering proves one path through the edge; the other
        clusters are admitted by their first health check a moment later,
        and until then their routes answer "no healthy upstream".
        """
        url = f"http://127.0.0.1:{self.edge_admin_port}/clusters?format=json"
        try:
            with urllib.request.urlopen(url, timeout=3) as reply:
                clusters = json.load(reply)["cluster_statuses"]
        except (OSError, ValueError, KeyError):
            return False
        return all(
            not any(key.startswith("failed") for key in host["health_status"])
            for cluster in clusters
            for host in cluster.get("host_statuses", [])
        )

    def _check_alive(self) -> None:
        workers = [(f"ingest-worker-{i}", p) for i, p in enumerate(self.workers)]
        for name, process in [
            *self.services.items(),
            *workers,
            ("envoy", self.envoy),
        ]:
            if process is not None and process.poll() is not None:
                log = self.settings.logs / f"{name}.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise StackError(f"{name} exited with {process.returncode}:\n{tail}")

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """Every process the stack started, backing stores included."""
        own = [
            *self.services.values(),
            *self.workers,
            *([self.envoy] if self.envoy else []),
        ]
        return [*own, *self.infra.processes]

    def stop(self) -> None:
        """Stops Envoy, then the services and workers, then the backing stores."""
        if self.envoy is not None and self.envoy.poll() is None:
            self.envoy.terminate()
            try:
                self.envoy.wait(10)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                self.envoy.wait()
        for process in [*self.services.values(), *self.workers]:
            if process.poll() is None:
                process.terminate()
        for name in list(self.services):
            self.stop_service(name)
        for index in range(len(self.workers)):
            self.stop_worker(index)
        self.infra.stop()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def _stop(process: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
