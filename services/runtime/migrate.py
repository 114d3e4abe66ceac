"""``python -m services.runtime.migrate``: applies pending migrations and exits."""

from __future__ import annotations

import asyncio
import logging
import sys

from services.runtime import logs
from services.runtime.config import ConfigError, DatabaseConfig, Env
from services.runtime.db import SchemaError, migrate

logger = logging.getLogger(__name__)


def main() -> int:
    env = Env()
    logs.configure("migrate", env)
    try:
        config = DatabaseConfig.from_env(env)
        applied = asyncio.run(migrate(config.url, config.embedding_dim))
    except (ConfigError, SchemaError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info("schema up to date; applied %s", applied or "nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
