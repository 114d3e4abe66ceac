"""Chat through the edge: conversations, the streamed turn, history and the limit."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
import redis

from devstack.stack import Stack
from services.chat import prompt
from tests.conftest import HISTORY_TOKENS
from tests.fakes.openai_server import SLOW_START_S, FakeOpenAI
from tests.observability.helpers import service_metrics


def user_headers(user_id: str) -> dict[str, str]:
    email = f"{user_id}@dev.local"
    return {"Authorization": f"Bearer dev:{user_id}:{email}"}


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


def read_events(lines: list[str]) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")
    ]


async def turn(
    client: httpx.AsyncClient, user: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[dict[str, Any]], list[float]]:
    """One chat turn; the events and when each arrived (seconds from the start)."""
    started = time.monotonic()
    lines: list[str] = []
    stamps: list[float] = []
    async with client.stream(
        "POST", "/api/chat/stream", json=body, headers=user_headers(user)
    ) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return reply, [], []
        async for line in reply.aiter_lines():
            if line.startswith("data: "):
                lines.append(line)
                stamps.append(time.monotonic() - started)
    return reply, read_events(lines), stamps


async def embedded_texts(stack: Stack) -> float:
    """Texts the gateway has embedded since it started."""
    scraped = await service_metrics(stack, "gateway")
    return scraped.total("janna_gateway_embedded_texts_total")


@pytest.fixture
async def client(stack: Stack) -> Any:
    async with httpx.AsyncClient(base_url=stack.edge_url, timeout=30) as http:
        yield http


@pytest.fixture
def kv(stack: Stack) -> Any:
    assert stack.addresses is not None
    client = redis.Redis.from_url(stack.addresses.redis_url, decode_responses=True)
    yield client
    client.close()


async def test_runbook_curl_streams_events(stack: Stack) -> None:
    user = "u1"
    created = httpx.post(
        f"{stack.edge_url}/api/conversations", json={}, headers=user_headers(user)
    )
    assert created.status_code == 200, created.text
    conversation_id = created.json()["id"]

    # Runbook §1, as written, with a real conversation id.
    result = subprocess.run(
        [
            "curl",
            "-N",
            "-sS",
            "-i",
            "-H",
            "Authorization: Bearer dev:u1:test@dev.local",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps({"conversationId": conversation_id, "message": "hello"}),
            f"{stack.edge_url}/api/chat/stream",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # text mode turns the header block's CRLFs into plain newlines.
    head, _, body = result.stdout.partition("\n\n")
    assert "content-type: text/event-stream" in head.lower()
    assert "x-accel-buffering: no" in head.lower()
    events = read_events(body.splitlines())
    assert events, body
    assert events[0]["type"] == "activity"
    assert events[0]["activity"]["conversationId"] == conversation_id
    assert "".join(e["token"]["text"] for e in events if e["type"] == "token") == (
        "Hello from the fake model."
    )
    done = events[-1]
    assert done["type"] == "done"
    assert done["done"]["model"] == "gpt-4o-mini"
    assert done["done"]["usage"]["outputTokens"] > 0


async def test_events_arrive_spread_over_time(client: httpx.AsyncClient) -> None:
    reply, events, stamps = await turn(client, new_user(), {"message": "hi there"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    tokens = [s for s, e in zip(stamps, events, strict=True) if e["type"] == "token"]
    assert len(tokens) >= 5
    # Tokens come one by one as the model produces them, not in one burst.
    assert tokens[-1] - tokens[0] > 0.3


async def test_first_event_leaves_before_the_model_answers(
    client: httpx.AsyncClient,
) -> None:
    # The fake model is silent for SLOW_START_S before its first token; the
    # turn's first events must not wait for it.
    reply, events, stamps = await turn(
        client, new_user(), {"message": "slow-start please"}
    )
    assert reply.status_code == 200
    first_token = next(
        s for s, e in zip(stamps, events, strict=True) if e["type"] == "token"
    )
    assert events[0]["activity"]["step"] == "conversation"
    assert first_token - stamps[0] > SLOW_START_S / 2


async def test_new_conversation_is_created_titled_and_persisted(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    _reply, events, _ = await turn(
        client, user, {"message": "What is the capital of France, and why is it Paris?"}
    )
    conversation_id = events[0]["activity"]["conversationId"]
    done = events[-1]["done"]
    assert done["conversationId"] == conversation_id

    got = await client.get(
        f"/api/conversations/{conversation_id}", headers=user_headers(user)
    )
    assert got.status_code == 200
    body = got.json()
    assert body["title"].startswith("What is the capital of France")
    assert [(m["role"], m["status"]) for m in body["messages"]] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert body["messages"][1]["content"] == "Hello from the fake model."
    assert body["messages"][1]["id"] == done["messageId"]


async def test_empty_conversation_is_titled_by_its_first_message(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    created = await client.post(
        "/api/conversations", json={}, headers=user_headers(user)
    )
    conversation_id = created.json()["id"]
    assert created.json()["title"] == ""
    await turn(
        client,
        user,
        {"conversationId": conversation_id, "message": "Plan a week in Lisbon"},
    )
    await turn(
        client, user, {"conversationId": conversation_id, "message": "And Porto?"}
    )
    got = await client.get(
        f"/api/conversations/{conversation_id}", headers=user_headers(user)
    )
    assert got.json()["title"] == "Plan a week in Lisbon"


async def test_a_user_without_documents_is_not_searched(
    client: httpx.AsyncClient, stack: Stack
) -> None:
    before = await embedded_texts(stack)
    _reply, events, _ = await turn(client, new_user(), {"message": "hi there"})
    retrieved = [
        e["activity"]["message"]
        for e in events
        if e["type"] == "activity" and e["activity"]["step"] == "retrieved"
    ]
    assert retrieved == ["no ready documents to search"]
    assert not any(e["type"] == "citations" for e in events)
    assert events[-1]["type"] == "done"
    assert await embedded_texts(stack) == before, "the message must not be embedded"


async def test_conversations_crud_and_pagination(client: httpx.AsyncClient) -> None:
    user = new_user()
    headers = user_headers(user)
    ids = []
    for i in range(5):
        reply = await client.post(
            "/api/conversations", json={"title": f"c{i}"}, headers=headers
        )
        assert reply.status_code == 200
        ids.append(reply.json()["id"])

    page = await client.get(
        "/api/conversations", params={"pageSize": 2}, headers=headers
    )
    assert [c["title"] for c in page.json()["conversations"]] == ["c4", "c3"]
    token = page.json()["nextPageToken"]
    page2 = await client.get(
        "/api/conversations",
        params={"pageSize": 2, "pageToken": token},
        headers=headers,
    )
    assert [c["title"] for c in page2.json()["conversations"]] == ["c2", "c1"]

    renamed = await client.patch(
        f"/api/conversations/{ids[0]}", json={"title": "renamed"}, headers=headers
    )
    assert renamed.status_code == 200 and renamed.json()["title"] == "renamed"

    deleted = await client.delete(f"/api/conversations/{ids[0]}", headers=headers)
    assert deleted.status_code == 200
    gone = await client.get(f"/api/conversations/{ids[0]}", headers=headers)
    assert gone.status_code == 404

    bad_token = await client.get(
        "/api/conversations", params={"pageToken": "nonsense"}, headers=headers
    )
    assert bad_token.status_code == 400


async def test_another_users_conversation_is_not_found(
    client: httpx.AsyncClient,
) -> None:
    owner, other = new_user(), new_user()
    created = await client.post(
        "/api/conversations", json={}, headers=user_headers(owner)
    )
    conversation_id = created.json()["id"]

    for method, path, body in (
        ("GET", f"/api/conversations/{conversation_id}", None),
        ("PATCH", f"/api/conversations/{conversation_id}", {"title": "x"}),
        ("DELETE", f"/api/conversations/{conversation_id}", None),
    ):
        reply = await client.request(
            method, path, json=body, headers=user_headers(other)
        )
        assert reply.status_code == 404, (method, reply.text)
    reply, _, _ = await turn(
        client, other, {"conversationId": conversation_id, "message": "hi"}
    )
    assert reply.status_code == 404
    assert (
        await client.get(
            f"/api/conversations/{conversation_id}", headers=user_headers(owner)
        )
    ).status_code == 200
    assert (
        await client.get("/api/conversations/not-a-uuid", headers=user_headers(owner))
    ).status_code == 404


async def test_bad_turns_are_400(client: httpx.AsyncClient) -> None:
    user = new_user()
    for body in (
        {"message": ""},
        {"message": "   \n "},
        {"message": "x" * (1024 * 1024)},
    ):
        reply, _, _ = await turn(client, user, body)
        assert reply.status_code == 400, reply.status_code
        assert reply.headers["content-type"].startswith("application/json")
    invalid = await client.post(
        "/api/chat/stream",
        content=b'{"message": "unterminated',
        headers={**user_headers(user), "Content-Type": "application/json"},
    )
    assert invalid.status_code == 400
    assert "code" in invalid.json()


async def test_history_is_sent_and_trimmed_to_budget(
    client: httpx.AsyncClient, fake_openai: FakeOpenAI
) -> None:
    user = new_user()
    # About 120 tokens a turn by tiktoken, 180 by a character estimate: two
    # turns fit the budget only when counted the first way.
    long_text = "alpha " * 120
    _reply, events, _ = await turn(client, user, {"message": "first " + long_text})
    conversation_id = events[0]["activity"]["conversationId"]
    for word in ("second", "third", "fourth"):
        await turn(
            client,
            user,
            {"conversationId": conversation_id, "message": f"{word} {long_text}"},
        )
    before = len(fake_openai.requests)
    await turn(
        client, user, {"conversationId": conversation_id, "message": "fifth question"}
    )
    sent = fake_openai.requests[before]["messages"]

    assert sent[0]["role"] == "system"
    assert sent[-1] == {"role": "user", "content": "fifth question"}
    history = sent[1:-1]
    assert history, "earlier turns must be sent"
    assert history[0]["role"] == "user"
    # The newest turns are kept, the oldest dropped, within the budget.
    assert history[-2]["content"].startswith("fourth")
    assert not any(m["content"].startswith("first") for m in history)
    # The stack's chat route starts with gpt-4o-mini, so the budget is
    # counted in its tokens (tiktoken), not estimated from characters.
    count = prompt.token_counter("openai:gpt-4o-mini")
    assert sum(count(m["content"]) for m in history) <= HISTORY_TOKENS
    assert sum(len(m["content"]) for m in history) // 4 > HISTORY_TOKENS, (
        "a character estimate would have kept less history"
    )


async def test_midstream_failure_gives_error_event_and_partial_message(
    client: httpx.AsyncClient,
) -> None:
    user = new_user()
    reply, events, _ = await turn(
        client, user, {"message": "please midstream-fail now"}
    )
    assert reply.status_code == 200
    tokens = "".join(e["token"]["text"] for e in events if e["type"] == "token")
    assert tokens == "Partial answer so"
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] in ("MODEL_UNAVAILABLE", "MODEL_ERROR")
    assert events[-1]["error"]["message"] == "AI service temporarily unavailable"

    conversation_id = events[0]["activity"]["conversationId"]
    got = await client.get(
        f"/api/conversations/{conversation_id}", headers=user_headers(user)
    )
    assistant = got.json()["messages"][-1]
    assert assistant["role"] == "assistant"
    assert assistant["status"] == "error"
    assert assistant["content"] == "Partial answer so"


async def test_client_disconnect_stores_stopped_and_cancels_upstream(
    client: httpx.AsyncClient, fake_openai: FakeOpenAI
) -> None:
    user = new_user()
    disconnects = fake_openai.disconnects
    conversation_id = None
    seen = 0
    async with client.stream(
        "POST",
        "/api/chat/stream",
        json={"message": "a slow-answer please"},
        headers=user_headers(user),
    ) as reply:
        async for line in reply.aiter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "activity" and not conversation_id:
                conversation_id = event["activity"]["conversationId"]
            if event["type"] == "token":
                seen += 1
                if seen == 3:
                    break
    assert conversation_id
    # The model's connection is closed long before its 80 tokens would end.
    assert fake_openai.wait_for(lambda: fake_openai.disconnects > disconnects, 10)

    async def stored() -> dict[str, Any] | None:
        got = await client.get(
            f"/api/conversations/{conversation_id}", headers=user_headers(user)
        )
        messages = got.json()["messages"]
        return messages[-1] if messages[-1]["role"] == "assistant" else None

    message = None
    for _ in range(50):
        message = await stored()
        if message:
            break
        await asyncio.sleep(0.1)
    assert message is not None
    assert message["status"] == "stopped"
    assert message["content"].startswith(" word0 word1 word2")
    assert len(message["content"].split()) < 80


async def test_forty_concurrent_turns_admit_exactly_thirty(
    client: httpx.AsyncClient, kv: Any, stack: Stack
) -> None:
    user = new_user()
    replies = await asyncio.gather(
        *(
            client.post(
                "/api/chat/stream", json={"message": "hi"}, headers=user_headers(user)
            )
            for _ in range(40)
        )
    )
    statuses = [r.status_code for r in replies]
    assert statuses.count(200) == 30, statuses
    assert statuses.count(429) == 10
    refused = next(r for r in replies if r.status_code == 429)
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["code"] == 8
    assert kv.zcard(f"rl:{user}:chat") == 30

    # Runbook §5: deleting the key clears the limit at once.
    kv.delete(f"rl:{user}:chat")
    again = await client.post(
        "/api/chat/stream", json={"message": "hi"}, headers=user_headers(user)
    )
    assert again.status_code == 200


async def test_admin_reset_clears_the_limit(client: httpx.AsyncClient, kv: Any) -> None:
    user = new_user()
    kv.zadd(f"rl:{user}:chat", {f"m{i}": time.time() * 1000 for i in range(30)})
    refused = await client.post(
        "/api/chat/stream", json={"message": "hi"}, headers=user_headers(user)
    )
    assert refused.status_code == 429

    not_admin = await client.delete(
        f"/api/admin/rate-limits/{user}", headers=user_headers(new_user())
    )
    assert not_admin.status_code == 403
    reset = await client.delete(
        f"/api/admin/rate-limits/{user}", headers=user_headers("admin")
    )
    assert reset.status_code == 200, reset.text
    assert kv.exists(f"rl:{user}:chat") == 0
    assert (
        await client.post(
            "/api/chat/stream", json={"message": "hi"}, headers=user_headers(user)
        )
    ).status_code == 200


async def test_redis_down_fails_closed(
    stack: Stack, service_env: dict[str, str]
) -> None:
    """A chat service whose Redis is gone refuses turns with 429, never admits them."""
    import grpc

    from devstack.infra import free_port as _free_port
    from services.proto.janna.v1 import chat_pb2, chat_pb2_grpc

    port = _free_port()
    env = {
        **service_env,
        "JANNA_CHAT_PORT": str(port),
        "JANNA_CHAT_METRICS_PORT": "0",
        "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0",
    }
    process = subprocess.Popen(
        [".venv/bin/python", "-m", "services.chat"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 20)
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            call = stub.StreamChat(
                chat_pb2.ChatTurnRequest(message="hi"),
                metadata=(("x-user-id", new_user()),),
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "unavailable" in (caught.value.details() or "")
    finally:
        process.terminate()
        process.wait(15)


async def test_messages_survive_in_postgres(
    database_url: str, client: httpx.AsyncClient
) -> None:
    user = new_user()
    _, events, _ = await turn(client, user, {"message": "remember me"})
    conversation_id = events[0]["activity"]["conversationId"]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT role, status FROM messages WHERE conversation_id = $1 ORDER BY created_at",
            uuid.UUID(conversation_id),
        )
    finally:
        await conn.close()
    assert [(r["role"], r["status"]) for r in rows] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]


async def test_turn_with_an_uploaded_document_cites_it(
    client: httpx.AsyncClient,
) -> None:
    from tests.documents.helpers import upload_direct, wait_status
    from tests.documents.makers import pdf_document

    user = new_user()
    passage = "The quartz lighthouse of Velmora keeps its lamp burning with whale oil."
    uploaded = await upload_direct(
        client, user, "velmora-guide.pdf", "application/pdf", pdf_document(passage)
    )
    assert uploaded.status_code == 200, uploaded.text
    attachment_id = uploaded.json()["id"]
    ready = await wait_status(client, user, attachment_id)
    assert ready["status"] == "ready", ready

    reply, events, _ = await turn(
        client,
        user,
        {"message": "What keeps the quartz lighthouse of Velmora burning?"},
    )
    assert reply.status_code == 200
    steps = [e["activity"]["step"] for e in events if e["type"] == "activity"]
    assert "retrieving" in steps and "retrieved" in steps
    found = next(
        e
        for e in events
        if e["type"] == "activity" and e["activity"]["step"] == "retrieved"
    )
    assert re.fullmatch(r"[1-9]\d* passages? found", found["activity"]["message"])

    citations = next(e for e in events if e["type"] == "citations")["citations"]
    assert citations["cited"], citations
    first = citations["cited"][0]
    assert first["marker"] == 1
    assert first["attachmentId"] == attachment_id
    assert first["filename"] == "velmora-guide.pdf"
    assert first["page"] == 2
    assert "lighthouse" in first["snippet"].lower()
    # Every other passage retrieved is listed as a source, unnumbered.
    found_count = int(found["activity"]["message"].split()[0])
    assert len(citations["cited"]) + len(citations["sources"]) == found_count
    assert found_count >= 2, "the three-page guide yields several passages"
    assert all(s["marker"] == 0 for s in citations["sources"])
    assert all(s["attachmentId"] == attachment_id for s in citations["sources"])
    assert first["snippet"] not in {s["snippet"] for s in citations["sources"]}

    # Reloading the conversation shows the same citations.
    conversation_id = events[0]["activity"]["conversationId"]
    got = await client.get(
        f"/api/conversations/{conversation_id}", headers=user_headers(user)
    )
    stored = got.json()["messages"][-1]["citations"]
    assert stored[0]["filename"] == "velmora-guide.pdf" and stored[0]["page"] == 2

    # Without retrieval, the same question gets no citations.
    _, plain, _ = await turn(
        client,
        user,
        {"message": "What keeps the lighthouse burning?", "ragEnabled": False},
    )
    assert not any(e["type"] == "citations" for e in plain)
