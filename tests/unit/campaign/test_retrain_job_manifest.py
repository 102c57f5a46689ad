"""The campaign retrain Job (issue #16 item 5), rendered in both overlays with the manifest
tests' tooling (whose strict schema validation covers it too): a suspended template that runs
`maskprop campaign retrain` with the same lock-down as the services, secrets from Secrets."""

from __future__ import annotations

from typing import Any

from tests.unit.test_k8s_manifests import kubectl, overlay  # noqa: F401 (fixtures)


def test_retrain_job_is_a_suspended_locked_down_template(overlay: tuple[str, Any]) -> None:  # noqa: F811
    _, docs = overlay
    (job,) = [d for d in docs if d["kind"] == "Job"]
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
