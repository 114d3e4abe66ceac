"""Blocking loads off the event loop, in threads that never hold up process exit."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def in_daemon_thread(name: str, work: Callable[[], T]) -> asyncio.Future[T]:
    """Runs ``work`` in a daemon thread; its result arrives as a future.

    For model loads of many seconds: a SIGTERM during one must not keep the
    process alive until it ends, as an executor's worker thread would.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def succeed(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def fail(error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def run() -> None:
        try:
            try:
                result = work()
            except BaseException as exc:  # handed to the awaiting task
                loop.call_soon_threadsafe(fail, exc)
            else:
                loop.call_soon_threadsafe(succeed, result)
        except RuntimeError:
            logger.debug("%s finished after the event loop closed", name)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
