"""Publish: make a registry version the live model of an alias's root, so running servers switch by themselves.

Every promotion, rollback and follower goes through :func:`publish_alias`; the version's
files come from the model store (pipelines/registry/store.py). Never imports torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines.context import RunContext
from pipelines.registry.store import materialize_version
from pipelines.settings import FluxoSettings
from serving.contract import ModelDir

log = logging.getLogger(__name__)


def model_root(root: Path, settings: FluxoSettings, name: str, alias: str | None = None) -> Path:
    """The directory whose ``current.json`` names the live ``name`` model of ``alias`` (serving/reload.py).

    The champion's root is ``<model_cache>/<name>``, another alias's ``<model_cache>/<name>.<alias>``.
    ``fluxo serve`` starts the service on these roots, and every alias move republishes
    them, so a running server switches by itself.
    """
    alias = alias or settings.tracking.champion_alias
    suffix = "" if alias == settings.tracking.champion_alias else f".{alias}"
    return Path(root) / settings.serve.model_cache / f"{name}{suffix}"


def publish_alias(ctx: RunContext, name: str, version: str, alias: str, local: Path | None = None) -> ModelDir:
    """Make ``name`` v``version`` the live ``alias`` model of every server started on that alias's root."""
    from serving.reload import publish

    served = materialize_version(ctx, name, version, alias, local)
    live_root = model_root(ctx.root, ctx.settings, name, alias)
    publish(live_root, served.path)
    log.info("published %s v%s as the live %s under %s", name, version, alias, live_root)
    return served
