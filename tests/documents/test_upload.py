"""Upload through the edge, ingestion by the stack's worker, search through the edge."""

from __future__ import annotations

import uuid

import asyncpg
import httpx
import pytest

from services.ingest.aws import Aws
from tests.documents import makers
from tests.documents.helpers import (
    headers,
    search,
    upload_direct,
    upload_presigned,
    wait_status,
)


def passage_for(kind: str) -> str:
    """A sentence no other document holds."""
    token = uuid.uuid4().hex[:6]
    return (
        f"The zebra-orchid protocol {token} was ratified by the Quillfield "
        f"harbour council for the {kind} archive."
    )


@pytest.mark.parametrize("mode", ["presigned", "direct"])
@pytest.mark.parametrize("kind", sorted(makers.KINDS))
async def test_upload_becomes_ready_and_searchable(
    edge: httpx.AsyncClient, user: str, kind: str, mode: str
) -> None:
    filename, content_type, make = makers.KINDS[kind]
    passage = passage_for(kind)
    data = make(passage)

    if mode == "presigned":
        attachment = await upload_presigned(edge, user, filename, content_type, data)
    else:
        reply = await upload_direct(edge, user, filename, content_type, data)
        assert reply.status_code == 200, reply.text
        attachment = reply.json()
    assert attachment["status"] == "processing"
    assert attachment["sizeBytes"] == str(len(data))

    done = await wait_status(edge, user, attachment["id"])
    assert done["status"] == "ready", done
    assert done["error"] == ""
    assert done["chunkCount"] >= 2
    assert done["pageCount"] == (3 if kind == "pdf" else 1)
    assert done["filename"] == filename
    assert done["contentType"] == content_type

    hits = await search(edge, user, passage)
    assert hits, "search found nothing"
    assert "zebra-orchid" in hits[0]["content"]
    assert hits[0]["attachmentId"] == attachment["id"]
    assert hits[0]["filename"] == filename
    assert 0.0 < hits[0]["score"] <= 1.0
    if kind == "pdf":
        assert hits[0]["page"] == 2


async def test_list_get_and_delete(
    edge: httpx.AsyncClient, user: str, aws: Aws, db: asyncpg.Connection
) -> None:
    ids = []
    for number in range(3):
        reply = await upload_direct(
            edge, user, f"n{number}.txt", "text/plain", f"note {number} ".encode() * 50
        )
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["id"])
    for attachment_id in ids:
        await wait_status(edge, user, attachment_id)

    first = await edge.get(
        "/api/attachments", params={"pageSize": 2}, headers=headers(user)
    )
    assert first.status_code == 200, first.text
    assert [a["id"] for a in first.json()["attachments"]] == ids[::-1][:2]
    token = first.json()["nextPageToken"]
    rest = await edge.get(
        "/api/attachments",
        params={"pageSize": 2, "pageToken": token},
        headers=headers(user),
    )
    assert [a["id"] for a in rest.json()["attachments"]] == [ids[0]]
    assert rest.json()["nextPageToken"] == ""

    key = await db.fetchval(
        "SELECT s3_key FROM attachments WHERE id = $1", uuid.UUID(ids[0])
    )
    assert key.startswith(f"users/{user}/{ids[0]}/")
    assert await aws.object_size(key) is not None

    deleted = await edge.delete(f"/api/attachments/{ids[0]}", headers=headers(user))
    assert deleted.status_code == 200, deleted.text
    gone = await edge.get(f"/api/attachments/{ids[0]}", headers=headers(user))
    assert gone.status_code == 404
    assert await aws.object_size(key) is None
    chunks = await db.fetchval(
        'SELECT count(*) FROM document_chunks WHERE "attachmentId" = $1',
        uuid.UUID(ids[0]),
    )
    assert chunks == 0


