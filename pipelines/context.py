"""The run context: one command's or flow run's project, its resolved settings, MLflow pointed at its store.

Built once per ``fluxo`` command (pipelines/cli) or flow run (pipelines/flows.py) and handed
to every step, so the steps never read settings again or configure tracking themselves: this
is the one place that points MLflow at a store. A step that a Ray worker or a Prefect worker
runs in another process gets the context as an argument and calls :meth:`RunContext.reopen`
there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.settings import FluxoSettings
from pipelines.tracking import configure_mlflow

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


@dataclass(frozen=True)
class RunContext:
    """What every step works in. ``experiment_id`` is ``""`` for a reader of the registry."""

    root: Path
    settings: FluxoSettings
    tracking_uri: str
    experiment_id: str

    def client(self) -> MlflowClient:
        """A client of this context's store (MLflow is already pointed at it)."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri, self.tracking_uri)

    def reopen(self) -> RunContext:
        """The same context in another process (a Ray worker, a resumed run): tracking pointed again."""
        return open_run(self.root, self.settings, experiment=bool(self.experiment_id))

    def with_settings(self, settings: FluxoSettings) -> RunContext:
        """This context for a run whose own saved settings differ (a resumed run): same store, same root."""
        return replace(self, settings=settings)


def open_run(root: Path, settings: FluxoSettings, *, experiment: bool = True) -> RunContext:
    """Resolve the project root, point MLflow at the settings' store and experiment, and hand back the context.

    ``experiment=False``: a reader of the registry (``fluxo serve``, ``status``, ``predict``),
    which may neither need nor create an experiment.
    """
    root = Path(root).resolve()
    target = configure_mlflow(root, settings, experiment=experiment)
    return RunContext(root, settings, target.uri, target.experiment_id)
