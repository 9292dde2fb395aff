"""Which errors from Postgres pass when the same work is tried again, as every writer and poller here does.

For the durable writers anything else (a constraint the data breaks, a missing table) is a bug or a broken
installation: it is raised, and the daemon stops with the reason rather than retrying forever.
"""

from __future__ import annotations

import asyncpg

# Errors that pass when tried again: connection loss, a restart (admin shutdown, "starting up"), timeouts, a
# deadlock or serialization failure between replicas, too many connections.
TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.InsufficientResourcesError,
    # What asyncpg raises on a connection that the server cut in the middle of an operation (seen when Postgres
    # restarts under load); the pool drops that connection, and the next try gets a new one.
    asyncpg.InternalClientError,
)


def describe_error(exc: BaseException) -> str:
    """An error as a log line names it: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
