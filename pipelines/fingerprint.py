"""What makes two pipeline runs the same run: the data version, the resolved settings and the code.

A scheduled run whose fingerprint equals an earlier successful one's reuses that run's
results through Prefect's cache (persisted task results), instead of retraining and
registering a copy of the champion.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from pipelines.settings import FluxoSettings

_PACKAGES = ("models", "pipelines", "serving")
# Settings that change where or how a model is served or a flow is orchestrated, not what is trained.
_IGNORED_SECTIONS = {"serve", "monitor", "orchestration"}


@lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of every source file of the packages: any edit, committed or not, is a new version."""
    digest = hashlib.sha256()
    base = Path(__file__).resolve().parents[1]
    for package in _PACKAGES:
        for path in sorted((base / package).rglob("*.py")):
            digest.update(str(path.relative_to(base)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_fingerprint(project: Path, settings: FluxoSettings, data_version: str, tracking_uri: str) -> str:
    """One key for (project, tracking store, data version, settings, code): equal keys, equal runs."""
    resolved = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _IGNORED_SECTIONS}
    payload = json.dumps(
        {"project": str(Path(project).resolve()), "tracking": tracking_uri, "data": data_version,
         "settings": resolved, "code": code_version()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]
