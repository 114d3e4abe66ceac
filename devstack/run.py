"""``make run``: start the whole product on this machine and keep it running.

One instance at a time: a second ``make run`` finds the lock held and says so.
Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from devstack.stack import ROOT, Stack, StackError, StackSettings
from services.runtime.config import DEFAULT_PORTS, ConfigError, Env

logger = logging.getLogger(__name__)

# JANNA_STACK_DIR moves the whole stack's files (data, logs, lock) elsewhere.
DATA_ROOT = Path(os.environ.get("JANNA_STACK_DIR", ROOT / ".janna")).resolve()

# Every JANNA_* setting a developer exports before `make run` reaches the
# services (JANNA_MODEL_ROUTES, JANNA_LOCAL_BASE_URL, ...), except these,
# which the stack decides: where things are, and development mode.
STACK_OWNED = ("JANNA_STACK_DIR", "JANNA_ENV", "JANNA_DATA_DIR", "JANNA_GRPC_HOST")
STACK_OWNED_SUFFIXES = ("_PORT", "_ADDR")


def passed_through(environ: Mapping[str, str]) -> dict[str, str]:
    """The developer's own settings, for every service."""
    return {
        key: value
        for key, value in environ.items()
        if key.startswith("JANNA_")
        and key not in STACK_OWNED
        and not key.endswith(STACK_OWNED_SUFFIXES)
    }


def ports(env: Env) -> dict[str, int]:
    """The edge's and services' ports: JANNA_EDGE_PORT, JANNA_CHAT_PORT, ...
    when exported, else the usual ones."""
    found = {
        "edge": env.integer("JANNA_EDGE_PORT", StackSettings.edge_port),
        "edge_admin": env.integer(
            "JANNA_EDGE_ADMIN_PORT", StackSettings.edge_admin_port
        ),
    }
    for name, port in DEFAULT_PORTS.items():
        found[name] = env.integer(f"JANNA_{name.upper()}_PORT", port)
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _usual_or_any(port: int) -> int:
    """``port`` when it is free, else 0 (any free port)."""
    return port if _port_free(port) else 0


def _banner(stack: Stack) -> str:
    url = stack.edge_url.replace("127.0.0.1", "localhost")
    return f"""
Janna is running at {url}

  curl -H "Authorization: Bearer dev:u1:test@dev.local" {url}/api/me
  curl {url}/health

  data:      {DATA_ROOT}
  logs:      {stack.settings.logs}/  (one file a process)
  addresses: source {DATA_ROOT / "stack.env"}
             then psql "$DATABASE_URL", redis-cli -u "$REDIS_URL"

Ctrl-C stops everything.
"""


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    DATA_ROOT.mkdir(exist_ok=True)
    lock = open(DATA_ROOT / "run.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        pid = lock.read().strip() or "unknown"
        print(
            f"Janna is already running (pid {pid}); stop it with Ctrl-C in its "
            f"terminal or `kill {pid}`.",
            file=sys.stderr,
        )
        return 1
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()

    # The stores take their usual ports when they are free, so that the
    # runbook's `redis-cli` and `psql` lines work without flags.
    try:
        chosen = ports(Env(os.environ))
    except ConfigError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    settings = StackSettings(
        root=DATA_ROOT,
        env=passed_through(os.environ),
        edge_port=chosen["edge"],
        edge_admin_port=chosen["edge_admin"],
        service_ports={name: chosen[name] for name in DEFAULT_PORTS},
        postgres_port=_usual_or_any(5432),
        redis_port=_usual_or_any(6379),
        aws_port=_usual_or_any(4566),
    )
    busy = [
        port
        for port in (settings.edge_port, *settings.service_ports.values())
        if not _port_free(port)
    ]
    if busy:
        print(
            f"cannot start: ports {busy} are in use by another program", file=sys.stderr
        )
        return 1

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    stack = Stack(settings)
    print(
        "starting Janna (the first start installs the database; later ones are quick)"
    )
    try:
        stack.start()
    except StackError as exc:
        print(f"Janna did not start: {exc}", file=sys.stderr)
        return 1
    assert stack.addresses is not None
    env_file = DATA_ROOT / "stack.env"
    env_file.write_text(
        stack.addresses.shell_lines() + f"EDGE_URL='{stack.edge_url}'\n"
    )
    print(_banner(stack), flush=True)

    reported: set[str] = set()
    try:
        while not stop.wait(1.0):
            for name, process in stack.services.items():
                if process.poll() is not None and name not in reported:
                    reported.add(name)
                    logger.warning(
                        "%s exited with %s; see %s",
                        name,
                        process.returncode,
                        Path(settings.logs) / f"{name}.log",
                    )
    finally:
        print("stopping Janna ...", flush=True)
        stack.stop()
        print("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
