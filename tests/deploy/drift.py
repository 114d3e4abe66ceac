"""What the deployment files are checked against: the code's own names.

The environment variables the services read are collected from the source
itself, by walking the syntax tree of every module under ``services/``:

- the first argument of every call to a :class:`services.runtime.config.Env`
  method (``env.text("X", ...)``, ``.integer``, ``.number``, ``.flag``,
  ``.optional``, ``.items``), whatever the receiver is called;
- the string arguments of any call that is handed the ``Env`` itself as its
  first argument (``_endpoint(env, "OPENAI_BASE_URL", "OPENAI_API_KEY")``,
  ``_positive(env, "JANNA_HEALTH_TTL_S", 30.0)``): such a helper exists to
  read the names it is given;
- ``os.environ.get("X")``, ``os.environ["X"]`` and ``os.getenv("X")``.

An f-string name (``f"JANNA_{name.upper()}_PORT"``) becomes a pattern in which
each placeholder stands for one word without underscores.

A scan for every upper-case string literal in ``services/`` would be simpler,
but it would also accept names that only appear in log lines, error messages
or ``os.environ.setdefault`` (which writes a variable, for a library); the
walk accepts only names the code actually reads.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

ENV_METHODS = frozenset({"text", "integer", "number", "flag", "optional", "items"})
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")

READ_BY_LIBRARIES = {
    "AWS_ACCESS_KEY_ID": "botocore's credential chain (Janna never handles keys)",
    "AWS_SECRET_ACCESS_KEY": "botocore's credential chain",
}
"""Variables a container may be given that a library reads, not Janna's code."""

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


@dataclass(frozen=True)
class CodeEnv:
    """The environment variables the services read."""

    names: frozenset[str]
    """Names written out in full."""
    patterns: tuple[re.Pattern[str], ...]
    """Names built with an f-string."""

    def reads(self, name: str) -> bool:
        return name in self.names or any(p.fullmatch(name) for p in self.patterns)


@cache
def code_env(root: Path = SERVICES) -> CodeEnv:
    """Scans every module below ``root``, generated code excepted."""
    names: set[str] = set()
    patterns: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if "proto" in path.relative_to(root).parts[:1]:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for expr in _name_arguments(node):
                if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
                    if ENV_NAME.match(expr.value):
                        names.add(expr.value)
                elif isinstance(expr, ast.JoinedStr):
                    patterns.add(_pattern(expr))
    return CodeEnv(
        names=frozenset(names),
        patterns=tuple(re.compile(p) for p in sorted(patterns)),
    )


def _name_arguments(node: ast.AST) -> Iterator[ast.expr]:
    """The expressions that name an environment variable the node reads."""
    if isinstance(node, ast.Subscript) and _is_os_environ(node.value):
        yield node.slice
        return
    if not isinstance(node, ast.Call) or not node.args:
        return
    func = node.func
    if isinstance(func, ast.Attribute):
        if func.attr in ENV_METHODS:
            yield node.args[0]
            return
        if func.attr == "get" and _is_os_environ(func.value):
            yield node.args[0]
            return
        if func.attr == "getenv" and _is_name(func.value, "os"):
            yield node.args[0]
            return
    if _is_env(node.args[0]):
        yield from node.args[1:]


def _is_env(expr: ast.expr) -> bool:
    return _is_name(expr, "env") or (
        isinstance(expr, ast.Attribute) and expr.attr in ("env", "_env")
    )


def _is_os_environ(expr: ast.expr) -> bool:
    return (
        isinstance(expr, ast.Attribute)
        and expr.attr == "environ"
        and _is_name(expr.value, "os")
    )


def _is_name(expr: ast.expr, name: str) -> bool:
    return isinstance(expr, ast.Name) and expr.id == name


def _pattern(expr: ast.JoinedStr) -> str:
    parts = []
    for value in expr.values:
        if isinstance(value, ast.Constant):
            parts.append(re.escape(str(value.value)))
        else:
            parts.append("[A-Z0-9]+")
    return "".join(parts)


# -- docker-compose.yml ---------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    """The compose file as Compose sees it before interpolation (anchors merged)."""
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict), f"{COMPOSE_FILE} is not a mapping"
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def janna_services() -> dict[str, dict[str, Any]]:
    """The services that run Janna's own image (the ones with a build)."""
    return {name: svc for name, svc in services().items() if "build" in svc}


def interpolate(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """``value`` with ``${X}``, ``${X:-default}`` and ``$$`` resolved as Compose does."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def resolve(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op") or "", match.group("arg") or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return arg if current is None else current
        if op in (":?", "?"):
            if not current:
                raise KeyError(f"{name} is required: {arg}")
            return current
        if op in (":+", "+"):
            return arg if current else ""
        return current or ""

    return _INTERPOLATION.sub(resolve, value)


def interpolation_variables() -> set[str]:
    """Every variable docker-compose.yml takes from the shell or from .env."""
    return {
        m.group("braced") or m.group("bare")
        for m in _INTERPOLATION.finditer(COMPOSE_FILE.read_text())
        if m.group(0) != "$$"
    }


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's ``environment``, as a mapping, interpolated with defaults."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    resolved = interpolate(raw)
    return {str(k): "" if v is None else str(v) for k, v in resolved.items()}


def env_example() -> dict[str, str]:
    """The variables .env.example sets or shows (``# NAME=value``) and their values."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found
