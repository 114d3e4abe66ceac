"""The chat service's RPCs: conversations and the streamed chat turn."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from services.chat import prompt
from services.chat.config import ChatConfig
from services.chat.metrics import TurnStats
from services.chat.ratelimit import ChatRateLimiter, LimiterUnavailable
from services.chat.store import (
    ConversationStore,
    StoredConversation,
    StoredMessage,
    decode_cursor,
    parse_id,
    title_from,
)
from services.proto.janna.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    rag_pb2,
    rag_pb2_grpc,
)
from services.runtime import errors, identity
from services.runtime.identity import Caller

logger = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

UNAVAILABLE_MESSAGE = "AI service temporarily unavailable"
DEFAULT_PAGE = 20
MAX_PAGE = 100
MAX_TITLE_CHARS = 200
DEFAULT_ROUTE = "chat"
"""The gateway's route for a turn that names no model."""
ROUTES_TTL_S = 60.0
ROUTES_TIMEOUT_S = 1.0


def _timestamp(value: Any) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _citation(data: dict[str, Any]) -> chat_pb2.Citation:
    return chat_pb2.Citation(
        marker=int(data.get("marker", 0)),
        attachment_id=str(data.get("attachmentId", "")),
        filename=str(data.get("filename", "")),
        page=int(data.get("page", 0)),
        snippet=str(data.get("snippet", "")),
    )


def _message_pb(message: StoredMessage) -> chat_pb2.Message:
    return chat_pb2.Message(
        id=str(message.id),
        conversation_id=str(message.conversation_id),
        role=message.role,
        content=message.content,
        status=message.status,
        model=message.model,
        citations=[_citation(c) for c in message.citations],
        created_at=_timestamp(message.created_at),
    )


def _conversation_pb(conversation: StoredConversation) -> chat_pb2.Conversation:
    return chat_pb2.Conversation(
        id=str(conversation.id),
        title=conversation.title,
        created_at=_timestamp(conversation.created_at),
        updated_at=_timestamp(conversation.updated_at),
        messages=[_message_pb(m) for m in conversation.messages],
    )


def _activity(step: str, message: str, conversation_id: str = "") -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        type="activity",
        activity=chat_pb2.Activity(
            step=step, message=message, conversation_id=conversation_id
        ),
    )


def _error(code: str, message: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        type="error", error=chat_pb2.ErrorEvent(code=code, message=message)
    )


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w{4,}")


def _snippet(text: str, query: str, limit: int = 200) -> str:
    """The sentence of ``text`` that shares the most words with the query."""
    flat = " ".join(text.split())
    wanted = {w.lower() for w in _WORD.findall(query)}
    sentences = _SENTENCE_END.split(flat) or [flat]
    best = max(
        sentences,
        key=lambda s: len(wanted & {w.lower() for w in _WORD.findall(s)}),
    )
    return best if len(best) <= limit else best[:limit].rsplit(" ", 1)[0] + "…"


