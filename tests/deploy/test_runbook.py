"""docs/RUNBOOK.md's local commands, run as written against the embedded stack.

A block of the runbook that works against ``make run`` is marked with an HTML
comment right above its fence::

    <!-- runbook:local expect="REGEX" -->
    ```sh
    ...
    ```

and the one ``<!-- runbook:setup -->`` block (loading ``.janna/stack.env``)
runs before each of them. Each block runs in ``bash -e`` from the repository
root and must exit 0 with a standard output that ``REGEX`` is found in (a
block without ``expect`` need only exit 0). The blocks run in the runbook's
order against one stack, as an operator would run them one after the other.

What ``make run`` fixes and the test stack does not is substituted first: the
edge's ``http://localhost:3001``, Envoy's admin ``localhost:9901``, the
services' ``localhost:50051`` … ``50055``, ``.janna/stack.env`` and
``.janna/logs/``; and the placeholders ``USER_ID`` (``u1``, the user of the
runbook's dev token) and ``ATTACHMENT_ID`` (a document the fixture uploads).

The runbook's tools are the operator's: ``curl``, ``jq``, ``psql``, ``aws``
and ``redis-cli`` (Debian's ``redis-tools``) must be on the PATH; a missing
one fails the test rather than skipping it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devstack.stack import Stack
from services.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS
from tests.deploy.drift import ROOT

RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
TOOLS = {
    "curl": "apt-get install curl",
    "jq": "apt-get install jq",
    "psql": "apt-get install postgresql-client",
    "redis-cli": "apt-get install redis-tools",
    "aws": "pip install awscli (or AWS CLI v2)",
}
USER = "u1"
USER_HEADERS = {"authorization": f"Bearer dev:{USER}:test@dev.local"}
ADMIN_HEADERS = {"authorization": "Bearer dev:admin:admin@dev.local"}
PLACEHOLDERS = ("USER_ID", "ATTACHMENT_ID")
BLOCK_TIMEOUT_S = 120
INGEST_TIMEOUT_S = 180

_MARKED = re.compile(
    r"<!-- runbook:(?P<kind>local|setup)(?P<attrs>[^>]*?)-->\s*\n"
    r"```sh\n(?P<code>.*?)\n```",
    re.S,
)
_EXPECT = re.compile(r'expect="(?P<regex>(?:[^"\\]|\\.)*)"')
_UNMAPPED = re.compile(r"localhost:(3001|9901|5005\d|910\d)|\.janna/")


@dataclass(frozen=True)
class Block:
    """One marked shell block of the runbook."""

    section: str
    line: int
    code: str
    expect: str | None

    @property
    def id(self) -> str:
        number = self.section.split(".")[0]
        return f"s{number}-line{self.line}"


def _parse() -> tuple[str, list[Block]]:
    text = RUNBOOK.read_text()
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"(?m)^## (.+)$", text)]
    setup: list[str] = []
    blocks = []
    for match in _MARKED.finditer(text):
        if match.group("kind") == "setup":
            setup.append(match.group("code"))
            continue
        expect = _EXPECT.search(match.group("attrs"))
        section = [title for start, title in headings if start < match.start()][-1]
        blocks.append(
            Block(
                section=section,
                line=text.count("\n", 0, match.start("code")) + 1,
                code=match.group("code"),
                expect=expect.group("regex").replace('\\"', '"') if expect else None,
            )
        )
    assert len(setup) == 1, "the runbook needs one <!-- runbook:setup --> block"
    return setup[0], blocks


SETUP, BLOCKS = _parse()


@dataclass(frozen=True)
class Operator:
    """What the blocks run with: the stack's addresses and real ids."""

    stack: Stack
    env_file: Path
    environ: dict[str, str]
    attachment_id: str | None
    attachment_error: str

    def substitute(self, code: str) -> str:
        stack = self.stack
        code = code.replace("http://localhost:3001", stack.edge_url)
        code = code.replace("localhost:9901", f"127.0.0.1:{stack.edge_admin_port}")
        for name, port in DEFAULT_PORTS.items():
            code = code.replace(f"localhost:{port}", f"127.0.0.1:{stack.ports[name]}")
        for name, port in DEFAULT_METRICS_PORTS.items():
            code = code.replace(
                f"localhost:{port}", f"127.0.0.1:{stack.metrics_ports[name]}"
            )
        code = code.replace(".janna/stack.env", str(self.env_file))
        code = code.replace(".janna/logs/", f"{stack.settings.logs}/")
        code = code.replace("USER_ID", USER)
        if self.attachment_id is not None:
            code = code.replace("ATTACHMENT_ID", self.attachment_id)
        return code


