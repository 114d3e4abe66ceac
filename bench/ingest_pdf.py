"""``python -m bench.ingest_pdf``: time and peak memory of ingesting a 200-page PDF.

Two measurements, both printed:

1. **parse** — a fresh process prepares the parsers and reads the PDF the way
   the worker does (``parsing.parse`` then ``chunking.chunk``); its peak RSS
   (``ru_maxrss``) and the seconds each step took.
2. **end to end** — the whole embedded stack (``devstack.stack.Stack`` on free
   ports in a temporary folder): the PDF is uploaded through the edge with a
   pre-signed URL, completed, and waited for until ``ready``. Printed: the
   seconds from completion to ``ready``, and the worker process's peak RSS
   (``VmHWM``) before and after the job. The embeddings come from the
   gateway's local model (all-MiniLM-L6-v2) unless ``OPENAI_API_KEY`` is set.

``--pages N`` changes the size; ``--parse-only`` skips the stack.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from devstack.stack import ROOT, Stack, StackSettings
from services.runtime.config import SERVICE_NAMES
from tests.documents.makers import big_pdf

_PARSE = """
import json, resource, sys, time
from pathlib import Path
began = time.perf_counter()
from services.ingest import chunking, parsing
parsing.prepare()
prepared = time.perf_counter()
rss_prepared = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
parsed = parsing.parse(Path(sys.argv[1]), "pdf")
read = time.perf_counter()
chunks = chunking.chunk(parsed.elements, 1000, 150)
done = time.perf_counter()
print(json.dumps({
    "prepare_s": prepared - began, "parse_s": read - prepared,
    "chunk_s": done - read, "pages": parsed.pages,
    "elements": len(parsed.elements), "chunks": len(chunks),
    "rss_prepared_mb": rss_prepared / 1024,
    "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def parse_only(pdf: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _PARSE, str(pdf)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"parse: {figures['pages']} pages -> {figures['elements']} elements -> "
        f"{figures['chunks']} chunks\n"
        f"  prepare {figures['prepare_s']:.1f}s"
        f" (RSS {figures['rss_prepared_mb']:.0f} MB)"
        f", parse {figures['parse_s']:.1f}s, chunk {figures['chunk_s']:.2f}s\n"
        f"  peak RSS of the parsing process: {figures['rss_peak_mb']:.0f} MB"
    )


def end_to_end(pdf: Path, root: Path) -> None:
    settings = StackSettings(
        root=root,
        edge_port=0,
        edge_admin_port=0,
        service_ports={name: 0 for name in SERVICE_NAMES},
        env={"JANNA_ENV": "development"},
    )
    data = pdf.read_bytes()
    user = "bench"
    auth = {
        "authorization": f"Bearer dev:{user}:{user}@dev.local",
        "x-user-id": user,
        "x-user-email": f"{user}@dev.local",
    }
    began = time.perf_counter()
    with Stack(settings) as stack:
        print(f"stack up in {time.perf_counter() - began:.0f}s")
        worker = stack.workers[0]
        with httpx.Client(base_url=stack.edge_url, timeout=60) as edge:
            # Warm the gateway's model with a one-line file first.
            for name, body in (("warm.txt", b"warm up"), (pdf.name, data)):
                kind = "text/plain" if name.endswith(".txt") else "application/pdf"
                created = edge.post(
                    "/api/attachments",
                    json={
                        "filename": name,
                        "contentType": kind,
                        "sizeBytes": len(body),
                    },
                    headers=auth,
                ).json()
                put = httpx.put(
                    created["uploadUrl"], content=body, headers=created["uploadHeaders"]
                )
                put.raise_for_status()
                before = _peak_rss_mb(worker.pid)
                started = time.perf_counter()
                attachment_id = created["attachment"]["id"]
                edge.post(f"/api/attachments/{attachment_id}/complete", headers=auth)
                while True:
                    status = edge.get(
                        f"/api/attachments/{attachment_id}", headers=auth
                    ).json()
                    if status["status"] in ("ready", "error"):
                        break
                    time.sleep(0.1)
                elapsed = time.perf_counter() - started
            after = _peak_rss_mb(worker.pid)
        log = (stack.settings.logs / "ingest-worker-0.log").read_text()
        steps = [line for line in log.splitlines() if "embedded in" in line]
        print(
            f"end to end: {status['status']} {status['pageCount']} pages, "
            f"{status['chunkCount']} chunks, {len(data) / 1e6:.2f} MB file\n"
            f"  complete -> ready: {elapsed:.1f}s\n"
            f"  worker peak RSS: {before:.0f} MB before the job, {after:.0f} MB after\n"
            f"  worker: {steps[-1].split(': ', 1)[-1] if steps else '?'}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--parse-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="janna-bench-") as folder:
        pdf = Path(folder) / f"report-{args.pages}.pdf"
        pdf.write_bytes(big_pdf(args.pages))
        print(f"{pdf.name}: {args.pages} pages, {pdf.stat().st_size / 1e6:.2f} MB")
        parse_only(pdf)
        if not args.parse_only:
            end_to_end(pdf, Path(folder) / "stack")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bench process peak RSS: {own:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