def citations_for(
    answer: str, passages: Sequence[rag_pb2.Chunk], query: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The passages the answer cites (by marker) and the other retrieved ones."""
    cited_numbers = prompt.cited_markers(answer, len(passages))

    def describe(number: int, chunk: rag_pb2.Chunk) -> dict[str, Any]:
        return {
            "marker": number,
            "attachmentId": chunk.attachment_id,
            "filename": chunk.filename,
            "page": chunk.page,
            "snippet": _snippet(chunk.content, query),
        }

    cited = [describe(n, passages[n - 1]) for n in cited_numbers]
    sources = [
        describe(0, chunk)
        for number, chunk in enumerate(passages, start=1)
        if number not in cited_numbers
    ]
    return cited, sources


def _forwarded(caller: Caller, context: Context) -> tuple[tuple[str, str], ...]:
    """Metadata for calls made on the caller's behalf: identity and request id."""
    request_id = dict(context.invocation_metadata() or ()).get("x-request-id")
    extra = (("x-request-id", str(request_id)),) if request_id else ()
    return (*caller.metadata(), *extra)


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        config: ChatConfig,
        store: ConversationStore,
        limiter: ChatRateLimiter,
        gateway: gateway_pb2_grpc.ModelGatewayStub,
        retrieval: rag_pb2_grpc.RetrievalServiceStub,
        stats: TurnStats,
    ) -> None:
        self._config = config
        self._store = store
        self._limiter = limiter
        self._gateway = gateway
        self._retrieval = retrieval
        self._stats = stats
        self._routes: dict[str, str] = {}
        self._routes_read_at = -math.inf

    async def _owned(
        self, caller: Caller, raw_id: str, context: Context
    ) -> StoredConversation:
        conversation_id = parse_id(raw_id)
        found = None
        if conversation_id is not None:
            found = await self._store.get(caller.user_id, conversation_id)
        if found is None:
            await errors.abort(
                context, grpc.StatusCode.NOT_FOUND, "conversation not found"
            )
        return found

    async def CreateConversation(
        self, request: chat_pb2.CreateConversationRequest, context: Context
    ) -> chat_pb2.Conversation:
        caller = await identity.caller(context)
        title = " ".join(request.title.split())
        if len(title) > MAX_TITLE_CHARS:
            await errors.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"title is longer than {MAX_TITLE_CHARS} characters",
            )
        return _conversation_pb(await self._store.create(caller.user_id, title))

    async def ListConversations(
        self, request: chat_pb2.ListConversationsRequest, context: Context
    ) -> chat_pb2.ListConversationsResponse:
        caller = await identity.caller(context)
        if request.page_size < 0 or request.page_size > MAX_PAGE:
            await errors.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"pageSize must be between 1 and {MAX_PAGE}",
            )
        after = None
        if request.page_token:
            after = decode_cursor(request.page_token)
            if after is None:
                await errors.abort(
                    context, grpc.StatusCode.INVALID_ARGUMENT, "pageToken is not valid"
                )
        found, token = await self._store.page(
            caller.user_id, request.page_size or DEFAULT_PAGE, after
        )
        return chat_pb2.ListConversationsResponse(
            conversations=[_conversation_pb(c) for c in found], next_page_token=token
        )

    async def GetConversation(
        self, request: chat_pb2.GetConversationRequest, context: Context
    ) -> chat_pb2.Conversation:
        caller = await identity.caller(context)
        return _conversation_pb(
            await self._owned(caller, request.conversation_id, context)
        )

    async def RenameConversation(
        self, request: chat_pb2.RenameConversationRequest, context: Context
    ) -> chat_pb2.Conversation:
        caller = await identity.caller(context)
        title = " ".join(request.title.split())
        if not title or len(title) > MAX_TITLE_CHARS:
            await errors.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"title must have 1 to {MAX_TITLE_CHARS} characters",
            )
        conversation_id = parse_id(request.conversation_id)
        renamed = None
        if conversation_id is not None:
            renamed = await self._store.rename(caller.user_id, conversation_id, title)
        if renamed is None:
            await errors.abort(
                context, grpc.StatusCode.NOT_FOUND, "conversation not found"
            )
        return _conversation_pb(renamed)

    async def DeleteConversation(
        self, request: chat_pb2.DeleteConversationRequest, context: Context
    ) -> empty_pb2.Empty:
        caller = await identity.caller(context)
        conversation_id = parse_id(request.conversation_id)
        if conversation_id is None or not await self._store.delete(
            caller.user_id, conversation_id
        ):
            await errors.abort(
                context, grpc.StatusCode.NOT_FOUND, "conversation not found"
            )
        return empty_pb2.Empty()

    async def _admit(self, caller: Caller, context: Context) -> None:
        """The per-user limit, checked before the stream opens."""
        try:
            decision = await self._limiter.admit(caller.user_id)
        except LimiterUnavailable:
            # The limit protects paid models, so it fails closed.
            logger.warning("chat rate limiter unavailable; refusing the turn")
            self._stats.rate_limited("RATE_LIMITER_UNAVAILABLE")
            await errors.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "rate limiting is unavailable; try again shortly",
                "RATE_LIMITER_UNAVAILABLE",
                metadata=(("retry-after", "5"),),
            )
        if not decision.allowed:
            self._stats.rate_limited("RATE_LIMITED")
            await errors.abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"chat rate limit reached ({self._config.rate_limit_rpm} per "
                f"{self._config.rate_window_s} s); retry in "
                f"{decision.retry_after_s} s",
                "RATE_LIMITED",
                metadata=(("retry-after", str(decision.retry_after_s)),),
            )

    async def _retrieve(
        self,
        request: chat_pb2.ChatTurnRequest,
        metadata: tuple[tuple[str, str], ...],
    ) -> rag_pb2.SearchResponse:
        reply: rag_pb2.SearchResponse = await self._retrieval.Search(
            rag_pb2.SearchRequest(
                query=request.message,
                limit=self._config.rag_limit,
                attachment_ids=list(request.attachment_ids),
            ),
            metadata=metadata,
            timeout=self._config.rag_timeout_s,
        )
        return reply

    async def _first_choice(
        self, model: str, metadata: tuple[tuple[str, str], ...]
    ) -> str:
        """The model a turn asking for ``model`` goes to first, to count tokens for.

        ``model`` is a model, a route name, or empty for the gateway's default
        route; the routes are asked of the gateway at most once a minute.
        """
        now = time.monotonic()
        if now - self._routes_read_at > ROUTES_TTL_S:
            try:
                reply = await self._gateway.ListModels(
                    gateway_pb2.ListModelsRequest(),
                    metadata=metadata,
                    timeout=ROUTES_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as exc:
                logger.warning("model routes unavailable: %s", exc.code())
            else:
                self._routes = {r.name: r.chain[0] for r in reply.routes if r.chain}
            self._routes_read_at = now
        return self._routes.get(model or DEFAULT_ROUTE, model)

    async def StreamChat(
        self, request: chat_pb2.ChatTurnRequest, context: Context
    ) -> AsyncIterator[chat_pb2.ChatEvent]:
        # Time to first token is measured from here, as near to the user's
        # click as this service sees it.
        started = time.perf_counter()
        caller = await identity.caller(context)
        message = request.message.strip()
        if not message:
            await errors.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "message is empty"
            )
        if len(request.message) > self._config.max_message_chars:
            await errors.abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"message is longer than {self._config.max_message_chars} characters",
            )
        for raw in request.attachment_ids:
            if parse_id(raw) is None:
                await errors.abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "attachmentIds must be ids",
                )

        if request.conversation_id:
            conversation = await self._owned(caller, request.conversation_id, context)
        else:
            conversation = None
        await self._admit(caller, context)
        if conversation is None:
            conversation = await self._store.create(caller.user_id, title_from(message))
        conversation_id = str(conversation.id)
        history = [
            prompt.Turn(m.role, m.content)
            for m in await self._store.messages(conversation.id)
            if m.content
        ]
        await self._store.add_message(conversation.id, "user", message)

        yield _activity("conversation", "conversation ready", conversation_id)
        yield _activity("rate_limit", "rate limit checked", conversation_id)

        metadata = _forwarded(caller, context)
        passages: list[rag_pb2.Chunk] = []
        # Unset, ragEnabled means "when there is something to search": the
        # rag service answers at once, without embedding the message, when
        # the caller has no ready document in scope.
        rag_enabled = request.rag_enabled if request.HasField("rag_enabled") else True
        if rag_enabled:
            yield _activity("retrieving", "searching your documents", conversation_id)
            try:
                retrieved = await self._retrieve(request, metadata)
            except grpc.aio.AioRpcError as exc:
                logger.warning("retrieval failed: %s", exc.code())
                yield _activity(
                    "retrieved", "document search is unavailable", conversation_id
                )
            else:
                passages = list(retrieved.chunks)
                found = len(passages)
                if retrieved.searchable_chunks == 0:
                    yield _activity(
                        "retrieved", "no ready documents to search", conversation_id
                    )
                else:
                    noun = "passage" if found == 1 else "passages"
                    yield _activity(
                        "retrieved", f"{found} {noun} found", conversation_id
                    )

        model = request.model
        messages, dropped = prompt.build(
            history,
            message,
            passages,
            self._config.history_max_tokens,
            prompt.token_counter(await self._first_choice(model, metadata)),
        )
        if dropped:
            logger.info("history trimmed: %s earlier messages left out", dropped)

        answer: list[str] = []
        chosen = gateway_pb2.ModelChosen()
        call = self._gateway.Generate(
            gateway_pb2.GenerateRequest(
                messages=messages,
                model=model,
                max_tokens=self._config.max_output_tokens,
            ),
            metadata=metadata,
        )
        status = "error"
        done = gateway_pb2.GenerateDone()
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "model_chosen":
                    chosen = event.model_chosen
                    if chosen.fallback:
                        yield _activity(
                            "fallback",
                            f"fell back to {chosen.provider}:{chosen.model}",
                            conversation_id,
                        )
                    yield _activity(
                        "model", f"{chosen.provider}:{chosen.model}", conversation_id
                    )
                elif kind == "delta":
                    if not answer:
                        self._stats.first_token(time.perf_counter() - started)
                    answer.append(event.delta)
                    yield chat_pb2.ChatEvent(
                        type="token", token=chat_pb2.Token(text=event.delta)
                    )
                elif kind == "done":
                    done = event.done
            status = "complete"
        except grpc.aio.AioRpcError as exc:
            logger.warning("generation failed: %s %s", exc.code(), exc.details())
            code, text = _turn_error(exc)
            yield _error(code, text)
        except asyncio.CancelledError:
            # The client went away: stop the model at once and keep what it saw.
            call.cancel()
            status = "stopped"
            raise
        finally:
            self._stats.turn_ended(status)
            text = "".join(answer)
            cited, sources = (
                citations_for(text, passages, message)
                if status == "complete"
                else ([], [])
            )
            stored = await asyncio.shield(
                self._store.add_message(
                    conversation.id,
                    "assistant",
                    text,
                    status=status,
                    provider=done.provider or chosen.provider,
                    model=done.model or chosen.model,
                    citations=cited,
                    input_tokens=done.usage.input_tokens,
                    output_tokens=done.usage.output_tokens,
                )
            )
        if status != "complete":
            return
        if passages:
            yield chat_pb2.ChatEvent(
                type="citations",
                citations=chat_pb2.Citations(
                    cited=[_citation(c) for c in cited],
                    sources=[_citation(s) for s in sources],
                ),
            )
        yield chat_pb2.ChatEvent(
            type="done",
            done=chat_pb2.Done(
                message_id=str(stored.id),
                conversation_id=conversation_id,
                provider=done.provider,
                model=done.model,
                usage=done.usage,
            ),
        )


def _turn_error(exc: grpc.aio.AioRpcError) -> tuple[str, str]:
    """The error event for a failed generation: a stable code and the message."""
    code = exc.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return "RATE_LIMITED", exc.details() or "the model provider is rate limiting"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return "MODEL_UNAVAILABLE", UNAVAILABLE_MESSAGE
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return "INVALID_REQUEST", exc.details() or "the model refused the request"
    return "MODEL_ERROR", UNAVAILABLE_MESSAGE


class RateLimitAdminServicer(admin_pb2_grpc.RateLimitAdminServicer):
    def __init__(self, limiter: ChatRateLimiter) -> None:
        self._limiter = limiter

    async def ResetRateLimit(
        self, request: admin_pb2.ResetRateLimitRequest, context: Context
    ) -> empty_pb2.Empty:
        admin = await identity.admin(context)
        if not request.user_id:
            await errors.abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "userId is empty"
            )
        removed = await self._limiter.reset(request.user_id)
        logger.info(
            "rate limits reset user=%s keys=%s by=%s",
            request.user_id,
            removed,
            admin.user_id,
        )
        return empty_pb2.Empty()