def _missing_tools() -> list[str]:
    return [
        f"{tool} ({hint})" for tool, hint in TOOLS.items() if not shutil.which(tool)
    ]


def _upload(stack: Stack) -> tuple[str | None, str]:
    """A small document of u1's, processed; its id, or None and why not."""
    text = (
        "Janna runbook check.\n"
        "The ingestion pipeline turns this file into chunks with embeddings,\n"
        "so that a test query finds it and a chat answer can cite it.\n"
    )
    try:
        with httpx.Client(base_url=stack.edge_url, timeout=30) as client:
            reply = client.post(
                "/api/attachments/upload",
                params={"filename": "runbook-check.txt"},
                content=text.encode(),
                headers={**USER_HEADERS, "content-type": "text/plain"},
            )
            if reply.status_code != 200:
                return None, f"upload answered {reply.status_code}: {reply.text}"
            attachment_id = str(reply.json()["id"])
            deadline = time.monotonic() + INGEST_TIMEOUT_S
            status = ""
            while time.monotonic() < deadline:
                status = client.get(
                    f"/api/attachments/{attachment_id}", headers=USER_HEADERS
                ).json()["status"]
                if status in ("ready", "error"):
                    break
                time.sleep(1)
            if status != "ready":
                return None, f"attachment {attachment_id} is {status!r}, not ready"
            return attachment_id, ""
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        return None, f"upload failed: {exc!r}"


@pytest.fixture(scope="module")
def operator(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Operator]:
    missing = _missing_tools()
    if missing:
        pytest.fail(
            "the runbook's commands need these tools on the PATH: " + ", ".join(missing)
        )
    assert stack.addresses is not None
    env_file = tmp_path_factory.mktemp("runbook") / "stack.env"
    env_file.write_text(
        stack.addresses.shell_lines() + f"EDGE_URL='{stack.edge_url}'\n"
    )
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JANNA_", "AWS_", "SQS_", "S3_", "PG"))
        and key not in ("DATABASE_URL", "REDIS_URL")
    }
    # An operator's own AWS profile must not reach the local endpoint.
    environ["AWS_CONFIG_FILE"] = os.devnull
    environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    environ["AWS_PAGER"] = ""
    # The stack is shared with other tests, which may have used up u1's chat
    # window; the runbook starts from a user in good standing.
    _reset_user(stack)
    attachment_id, why = _upload(stack)

    yield Operator(stack, env_file, environ, attachment_id, why)

    # The admin section disables USER_ID and enables it again; make sure.
    _reset_user(stack)


def _reset_user(stack: Stack) -> None:
    with httpx.Client(base_url=stack.edge_url, timeout=30) as client:
        client.patch(f"/api/admin/users/{USER}/enable", headers=ADMIN_HEADERS)
        client.delete(f"/api/admin/rate-limits/{USER}", headers=ADMIN_HEADERS)


def test_every_incident_has_commands_that_run_locally() -> None:
    sections = {block.section.split(".")[0] for block in BLOCKS}

    assert sections >= {str(n) for n in range(1, 11)}, sorted(sections)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_runbook_block(block: Block, operator: Operator) -> None:
    code = operator.substitute(block.code)
    where = f"docs/RUNBOOK.md line {block.line} ({block.section})"
    if "ATTACHMENT_ID" in code:
        pytest.fail(
            f"{where}: no attachment to run it with: {operator.attachment_error}"
        )
    leftover = _UNMAPPED.search(code) or re.search("|".join(PLACEHOLDERS), code)
    assert leftover is None, f"{where}: nothing substitutes {leftover.group(0)!r}"

    script = f"set -e\n{operator.substitute(SETUP)}\n{code}\n"
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=operator.environ,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )

    report = (
        f"{where}\n--- ran:\n{code}\n--- exit {done.returncode}, stdout:\n"
        f"{done.stdout[-3000:]}\n--- stderr:\n{done.stderr[-2000:]}"
    )
    assert done.returncode == 0, report
    if block.expect is not None:
        assert re.search(block.expect, done.stdout, re.M), (
            f"expected /{block.expect}/ in the output\n{report}"
        )
