"""Postgres: the connection pool, and schema migrations with one owner at a time.

Migrations are the ordered ``migrations/NNNN_name.sql`` files beside this
module. :func:`migrate` applies the ones not yet recorded in
``schema_migrations``, each in its own transaction, while holding a
session-level advisory lock, so that any number of processes may call it at
once and exactly one does the work. ``make run`` and the deployments run it
as its own step (``python -m services.runtime.migrate``) before the services
start; services only check the schema with :func:`check_schema`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.runtime.config import DatabaseConfig

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x4A414E4E41  # "JANNA": one advisory lock for every migrator
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaError(RuntimeError):
    """The database does not have the schema this code expects."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self, embedding_dim: int) -> str:
        return self.path.read_text().replace("{{EMBEDDING_DIM}}", str(embedding_dim))


def migrations(folder: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file, in version order."""
    found = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise SchemaError(f"migration file {path.name} is not NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaError("two migration files share a version number")
    return found


async def migrate(url: str, embedding_dim: int) -> list[int]:
    """Applies pending migrations; returns the versions it applied."""
    conn: asyncpg.Connection = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
            )
            done = {
                r["version"]
                for r in await conn.fetch("SELECT version FROM schema_migrations")
            }
            applied = []
            for migration in migrations():
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql(embedding_dim))
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                logger.info(
                    "migration applied version=%s name=%s",
                    migration.version,
                    migration.name,
                )
                applied.append(migration.version)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        await _check(conn, embedding_dim)
        return applied
    finally:
        await conn.close()


async def _check(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, embedding_dim: int
) -> None:
    latest = migrations()[-1].version
    try:
        version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        version = None
    if version is None or version < latest:
        raise SchemaError(
            f"database schema is at version {version or 0}, this code needs {latest}: "
            "run `python -m services.runtime.migrate` first"
        )
    # pgvector stores a vector column's dimension as its type modifier.
    dim = await conn.fetchval(
        """
        SELECT atttypmod FROM pg_attribute
        WHERE attrelid = 'document_chunks'::regclass AND attname = 'embedding'
        """
    )
    if dim != embedding_dim:
        raise SchemaError(
            f"document_chunks.embedding has {dim} dimensions but JANNA_EMBEDDING_DIM "
            f"is {embedding_dim}: the embedding model changed since the table was "
            "made; re-create the table (and re-ingest) or configure the old model"
        )


async def check_schema(pool: asyncpg.Pool, embedding_dim: int) -> None:
    """Raises :class:`SchemaError` unless every migration is applied and the
    vector column has the configured dimension."""
    async with pool.acquire() as conn:
        await _check(conn, embedding_dim)


async def connect(config: DatabaseConfig) -> asyncpg.Pool:
    """Opens the pool and checks the schema before any request is served."""
    pool = await asyncpg.create_pool(
        config.url,
        min_size=config.pool_min,
        max_size=config.pool_max,
        statement_cache_size=config.statement_cache_size,
    )
    try:
        await check_schema(pool, config.embedding_dim)
    except BaseException:
        await pool.close()
        raise
    return pool
