"""Chunks for retrieval: elements packed up to a size, titles kept with their text.

A chunk never ends with a title: a title starts a new chunk and stays with
the text under it, and every further chunk of the same section repeats it
as its first line, so a passage found alone still says what it is about.
Consecutive chunks of one section share ``overlap`` characters, cut at a
word boundary, so a sentence split between them is found in either.
An element that fits in a chunk of its own is not split across two; a
longer one fills the open chunk and goes on in the next, cut at a sentence
end, else at a space.
A chunk's page is the page its first new text comes from.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from services.ingest.parsing import Element

logger = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
_SEPARATOR = "\n\n"
_MIN_PIECE = 80
"""Below this much room a chunk ends instead of taking a sliver of the next text."""


@dataclass(frozen=True)
class Chunk:
    index: int
    page: int | None
    text: str


def _tail(text: str, size: int) -> str:
    """The last ``size`` characters of ``text``, starting at a word."""
    if size <= 0 or len(text) <= size:
        return text if size > 0 else ""
    cut = text[-size:]
    space = cut.find(" ")
    return cut[space + 1 :] if 0 <= space < len(cut) - 1 else cut


def _cut(text: str, size: int) -> tuple[str, str]:
    """The first at most ``size`` characters of ``text``, cut where it reads
    best (a sentence end in the second half, else a space), and the rest."""
    window = text[: size + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() <= size]
    cut = ends[-1] if ends and ends[-1] > size // 2 else window.rfind(" ")
    if cut <= 0:
        cut = size
    return text[:cut].strip(), text[cut:].strip()


class _Packer:
    def __init__(self, size: int, overlap: int) -> None:
        self.size = size
        self.overlap = overlap
        self.chunks: list[Chunk] = []
        self.title = ""
        self.title_page: int | None = None
        self.title_alone = False
        """True from a title until the first text under it."""
        self.body: list[str] = []
        self.fresh = False
        """True once the open chunk holds text of its own, not only overlap."""
        self.page: int | None = None
        self.carry = ""

    @property
    def heading(self) -> str:
        # A heading longer than a quarter chunk is cut, so text still fits.
        return self.title[: self.size // 4]

    @property
    def budget(self) -> int:
        return self.size - (len(self.heading) + len(_SEPARATOR) if self.title else 0)

    def used(self) -> int:
        return sum(len(p) + len(_SEPARATOR) for p in self.body)

    def flush(self, keep_overlap: bool) -> None:
        if not self.body:
            return
        text = _SEPARATOR.join(self.body)
        content = f"{self.heading}{_SEPARATOR}{text}" if self.title else text
        self.chunks.append(Chunk(len(self.chunks), self.page, content))
        self.carry = _tail(text, self.overlap) if keep_overlap else ""
        self.body = []

    def add_title(self, element: Element) -> None:
        self.flush(keep_overlap=False)
        if self.title_alone:
            # A heading right under another heading: both lead the section.
            self.title = f"{self.title}\n{element.text}"
        else:
            self.title = element.text
            self.title_page = element.page
        self.title_alone = True
        self.carry = ""

    def add_text(self, element: Element) -> None:
        text = element.text
        while text:
            if not self.body:
                first = self.title_page if self.title_alone else None
                self.page = first if first is not None else element.page
                self.fresh = False
                if self.carry:
                    self.body.append(self.carry)
            room = self.budget - self.used()
            if len(text) <= room:
                self.body.append(text)
                self.fresh = True
                break
            if self.fresh and len(text) <= self.budget - self.overlap - len(_SEPARATOR):
                # It fits whole in the next chunk: end this one between elements.
                self.flush(keep_overlap=True)
                continue
            if self.fresh and room < _MIN_PIECE:
                self.flush(keep_overlap=True)
                continue
            piece, text = _cut(text, max(room, _MIN_PIECE))
            self.body.append(piece)
            self.fresh = True
            self.flush(keep_overlap=True)
        self.title_alone = False

    def finish(self) -> list[Chunk]:
        self.flush(keep_overlap=False)
        if self.title_alone:
            # A document that ends with a heading: keep its words searchable.
            self.chunks.append(Chunk(len(self.chunks), self.title_page, self.heading))
        return self.chunks


def chunk(elements: Iterable[Element], size: int, overlap: int) -> list[Chunk]:
    """Packs the elements, in order, into chunks of at most about ``size`` chars."""
    packer = _Packer(size, overlap)
    for element in elements:
        if element.is_title:
            packer.add_title(element)
        else:
            packer.add_text(element)
    return packer.finish()
