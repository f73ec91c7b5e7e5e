"""Promote, roll back, and say who is live: the registry's aliases as one-command operations.

Every move goes through :func:`pipelines.registry.versions.move_alias`, so the champion's
history is on its versions (``fluxo.champion.previous``/``since``/``until``), and is
republished to the alias's model root, so servers started by ``fluxo serve`` switch.
No torch here: these commands start in a fraction of a second.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipelines.errors import FluxoError
from pipelines.registry.versions import CONTRACT_TAG, champion_version, drop_alias_if_held, move_alias
from pipelines.context import RunContext
from pipelines.tracking import is_refusal

log = logging.getLogger(__name__)


def _version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as error:
        if is_refusal(error):
            raise
        import mlflow

        known = ", ".join(sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int))
        raise FluxoError(
            f"{name} has no version {version!r} in {mlflow.get_tracking_uri()} (versions: {known or 'none'}); "
            "`fluxo status` lists them"
        ) from None


def _check_same_contract(client: Any, name: str, alias: str, candidate: Any) -> None:
    held = champion_version(client, name, alias)
    if held is None or str(held.version) == str(candidate.version):
        return
    theirs, ours = held.tags.get(CONTRACT_TAG), candidate.tags.get(CONTRACT_TAG)
    if theirs and ours and json.loads(theirs) != json.loads(ours):
        raise FluxoError(
            f"{name} v{candidate.version} has another input contract than the {alias} v{held.version} "
            f"(compare their {CONTRACT_TAG} tags); it can never take the {alias!r} alias"
        )


def promote_version(ctx: RunContext, name: str, version: str, challenger: bool = False) -> dict[str, Any]:
    """Give ``version`` the champion (or challenger) alias by hand, and publish it to running servers."""
    from pipelines.registry.publish import publish_alias

    tracking = ctx.settings.tracking
    alias = tracking.challenger_alias if challenger else tracking.champion_alias
    client = ctx.client()
    candidate = _version(client, name, version)
    _check_same_contract(client, name, tracking.champion_alias, candidate)
    champion = champion_version(client, name, tracking.champion_alias)
    if challenger and champion is not None and str(champion.version) == str(version):
        raise FluxoError(f"{name} v{version} is the {tracking.champion_alias}; a challenger must be another version")
    previous = move_alias(client, name, alias, str(version), f"promoted by hand to {alias}", tracking.champion_alias)
    if not challenger:
        drop_alias_if_held(client, name, tracking.challenger_alias, str(version))
    served = publish_alias(ctx, name, str(version), alias)
    return {"model": name, "alias": alias, "version": str(version), "previous": previous, "served_dir": str(served.path)}


def rollback(ctx: RunContext, name: str) -> dict[str, Any]:
    """Give the champion alias back to the version that held it before the current one."""
    from pipelines.registry.publish import publish_alias

    alias = ctx.settings.tracking.champion_alias
    client = ctx.client()
    current = champion_version(client, name, alias)
    if current is None:
        raise FluxoError(f"{name} has no {alias}: nothing to roll back; `fluxo status` shows the versions")
    previous = current.tags.get("fluxo.champion.previous")
    if not previous:
        raise FluxoError(
            f"{name} v{current.version} was the first {alias}: there is no earlier one to roll back to; "
            "promote another version with `fluxo promote VERSION`"
        )
    restored = _version(client, name, previous)
    earlier = restored.tags.get("fluxo.champion.previous")
    move_alias(client, name, alias, previous, f"rolled back from v{current.version}", alias)
    # The restored version keeps its own predecessor, so a second rollback goes further back.
    if earlier:
        client.set_model_version_tag(name, previous, "fluxo.champion.previous", earlier)
    else:
        client.delete_model_version_tag(name, previous, "fluxo.champion.previous")
    served = publish_alias(ctx, name, previous, alias)
    return {"model": name, "alias": alias, "version": previous, "rolled_back_from": str(current.version),
            "served_dir": str(served.path)}


def _server_report(url: str | None) -> dict[str, Any] | None:
    if not url:
        return None
    import httpx

    try:
        answer = httpx.get(f"{url.rstrip('/')}/metadata", timeout=2)
        answer.raise_for_status()
    except httpx.HTTPError as error:
        return {"url": url, "reachable": False, "error": str(error)}
    info = answer.json()
    return {"url": url, "reachable": True, "model_name": info.get("model_name"),
            "model_version": info.get("model_version"), "rollout": info.get("rollout")}


def status(ctx: RunContext, name: str, server_url: str | None = None) -> dict[str, Any]:
    """Which versions hold which alias, their gate scores and promotion notes, and what a server serves."""
    from mlflow.exceptions import MlflowException

    client = ctx.client()
    try:
        aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as error:
        if is_refusal(error):
            raise
        raise FluxoError(f"{name}: not in the model registry; run `fluxo run` first, or name another with --model") from None
    versions = []
    for version in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version), reverse=True):
        tags = version.tags
        gate = json.loads(tags["fluxo.gate"]) if "fluxo.gate" in tags else None
        versions.append({
            "version": str(version.version),
            "aliases": sorted(a for a, v in aliases.items() if v == str(version.version)),
            "run_id": version.run_id,
            "data_version": tags.get("fluxo.data_version"),
            "gate": gate,
            "promotion": tags.get("fluxo.promotion"),
            "champion_since": tags.get("fluxo.champion.since"),
            "champion_until": tags.get("fluxo.champion.until"),
        })
    return {"model": name, "aliases": aliases, "versions": versions, "server": _server_report(server_url)}
