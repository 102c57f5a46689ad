"""The campaign retrain and autopilot Jobs (issue #16 item 5), rendered in both overlays with
the manifest tests' tooling (whose strict schema validation covers them too): suspended
templates that run `maskprop campaign retrain|autopilot` with the same lock-down as the
services, secrets from Secrets."""

from __future__ import annotations

from typing import Any

from tests.unit.test_k8s_manifests import kubectl, overlay  # noqa: F401 (fixtures)


def test_retrain_job_is_a_suspended_locked_down_template(overlay: tuple[str, Any]) -> None:  # noqa: F811
    _, docs = overlay
    (job,) = [d for d in docs if d["kind"] == "Job" and _name(d) == "campaign-retrain"]
    assert job["spec"]["suspend"] is True  # applying the base never starts training
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"]
    (c,) = pod["containers"]
    assert c["command"] == ["maskprop", "campaign", "retrain"]
    args = " ".join(c["args"])
    assert "--out=/models/$(CAMPAIGN)/round$(ROUND).pt" in args and "--round=$(ROUND)" in args
    env = {e["name"]: e for e in c["env"]}
    assert {"CAMPAIGN", "ROUND", "PREVIOUS_ROUND"} <= set(env)
    assert env["MASKPROP_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "maskprop-redis"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["images"]["readOnly"] is True and not mounts["models"].get("readOnly")


def _name(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/name"])


def test_autopilot_job_runs_beside_the_sink_and_reads_its_dataset(
    overlay: tuple[str, Any],  # noqa: F811
) -> None:
    _, docs = overlay
    (job,) = [d for d in docs if d["kind"] == "Job" and _name(d) == "campaign-autopilot"]
    assert job["spec"]["suspend"] is True
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["securityContext"]["runAsNonRoot"]
    # the sink's dataset volume is ReadWriteOnce: the autopilot runs on the sink's node
    (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "sink"}
    (c,) = pod["containers"]
    assert c["command"] == ["maskprop", "campaign", "autopilot"]
    assert "--models-root=/models" in c["args"] and "--dataset=/data/dataset" in c["args"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["dataset"]["readOnly"] is True and not mounts["models"].get("readOnly")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
