"""Transport security of the daemon's own connections: validated settings in, TLS contexts and connect arguments out.

Each link trusts what its operators expect of it:

- Kafka (`kafka.security_protocol` SSL or SASL_SSL): `kafka.ssl_ca_file`, when set, is the only trust anchor, as a
  Kafka truststore is; unset, the system's CAs. The host name is checked unless `kafka.ssl_check_hostname` is false.
- Postgres: with `postgres.ssl_mode` unset nothing is added, so the DSN's sslmode, sslrootcert, sslcert and sslkey
  (or the PG* variables) apply as asyncpg reads them. Set, it builds asyncpg's `ssl` argument, which takes precedence
  over the DSN, with libpq's meaning: `ssl_ca_file` is the only trust anchor (the system's CAs without it), and
  `require` verifies the chain only when a CA file is given.
- Receivers: always verified, against the system's CAs plus `delivery.ca_file` when set, so that an internal CA can
  be added without losing the public ones.

Everything is built once at startup and passed to whoever connects. A file that cannot be used (not PEM, a key that
does not match its certificate, an encrypted key) raises TLSError naming its configuration key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, NoReturn, TypedDict

from webhookd.runtime.config import DeliverySettings, KafkaSettings, PostgresSettings, Settings

__all__ = [
    "KafkaSecurity",
    "PostgresConnect",
    "TLSError",
    "Transport",
    "delivery_ssl_context",
    "kafka_security",
    "postgres_connect",
    "transport",
]


class TLSError(Exception):
    """A certificate, key or CA file named in the configuration cannot be used; the message names its key."""


class KafkaSecurity(TypedDict):
    """The security keyword arguments of aiokafka's consumer, producer and admin client."""

    security_protocol: str
    sasl_mechanism: str
    sasl_plain_username: str | None
    sasl_plain_password: str | None
    ssl_context: ssl.SSLContext | None


@dataclass(frozen=True, slots=True)
class PostgresConnect:
    """What every asyncpg connect and pool of the daemon is given: `asyncpg.connect(p.dsn, ssl=p.ssl)`.

    `ssl` None leaves the choice to the DSN; the other values are asyncpg's own (a mode it builds a context for,
    or a context of ours that it uses as it is).
    """

    dsn: str = field(repr=False)  # it may hold a password
    ssl: ssl.SSLContext | Literal["disable", "allow", "prefer"] | None = None


@dataclass(frozen=True, slots=True)
class Transport:
    """The TLS and SASL settings of all three links, built from one configuration."""

    postgres: PostgresConnect
    kafka: KafkaSecurity = field(repr=False)  # holds the SASL password
    delivery: ssl.SSLContext
    attempts: PostgresConnect  # the attempt log's database: postgres.attempts_dsn, with postgres' TLS settings


def transport(settings: Settings) -> Transport:
    """Build every link's settings; TLSError if a configured file cannot be used."""
    postgres = postgres_connect(settings.postgres)
    return Transport(
        postgres=postgres,
        kafka=kafka_security(settings.kafka),
        delivery=delivery_ssl_context(settings.delivery),
        attempts=dataclasses.replace(postgres, dsn=settings.postgres.attempt_log_dsn),
    )


def kafka_security(settings: KafkaSettings) -> KafkaSecurity:
    protocol = settings.security_protocol
    sasl = protocol.startswith("SASL_")
    context: ssl.SSLContext | None = None
    if protocol.endswith("SSL"):
        with _loading("kafka.ssl_ca_file"):
            # create_default_context(cafile=...) trusts that file alone; without one, the system's CAs.
            context = ssl.create_default_context(cafile=settings.ssl_ca_file)
        # verify_mode stays CERT_REQUIRED either way: skipping the host name check is the only relaxation offered.
        context.check_hostname = settings.ssl_check_hostname
        _load_client_certificate(context, "kafka", settings.ssl_cert_file, settings.ssl_key_file)
    password = settings.sasl_password
    return KafkaSecurity(
        security_protocol=protocol,
        sasl_mechanism=settings.sasl_mechanism,
        sasl_plain_username=settings.sasl_username if sasl else None,
        sasl_plain_password=password.get_secret_value() if sasl and password is not None else None,
        ssl_context=context,
    )


def postgres_connect(settings: PostgresSettings) -> PostgresConnect:
    mode = settings.ssl_mode
    if mode is None or mode in ("disable", "allow", "prefer"):
        # Neither of the opportunistic modes verifies anything, so asyncpg's own context for them is all there is.
        return PostgresConnect(settings.dsn, mode)
    with _loading("postgres.ssl_ca_file"):
        context = ssl.create_default_context(cafile=settings.ssl_ca_file)
    context.check_hostname = mode == "verify-full"
    if mode == "require" and settings.ssl_ca_file is None:
        # libpq's `require`: encrypted but unverified, unless a root certificate is given (then it is verify-ca).
        context.verify_mode = ssl.CERT_NONE
    # PostgreSQL 17+ accepts TLS without the SSLRequest round trip (sslnegotiation=direct in the DSN) only from
    # clients that offer this protocol name, as asyncpg's own contexts do.
    context.set_alpn_protocols(["postgresql"])
    _load_client_certificate(context, "postgres", settings.ssl_cert_file, settings.ssl_key_file)
    return PostgresConnect(settings.dsn, context)


def delivery_ssl_context(settings: DeliverySettings) -> ssl.SSLContext:
    # create_default_context(cafile=...) would trust that file *instead of* the system's CAs; loading it on top of
    # the default context keeps every public receiver working.
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        with _loading("delivery.ca_file"):
            context.load_verify_locations(cafile=settings.ca_file)
    # As aiohttp's own default context: deliveries are HTTP/1.1.
    context.set_alpn_protocols(["http/1.1"])
    return context


def _load_client_certificate(context: ssl.SSLContext, section: str, cert: str | None, key: str | None) -> None:
    if cert is None:
        return
    with _loading(f"{section}.ssl_cert_file/{section}.ssl_key_file"):
        context.load_cert_chain(cert, key, password=_no_passphrase)


def _no_passphrase() -> NoReturn:
    # Without a password callback OpenSSL would prompt on the terminal and hang a daemon that has none.
    raise TLSError("the private key is encrypted; webhookd takes unencrypted keys only")


@contextlib.contextmanager
def _loading(key: str) -> Iterator[None]:
    try:
        yield
    except TLSError as exc:
        raise TLSError(f"{key}: {exc}") from None
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TLSError(f"{key}: cannot be used: {reason}") from exc
