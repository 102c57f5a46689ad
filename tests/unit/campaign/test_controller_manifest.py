"""The campaign controller's Kubernetes manifest, rendered in both overlays with the same
tooling as tests/unit/test_k8s_manifests.py (whose checks of every container, strict schema
validation included, cover it too): gRPC probes, prod settings, secrets from Secrets only."""

from __future__ import annotations

from typing import Any

from tests.unit.test_k8s_manifests import GRPC_PORT, kubectl, overlay  # noqa: F401 (fixtures)


def test_controller_is_deployed_like_the_other_grpc_services(overlay: tuple[str, Any]) -> None:  # noqa: F811
    name, docs = overlay
    (deployment,) = [
        d
        for d in docs
        if d["kind"] == "Deployment"
        and d["metadata"]["labels"].get("app.kubernetes.io/name") == "controller"
    ]
    (service,) = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "maskprop-controller"
    ]
    assert service["spec"]["ports"][0]["port"] == GRPC_PORT
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "maskprop/controller:0.1.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
    env = {e["name"]: e for e in container["env"]}
    assert env["MASKPROP_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "maskprop-redis"
    token = env["MASKPROP_CONTROLLER_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "maskprop-controller", "key": "admin-token"}
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    (source,) = container["envFrom"]
    assert configmaps[source["configMapRef"]["name"]]["MASKPROP_ENV"] == "prod", name