async def test_another_users_documents_are_invisible(
    edge: httpx.AsyncClient, user: str
) -> None:
    passage = passage_for("private")
    reply = await upload_direct(
        edge, user, "secret.md", "text/markdown", makers.markdown_document(passage)
    )
    assert reply.status_code == 200, reply.text
    attachment_id = reply.json()["id"]
    await wait_status(edge, user, attachment_id)
    other = f"other-{uuid.uuid4().hex[:8]}"

    for method, path in [
        ("GET", f"/api/attachments/{attachment_id}"),
        ("DELETE", f"/api/attachments/{attachment_id}"),
        ("POST", f"/api/attachments/{attachment_id}/complete"),
    ]:
        answer = await edge.request(method, path, headers=headers(other))
        assert answer.status_code == 404, (method, answer.text)
        assert answer.json()["message"] == "attachment not found"
    # An id that exists nowhere answers the same, so ids cannot be probed.
    missing = await edge.get(f"/api/attachments/{uuid.uuid4()}", headers=headers(other))
    assert missing.status_code == 404
    assert missing.json()["message"] == "attachment not found"

    listed = await edge.get("/api/attachments", headers=headers(other))
    assert listed.json()["attachments"] == []
    assert await search(edge, other, passage) == []
    assert await search(edge, other, passage, attachmentIds=[attachment_id]) == []
    # The owner still has it.
    assert (await search(edge, user, passage))[0]["attachmentId"] == attachment_id


@pytest.mark.parametrize(
    ("filename", "reason"),
    [
        ("../../etc/passwd.txt", "FILENAME_PATH"),
        ("/etc/passwd.txt", "FILENAME_PATH"),
        ("..\\..\\boot.txt", "FILENAME_PATH"),
        ("..", "FILENAME_PATH"),
        ("notes\n.txt", "FILENAME_CONTROL"),
        ("notes\u202etxt.exe.txt", "FILENAME_CONTROL"),
        ("", "FILENAME_MISSING"),
        ("tool.exe", "TYPE_NOT_ALLOWED"),
        ("notes", "TYPE_NOT_ALLOWED"),
    ],
)
async def test_bad_filenames_are_400(
    edge: httpx.AsyncClient, user: str, filename: str, reason: str
) -> None:
    created = await edge.post(
        "/api/attachments",
        json={"filename": filename, "contentType": "text/plain", "sizeBytes": 10},
        headers=headers(user),
    )
    assert created.status_code == 400, created.text
    assert created.json()["details"][0]["reason"] == reason

    direct = await upload_direct(edge, user, filename, "text/plain", b"0123456789")
    assert direct.status_code == 400, direct.text
    assert direct.json()["details"][0]["reason"] == reason


