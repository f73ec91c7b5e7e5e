"""Vendor a CustomResourceDefinition's schema for deploy/k8s/validate.py: one JSON file per kind.

    python deploy/k8s/schemas/vendor.py CRD.yaml --version v1 --source "owner/repo@tag:path (commit)"

Keeps the ``openAPIV3Schema`` of one served version, less every ``description`` and the ``status``
subtree (the manifests never set either; this takes KubeRay's RayJob from 1.4 MB of YAML to 0.2 MB
of JSON), and writes ``<plural>.<group>.<version>.json`` next to this file, with where it came from.
The schema itself is the published one, unchanged otherwise: validate.py adds the API server's own
strictness (unknown fields are errors) when it loads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def stripped(node: Any) -> Any:
    """``node`` without its ``description`` keys (a property *named* description is kept)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "properties" and isinstance(value, dict):
                out[key] = {name: stripped(schema) for name, schema in value.items()}
            else:
                out[key] = stripped(value)
        return out
    if isinstance(node, list):
        return [stripped(item) for item in node]
    return node


def vendor(crd_file: Path, version: str, source: str) -> Path:
    crd = yaml.safe_load(crd_file.read_text(encoding="utf-8"))
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"{crd_file}: not a CustomResourceDefinition")
    spec = crd["spec"]
    served = {v["name"]: v for v in spec["versions"]}
    if version not in served:
        raise SystemExit(f"{crd_file}: no version {version} (has {', '.join(served)})")
    schema = stripped(served[version]["schema"]["openAPIV3Schema"])
    schema.get("properties", {}).pop("status", None)
    document = {
        "group": spec["group"],
        "version": version,
        "kind": spec["names"]["kind"],
        "source": source,
        "note": "The CRD's openAPIV3Schema as published, less descriptions and status (deploy/k8s/schemas/vendor.py).",
        "schema": schema,
    }
    out = HERE / f"{spec['names']['plural']}.{spec['group']}.{version}.json"
    out.write_text(json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n", encoding="utf-8")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition YAML file")
    parser.add_argument("--version", required=True, help="the served version to keep, e.g. v1")
    parser.add_argument("--source", required=True, help="where the file came from: repository, tag, path, commit")
    args = parser.parse_args()
    print(vendor(args.crd, args.version, args.source))


if __name__ == "__main__":
    main()
