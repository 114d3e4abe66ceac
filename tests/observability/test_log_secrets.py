"""No token, key, document or message text in any log: a full flow, then every log grepped."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx

from devstack.stack import Stack
from tests.documents.helpers import upload_direct, wait_status
from tests.documents.makers import markdown_document

STACK_API_KEY = "sk-test-stack-key"
"""The OpenAI key tests/conftest.py gives the stack; the gateway sends it on
every chat turn."""


async def test_a_full_flow_leaves_no_secret_and_no_document_text_in_the_logs(
    stack: Stack,
) -> None:
    user = f"obs-secret-{uuid.uuid4().hex[:8]}"
    token = f"dev:{user}:{user}@dev.local"
    auth = {"Authorization": f"Bearer {token}"}
    # Made-up words, so that a hit can only be this document's text.
    phrase = f"zorbulent quixa {uuid.uuid4().hex[:6]} marmalite vexhorn"
    question = f"What is the launch code phrase, {uuid.uuid4().hex[:6]}?"
    forged = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImZvcmdlZCJ9.eyJzdWIiOiJvYnMifQ.c2lnbmF0dXJl"

    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=60.0) as edge:
        assert (await edge.get("/api/me", headers=auth)).status_code == 200
        refused = await edge.get(
            "/api/me", headers={"Authorization": f"Bearer {forged}"}
        )
        assert refused.status_code == 401

        uploaded = await upload_direct(
            edge,
            user,
            "secret.md",
            "text/markdown",
            markdown_document(f"The launch code phrase is {phrase}."),
        )
        assert uploaded.status_code == 200, uploaded.text
        ready = await wait_status(edge, user, uploaded.json()["id"])
        assert ready["status"] == "ready"

        events = []
        async with edge.stream(
            "POST",
            "/api/chat/stream",
            json={"message": question},
            headers=auth,
        ) as reply:
            assert reply.status_code == 200
            async for line in reply.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        found = await edge.post(
            "/api/rag/search", json={"query": "launch code phrase"}, headers=auth
        )
    # The document reached the model and came back as a citation: the flow
    # really carried every secret through every service.
    assert any(e["type"] == "citations" for e in events)
    assert phrase in found.text
    await asyncio.sleep(5)  # Envoy flushes its access log every few seconds

    leaks = {
        path.name: [
            needle
            for needle in (token, STACK_API_KEY, forged, phrase, question)
            if needle in path.read_text(errors="replace")
        ]
        for path in sorted(stack.settings.logs.glob("*.log"))
    }
    assert len(leaks) >= 8, sorted(leaks)  # five services, a worker, Envoy, …
    assert {name: found for name, found in leaks.items() if found} == {}
