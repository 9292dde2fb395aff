"""The daemon's Postgres pools, each opened once its schema is found current: postgres.dsn's, and the attempt log's
own database (postgres.attempts_dsn) when it has one.
"""

from __future__ import annotations

import asyncpg
import structlog

from webhookd.durable.transient import TRANSIENT
from webhookd.runtime.tls import PostgresConnect, Transport

log = structlog.get_logger("webhookd.runtime.databases")

# The newest migration's objects: present, the schema is current.
_SCHEMA_CURRENT = (
    "SELECT to_regclass('webhookd.deliveries') IS NOT NULL AND to_regclass('webhookd.endpoints') IS NOT NULL "
    "AND to_regclass('webhookd.pacing') IS NOT NULL AND to_regclass('webhookd.webhook_options') IS NOT NULL "
    "AND to_regprocedure('webhookd.retire_attempts(double precision)') IS NOT NULL"
)
# The same in the attempt log's database.
_ATTEMPT_LOG_CURRENT = (
    "SELECT to_regclass('webhookd.attempt_log') IS NOT NULL AND to_regclass('webhookd.first_tries') IS NOT NULL "
    "AND to_regclass('webhookd.attempt_counts') IS NOT NULL"
)


class DatabaseUnusable(Exception):
    """A database cannot be reached or is not migrated; the message names its key and what to do."""


async def open_pools(links: Transport, size: int, own_attempt_log: bool) -> tuple[asyncpg.Pool, asyncpg.Pool | None]:
    """The main pool, and the attempt log's own pool if `own_attempt_log` (postgres.attempts_dsn is set)."""
    pool = await _open_pool(links.postgres, "postgres.dsn", size, _SCHEMA_CURRENT)
    try:
        if not own_attempt_log:
            await _check_schema(pool, "postgres.dsn", _ATTEMPT_LOG_CURRENT)
            return pool, None
        return pool, await _attempt_log_pool(links.attempts)
    except BaseException:
        await pool.close()
        raise


async def _open_pool(link: PostgresConnect, key: str, size: int, schema_check: str) -> asyncpg.Pool:
    """A pool on one of the daemon's databases, once its schema is found current."""
    try:
        pool = await asyncpg.create_pool(link.dsn, ssl=link.ssl, min_size=1, max_size=size, timeout=10)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnusable(f"cannot connect to Postgres ({key}): {exc}") from exc
    assert pool is not None
    try:
        await _check_schema(pool, key, schema_check)
    except BaseException:
        await pool.close()
        raise
    return pool


async def _check_schema(pool: asyncpg.Pool, key: str, schema_check: str) -> None:
    try:
        current = await pool.fetchval(schema_check)
    except (*TRANSIENT, asyncpg.PostgresError) as exc:
        raise DatabaseUnusable(f"cannot check the webhookd schema ({key}): {exc}") from exc
    if not current:
        raise DatabaseUnusable(
            f"the webhookd schema ({key}) is missing or out of date: run `webhookd migrate --config FILE`"
        )


async def _attempt_log_pool(link: PostgresConnect) -> asyncpg.Pool:
    """A pool on the attempt log's own database (postgres.attempts_dsn), whose writer and keeper take a connection
    at a time. It connects when first used: that database being away holds up the log's writes, which wait in
    memory, never the deliveries. One that answers without the attempt log's tables is refused."""
    pool = await asyncpg.create_pool(link.dsn, ssl=link.ssl, min_size=0, max_size=2, timeout=10)
    assert pool is not None
    try:
        current = await pool.fetchval(_ATTEMPT_LOG_CURRENT)
    except TRANSIENT as exc:
        log.warning("attempt_log_database_unreachable", error=str(exc) or type(exc).__name__)
        return pool
    except asyncpg.PostgresError as exc:
        await pool.close()
        raise DatabaseUnusable(f"cannot check the webhookd schema (postgres.attempts_dsn): {exc}") from exc
    if not current:
        await pool.close()
        raise DatabaseUnusable(
            "the webhookd schema (postgres.attempts_dsn) is missing or out of date: "
            "run `webhookd migrate --config FILE`"
        )
    return pool
