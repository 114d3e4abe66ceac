"""What may be uploaded: file names, types and sizes, and the S3 key of each file."""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass

logger = logging.getLogger(__name__)

MAX_FILENAME_BYTES = 255


class UploadRejected(ValueError):
    """The upload breaks a rule; the message tells the user which (HTTP 400)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FileType:
    """One kind of document the worker can parse."""

    kind: str
    """Short name: pdf, docx, pptx, xlsx, md, txt, html, csv or eml."""
    mime: str
    """The content type stored and shown for it."""
    extensions: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    """Other content types that clients send for the same files."""


FILE_TYPES = (
    FileType("pdf", "application/pdf", (".pdf",), ("application/x-pdf",)),
    FileType(
        "docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        (".docx",),
    ),
    FileType(
        "pptx",
        "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        (".pptx",),
    ),
    FileType(
        "xlsx",
        "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        (".xlsx",),
    ),
    FileType("md", "text/markdown", (".md", ".markdown"), ("text/x-markdown",)),
    FileType("txt", "text/plain", (".txt", ".text")),
    FileType("html", "text/html", (".html", ".htm"), ("application/xhtml+xml",)),
    FileType("csv", "text/csv", (".csv",), ("application/csv", "text/x-csv")),
    FileType("eml", "message/rfc822", (".eml",)),
)

# Browsers and curl send these when they do not know a file's type; the
# extension decides then.
_UNKNOWN_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream"})
_BY_MIME = {mime: t for t in FILE_TYPES for mime in (t.mime, *t.aliases)}
_BY_EXTENSION = {ext: t for t in FILE_TYPES for ext in t.extensions}
_SAFE_USER = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def allowed_extensions() -> str:
    return ", ".join(sorted({e.lstrip(".") for t in FILE_TYPES for e in t.extensions}))


def file_type(kind: str) -> FileType:
    """The type named ``kind`` (as stored by :func:`check_type`)."""
    for candidate in FILE_TYPES:
        if candidate.kind == kind:
            return candidate
    raise KeyError(kind)


def type_of_mime(mime: str) -> FileType | None:
    return _BY_MIME.get(mime)


def check_filename(raw: str) -> str:
    """The name as given, once it is shown to be a plain file name.

    A name is refused, not repaired, when it could act as a path or hide
    something from the people and logs that show it: separators, ``.`` and
    ``..``, control and other invisible format characters.
    """
    name = unicodedata.normalize("NFC", raw).strip()
    if not name:
        raise UploadRejected("filename is required", "FILENAME_MISSING")
    if "/" in name or "\\" in name:
        raise UploadRejected(
            "filename must be a plain file name, without folders",
            "FILENAME_PATH",
        )
    if name.strip(". ") == "" or name.startswith(".."):
        raise UploadRejected("filename must name a file", "FILENAME_PATH")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise UploadRejected(
            "filename must not contain control characters", "FILENAME_CONTROL"
        )
    if len(name.encode()) > MAX_FILENAME_BYTES:
        raise UploadRejected(
            f"filename is longer than {MAX_FILENAME_BYTES} bytes", "FILENAME_LONG"
        )
    return name


def check_type(filename: str, content_type: str) -> FileType:
    """The type of the upload: the extension decides, the content type must agree."""
    dot = filename.rfind(".")
    extension = filename[dot:].lower() if dot > 0 else ""
    by_extension = _BY_EXTENSION.get(extension)
    if by_extension is None:
        raise UploadRejected(
            f"files of this type are not accepted; allowed: {allowed_extensions()}",
            "TYPE_NOT_ALLOWED",
        )
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in _UNKNOWN_TYPES:
        return by_extension
    by_mime = _BY_MIME.get(mime)
    if by_mime is None:
        raise UploadRejected(
            f"content type {mime[:100]!r} is not accepted; "
            f"allowed: {allowed_extensions()}",
            "TYPE_NOT_ALLOWED",
        )
    if by_mime is not by_extension:
        raise UploadRejected(
            f"content type {mime!r} does not match the file's extension {extension!r}",
            "TYPE_MISMATCH",
        )
    return by_extension


def check_size(size: int, limit: int) -> None:
    if size <= 0:
        raise UploadRejected("the file is empty", "EMPTY_FILE")
    if size > limit:
        raise UploadRejected(
            f"the file is {size} bytes; the limit is {limit} bytes "
            f"({limit / (1024 * 1024):g} MiB)",
            "FILE_TOO_LARGE",
        )


def object_key(user_id: str, attachment_id: str, filename: str) -> str:
    """The S3 key of an attachment: below its user's prefix, never a path of
    the user's choosing.

    User ids of plain characters are used as they are, so an operator can
    list one user's objects; any other id is hashed.
    """
    user = (
        user_id
        if _SAFE_USER.match(user_id) and user_id.strip(".")
        else "h-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]
    )
    stem = _KEY_UNSAFE.sub("-", unicodedata.normalize("NFKD", filename)).strip(".-")
    return f"users/{user}/{attachment_id}/{stem[:100] or 'file'}"