async def test_size_type_and_emptiness_are_400(
    edge: httpx.AsyncClient, user: str
) -> None:
    async def create(**fields: object) -> httpx.Response:
        body = {"filename": "a.pdf", "contentType": "application/pdf", "sizeBytes": 10}
        return await edge.post(
            "/api/attachments", json={**body, **fields}, headers=headers(user)
        )

    too_big = await create(sizeBytes=50 * 1024 * 1024 + 1)
    assert too_big.status_code == 400
    assert too_big.json()["details"][0]["reason"] == "FILE_TOO_LARGE"
    assert "52428800" in too_big.json()["message"]
    empty = await create(sizeBytes=0)
    assert empty.json()["details"][0]["reason"] == "EMPTY_FILE"
    mismatch = await create(filename="a.txt")
    assert mismatch.json()["details"][0]["reason"] == "TYPE_MISMATCH"
    wrong = await create(filename="a.zip", contentType="application/zip")
    assert wrong.json()["details"][0]["reason"] == "TYPE_NOT_ALLOWED"
    bad_conversation = await create(conversationId="not-an-id")
    assert bad_conversation.status_code == 400

    # The direct upload's own limit (10 MiB) answers, not the edge's buffer.
    over = await upload_direct(
        edge, user, "big.txt", "text/plain", b"x" * (10 * 1024 * 1024 + 1)
    )
    assert over.status_code == 400, over.text
    assert over.json()["details"][0]["reason"] == "FILE_TOO_LARGE"
    assert "10485760" in over.json()["message"]
    # Larger than Envoy's default 1 MiB buffer, within the limit: accepted.
    # Deleted at once, so the worker does not spend the test run on it.
    fits = await upload_direct(
        edge, user, "fits.txt", "text/plain", b"words " * (2 * 1024 * 1024 // 6)
    )
    assert fits.status_code == 200, fits.text
    deleted = await edge.delete(
        f"/api/attachments/{fits.json()['id']}", headers=headers(user)
    )
    assert deleted.status_code == 200
    nothing = await upload_direct(edge, user, "empty.txt", "text/plain", b"")
    assert nothing.status_code == 400, nothing.text
    assert nothing.json()["details"][0]["reason"] == "EMPTY_FILE"

    listed = await edge.get("/api/attachments", headers=headers(user))
    assert listed.json()["attachments"] == []


async def test_complete_checks_the_object(edge: httpx.AsyncClient, user: str) -> None:
    created = await edge.post(
        "/api/attachments",
        json={"filename": "a.txt", "contentType": "text/plain", "sizeBytes": 5},
        headers=headers(user),
    )
    body = created.json()
    attachment_id = body["attachment"]["id"]
    early = await edge.post(
        f"/api/attachments/{attachment_id}/complete", headers=headers(user)
    )
    assert early.status_code == 400, early.text
    assert early.json()["details"][0]["reason"] == "NOT_UPLOADED"

    async with httpx.AsyncClient() as plain:
        put = await plain.put(
            body["uploadUrl"], content=b"too many bytes", headers=body["uploadHeaders"]
        )
    assert put.status_code == 200
    wrong_size = await edge.post(
        f"/api/attachments/{attachment_id}/complete", headers=headers(user)
    )
    assert wrong_size.status_code == 400
    assert "5 were announced" in wrong_size.json()["message"]
    still = await edge.get(f"/api/attachments/{attachment_id}", headers=headers(user))
    assert still.json()["status"] == "uploading"


async def test_same_bytes_twice_are_not_parsed_again(
    edge: httpx.AsyncClient, user: str, db: asyncpg.Connection
) -> None:
    data = makers.text_document(passage_for("repeat"))
    first = (await upload_direct(edge, user, "a.txt", "text/plain", data)).json()
    first_done = await wait_status(edge, user, first["id"])
    second = (await upload_direct(edge, user, "b.txt", "text/plain", data)).json()
    second_done = await wait_status(edge, user, second["id"])

    assert first_done["status"] == second_done["status"] == "ready"
    assert second_done["chunkCount"] == first_done["chunkCount"]
    row = await db.fetchrow(
        "SELECT reused_from, content_hash FROM attachments WHERE id = $1",
        uuid.UUID(second["id"]),
    )
    assert row is not None
    assert row["reused_from"] == uuid.UUID(first["id"])
    first_hash = await db.fetchval(
        "SELECT content_hash FROM attachments WHERE id = $1", uuid.UUID(first["id"])
    )
    assert row["content_hash"] == first_hash
    names = await db.fetch(
        'SELECT DISTINCT filename FROM document_chunks WHERE "attachmentId" = $1',
        uuid.UUID(second["id"]),
    )
    assert [r["filename"] for r in names] == ["b.txt"]

    # Another user's identical bytes are theirs to parse.
    other = f"other-{uuid.uuid4().hex[:8]}"
    third = (await upload_direct(edge, other, "c.txt", "text/plain", data)).json()
    await wait_status(edge, other, third["id"])
    reused = await db.fetchval(
        "SELECT reused_from FROM attachments WHERE id = $1", uuid.UUID(third["id"])
    )
    assert reused is None
