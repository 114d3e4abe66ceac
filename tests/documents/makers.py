"""Documents made by the tests: PDF (written by hand), DOCX, Markdown, text, HTML."""

from __future__ import annotations

import io
from collections.abc import Sequence

import docx

FILLER = (
    "Quarterly planning covers staffing, budgets and the maintenance calendar. "
    "Each team reviews its open items and agrees on owners and dates. "
    "The facilities group reports on heating, lighting and the parking garage. "
)


def sections(passage: str) -> list[tuple[str, list[str]]]:
    """Headings and paragraphs around one unique ``passage``."""
    return [
        ("Overview", [FILLER * 3, FILLER * 2]),
        ("Findings", [FILLER * 2, passage, FILLER]),
        ("Next steps", [FILLER * 3]),
    ]


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def _wrap(text: str, width: int = 90) -> list[str]:
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines


def pdf(pages: Sequence[Sequence[str]]) -> bytes:
    """A PDF with one page per item, each a list of paragraphs (Helvetica).

    Written object by object with a correct cross-reference table, so that
    the tests need no PDF library; a paragraph's first line is set larger
    when it is short, like a heading.
    """
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    tree = add(b"")  # the page tree, filled in below
    kids = []
    for paragraphs in pages:
        ops = ["BT", "72 760 Td"]
        for paragraph in paragraphs:
            heading = len(paragraph) < 40
            ops.append("/F1 16 Tf 20 TL" if heading else "/F1 10 Tf 13 TL")
            for line in _wrap(paragraph):
                ops.append(f"({_escape(line)}) Tj T*")
            ops.append("T*")  # a blank line between paragraphs
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        content = add(
            b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)
        )
        kids.append(
            add(
                b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] "
                b"/Resources << /Font << /F1 %d 0 R >> >> /Contents %d 0 R >>"
                % (tree, font, content)
            )
        )
    objects[tree - 1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
        b" ".join(b"%d 0 R" % k for k in kids),
        len(kids),
    )
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % tree)

    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
        % (len(objects) + 1, catalog, xref)
    )
    return out.getvalue()


def pdf_document(passage: str) -> bytes:
    """Three pages; the passage is on page 2."""
    parts = sections(passage)
    return pdf([[title, *paragraphs] for title, paragraphs in parts])


def docx_document(passage: str) -> bytes:
    document = docx.Document()
    for title, paragraphs in sections(passage):
        document.add_heading(title, level=1)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def markdown_document(passage: str) -> bytes:
    text = "\n\n".join(
        f"## {title}\n\n" + "\n\n".join(paragraphs)
        for title, paragraphs in sections(passage)
    )
    return f"# Team handbook\n\n{text}\n".encode()


def text_document(passage: str) -> bytes:
    text = "\n\n".join(
        f"{title}\n\n" + "\n\n".join(paragraphs)
        for title, paragraphs in sections(passage)
    )
    return text.encode()


def html_document(passage: str) -> bytes:
    body = "".join(
        f"<h2>{title}</h2>" + "".join(f"<p>{p}</p>" for p in paragraphs)
        for title, paragraphs in sections(passage)
    )
    return (
        "<!doctype html><html><head><title>Handbook</title></head>"
        f"<body><h1>Team handbook</h1>{body}</body></html>"
    ).encode()


KINDS = {
    "pdf": ("report.pdf", "application/pdf", pdf_document),
    "docx": (
        "report.docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        docx_document,
    ),
    "md": ("notes.md", "text/markdown", markdown_document),
    "txt": ("notes.txt", "text/plain", text_document),
    "html": ("page.html", "text/html", html_document),
}
"""Per kind: a file name, its content type and a maker taking the passage."""


def big_pdf(pages: int) -> bytes:
    """A long report: ``pages`` pages of headed, dense paragraphs."""
    body = []
    for number in range(1, pages + 1):
        body.append(
            [
                f"Chapter {number}",
                *(f"Section {number}.{p}: " + FILLER * 4 for p in range(1, 5)),
            ]
        )
    return pdf(body)
