"""One log format for every service: short lines in development, JSON in production."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

from services.runtime.config import ConfigError, Env

logger = logging.getLogger(__name__)

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
"""The id of the request being served (Envoy's ``x-request-id``), per task."""


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record, so every line carries it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.rid = f" rid={request_id}" if request_id else ""
        return True


_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
) | {"message", "asctime", "rid"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line, with the fields passed through ``extra=``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and value != "":
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(service: str, env: Env) -> None:
    """Installs the process's one handler; called only from a ``main``.

    ``JANNA_LOG_FORMAT`` is ``json`` or ``text`` (the default),
    ``JANNA_LOG_LEVEL`` a level name (default INFO), and ``JANNA_LOG_LEVELS``
    sets single loggers apart, ``services.gateway=DEBUG,grpc=WARNING``.
    """
    handler = logging.StreamHandler(sys.stderr)
    if env.text("JANNA_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname).1s {service} %(name)s: %(message)s%(rid)s",
                datefmt="%H:%M:%S",
            )
        )
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_level("JANNA_LOG_LEVEL", env.text("JANNA_LOG_LEVEL", "INFO")))
    # Client libraries log request bodies and headers at debug level.
    for noisy in (
        "botocore",
        "aiobotocore",
        "httpx",
        "httpcore",
        "openai",
        "anthropic",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for item in env.items("JANNA_LOG_LEVELS"):
        name, sep, level = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"JANNA_LOG_LEVELS: {item!r} is not logger=LEVEL")
        logging.getLogger(name.strip()).setLevel(_level("JANNA_LOG_LEVELS", level))


def _level(variable: str, text: str) -> int:
    level = logging.getLevelName(text.strip().upper())
    if not isinstance(level, int):
        raise ConfigError(f"{variable}: {text!r} is not a log level")
    return level
