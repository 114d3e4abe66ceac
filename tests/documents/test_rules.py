"""File names, types, S3 keys and chunking: the rules alone, without the stack."""

from __future__ import annotations

import itertools

import pytest

from services.ingest import files
from services.ingest.chunking import chunk
from services.ingest.parsing import Element


@pytest.mark.parametrize(
    "name",
    ["report.pdf", "Q3 plan (final).docx", "notes.MD", "résumé.txt", ".env.txt"],
)
def test_plain_names_pass_unchanged(name: str) -> None:
    assert files.check_filename(name) == name


@pytest.mark.parametrize(
    "name",
    ["../x.txt", "a/b.txt", "C:\\x.txt", "..", ".", " ", "a\x00.txt", "a\u200b.txt"],
)
def test_names_that_act_as_paths_or_hide_text_are_refused(name: str) -> None:
    with pytest.raises(files.UploadRejected):
        files.check_filename(name)


def test_long_names_are_refused() -> None:
    with pytest.raises(files.UploadRejected, match="255 bytes"):
        files.check_filename("é" * 128 + ".txt")


def test_the_extension_decides_and_the_type_must_agree() -> None:
    assert files.check_type("a.PDF", "application/pdf").kind == "pdf"
    assert files.check_type("a.md", "").kind == "md"
    assert files.check_type("a.md", "application/octet-stream").kind == "md"
    assert files.check_type("a.txt", "text/plain; charset=utf-8").kind == "txt"
    assert files.check_type("mail.eml", "message/rfc822").kind == "eml"
    with pytest.raises(files.UploadRejected, match="does not match"):
        files.check_type("a.txt", "application/pdf")
    with pytest.raises(files.UploadRejected, match="not accepted"):
        files.check_type("a.exe", "application/octet-stream")


def test_keys_are_per_user_and_never_paths() -> None:
    key = files.object_key("u1", "id-1", "Q3 plan (final).pdf")
    assert key == "users/u1/id-1/Q3-plan-final-.pdf"
    odd = files.object_key("../admin", "id-2", "a.txt")
    assert odd.startswith("users/h-") and ".." not in odd


def test_a_title_stays_with_the_text_under_it() -> None:
    elements = [
        Element("Intro", 1, True),
        Element("First words.", 1, False),
        Element("Findings", 2, True),
        Element("Sub heading", 2, True),
        Element("A finding. " * 40, 2, False),
        Element("Closing", 3, True),
    ]
    chunks = chunk(elements, 200, 40)
    assert chunks[0].text == "Intro\n\nFirst words."
    assert all(c.text.startswith("Findings\nSub heading\n\n") for c in chunks[1:-1])
    assert [c.page for c in chunks[1:-1]] == [2] * (len(chunks) - 2)
    assert chunks[-1].text == "Closing" and chunks[-1].page == 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(len(c.text) <= 200 for c in chunks)


def test_consecutive_chunks_overlap() -> None:
    elements = [Element(f"Sentence {n} is here.", 1, False) for n in range(60)]
    chunks = chunk(elements, 300, 60)
    assert len(chunks) > 3
    for before, after in itertools.pairwise(chunks):
        shared = after.text.split("\n\n")[0]
        assert shared and shared in before.text
        assert len(shared) <= 60
