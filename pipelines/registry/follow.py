"""Follow the registry from any machine: alias moves become local publishes, within seconds.

``fluxo serve`` runs one :class:`RegistryFollower` beside the server it starts. Every
``serve.follow_interval_s`` it asks the tracking server which version holds each alias
(``champion``, ``challenger``); when one moved, it fetches that version into the local
model cache and republishes the alias's model root, and the running server (which
watches the root's ``current.json``) loads it between requests. So a replica on another
machine, with only ``MLFLOW_TRACKING_URI`` and no shared volume, follows promotions and
rollbacks. The service itself stays free of MLflow and torch; the follower uses the
MLflow client in the ``fluxo serve`` process, with its account (``MLFLOW_TRACKING_USERNAME``,
``MLFLOW_TRACKING_PASSWORD`` or ``..._FILE``, read when the run context points MLflow at the store): reading the
registry and its artifacts is all it needs, so on a basic-auth server it can be one that
may not move an alias itself (deploy/README.md, 'Accounts').
"""

from __future__ import annotations

import logging
import os
import threading

from pipelines.context import RunContext
from pipelines.tracking import tracking_refusal

log = logging.getLogger(__name__)

POLL_RETRIES = "1"
POLL_TIMEOUT_S = "10"


class RegistryFollower:
    """A daemon thread that mirrors the registry's aliases of one model into local model roots."""

    def __init__(self, ctx: RunContext, name: str, aliases: list[str], interval_s: float) -> None:
        self.ctx, self.name, self.aliases = ctx, name, list(aliases)
        self.interval_s = interval_s
        self.seen: dict[str, str | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fluxo-registry-follower", daemon=True)

    def start(self) -> RegistryFollower:
        # A look that fails is repeated at the next interval anyway: it must not sit in MLflow's own
        # retries (7, backing off for minutes) while the registry is away, or the replica follows
        # minutes late once it is back. The user's own settings of these stay.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", POLL_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", POLL_TIMEOUT_S)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as error:  # noqa: BLE001 - a registry hiccup must not stop the server
                if not failing:  # once per outage, not every interval
                    log.warning("could not check the registry for %s: %s; still serving what this replica holds, "
                                "looking again every %.0f s", self.name, error, self.interval_s)
                failing = True
                continue
            if failing:
                log.info("the registry answers again; following %s", self.name)
            failing = False

    def poll(self) -> list[str]:
        """Publish every alias that moved since the last look; returns the aliases republished.

        A refusal of the tracking server (401/403) is raised as a FluxoError that names the account.
        """
        try:
            return self._poll()
        except Exception as error:
            refused = tracking_refusal(error)
            if refused is None:
                raise
            raise refused from error

    def _poll(self) -> list[str]:
        from pipelines.registry.publish import publish_alias
        from pipelines.registry.versions import champion_version

        client, moved = self.ctx.client(), []
        for alias in self.aliases:
            held = champion_version(client, self.name, alias)
            version = None if held is None else str(held.version)
            if version is None or self.seen.get(alias) == version:
                self.seen[alias] = version
                continue
            publish_alias(self.ctx, self.name, version, alias)
            log.info("registry: %s@%s is v%s now; published it to the running server", self.name, alias, version)
            self.seen[alias] = version
            moved.append(alias)
        return moved
