"""The generated code in the tree is what protos/build.py makes of protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "build.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {
        p.relative_to(tmp_path): p.read_bytes()
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    assert fresh, "protos/build.py generated nothing"
    stale = [
        str(rel) for rel, data in fresh.items() if (ROOT / rel).read_bytes() != data
    ]
    assert not stale, f"generated files are stale; run `make protos`: {stale}"

    tracked = {
        p.relative_to(ROOT)
        for p in (ROOT / "services" / "proto").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    extra = tracked - set(fresh)
    assert not extra, f"generated files without a proto: {sorted(map(str, extra))}"


def test_every_http_annotated_rpc_is_in_the_descriptor() -> None:
    from google.api import annotations_pb2
    from google.protobuf import descriptor_pb2

    descriptors = descriptor_pb2.FileDescriptorSet()
    descriptors.ParseFromString((ROOT / "envoy" / "janna.pb").read_bytes())
    paths = set()
    for file in descriptors.file:
        for service in file.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                pattern = getattr(rule, rule.WhichOneof("pattern") or "get", "")
                if pattern:
                    paths.add(pattern)
    for expected in (
        "/health",
        "/api/me",
        "/api/models",
        "/api/conversations",
        "/api/chat/stream",
        "/api/attachments",
        "/api/rag/search",
        "/api/admin/users",
        "/api/admin/metrics",
        "/api/admin/rate-limits/{user_id}",
        "/api/admin/model-health/{provider}/{model}",
        "/api/admin/dlq/redrive",
    ):
        assert expected in paths, expected
