"""The ``fluxo`` application object, its shared options, and the two things every command shares.

Every command is a short function behind :func:`command`, the one place a user's mistake
becomes one line and exit status 2 (the traceback only with ``-v``), and builds what it
works in through one :class:`Invocation`: the project root, the settings resolved once from
``--config``/``--set``, and (when the command touches MLflow) the run context that points
tracking at the store once (pipelines/context.py).

Only typer is imported at module level: every step (and torch, MLflow, Prefect, BentoML
behind it) loads inside the command that needs it, so ``fluxo --help``, ``fluxo serve``
and ``fluxo ui`` start without torch.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional, TypeVar

import typer

from pipelines.errors import FluxoError
from pipelines.redact import redact

if TYPE_CHECKING:
    from pipelines.context import RunContext
    from pipelines.settings import FluxoSettings

log = logging.getLogger("fluxo")


class _App(typer.Typer):
    """The ``fluxo`` console script: a tracking or Prefect server's refusal (401/403) is the user's to fix.

    Such an error can come from deep inside a step or a flow, as MLflow's or httpx's own
    exception; here, where every command ends, it becomes one line and exit status 2 like any
    FluxoError, never a traceback (unless -v) and never a retry.
    """

    def __call__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().__call__(*args, **kwargs)
        except Exception as error:
            refused = _refusal(error)
            if refused is None:
                _redact_messages(error)  # a bug's traceback is still shown, without a store's password
                raise
            log.debug("the error in full", exc_info=error)
            typer.secho(f"error: {redact(str(refused))}", fg=typer.colors.RED, err=True)
            raise SystemExit(2) from None


def _redact_messages(error: BaseException) -> None:
    """Mask the URIs' secrets in the messages of ``error`` and of the exceptions it came from.

    MLflow quotes the tracking URI, password and all, in its errors ("API request to
    https://user:pw@host/... failed"), and an unexpected error is printed with its traceback.
    """
    seen: list[BaseException] = []
    item: BaseException | None = error
    while item is not None and item not in seen:
        seen.append(item)
        if any(isinstance(arg, str) and redact(arg) != arg for arg in item.args):
            item.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in item.args)
            if isinstance(getattr(item, "message", None), str):  # MlflowException prints this one
                item.message = redact(item.message)  # type: ignore[attr-defined]
        item = item.__cause__ or item.__context__


def _refusal(error: BaseException) -> FluxoError | None:
    from pipelines.tracking import tracking_refusal

    refused = tracking_refusal(error)
    if refused is None and "httpx" in sys.modules:
        from pipelines.scheduling import prefect_refusal

        refused = prefect_refusal(error)
    return refused


app = _App(help="fluxo: versioned data → tracked training → ONNX → REST.", no_args_is_help=True)
data_app = typer.Typer(help="Dataset steps.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="The model registry: what `model.name` can be, and what each one looks like.")
app.add_typer(models_app, name="models")
prefect_app = typer.Typer(help="The project's local Prefect server, which every flow run reuses.",
                          no_args_is_help=True)
app.add_typer(prefect_app, name="prefect")

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML preset under configs/ that overrides the defaults.")
]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override one setting, e.g. --set train.epochs=3.")
]
RootOption = Annotated[Path, typer.Option("--root", help="Project root holding data/, data.dvc and mlflow/.")]
ModelNameOption = Annotated[
    Optional[str], typer.Option("--model", help="Registered model; default fluxo-<dataset of the preset, else of data/>.")
]
ModelUriOption = Annotated[
    Optional[str], typer.Option("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an export directory; "
                                                "default the champion.")
]


def fail(error: BaseException) -> NoReturn:
    """A user's mistake: one line naming the file, field or value and the fix; the trace only with -v.

    Exit status 2, or the error's own ``exit_code`` (a model server that died: pipelines/serve.py).
    Any URI in the line has its secrets masked (pipelines/redact.py).
    """
    log.debug("the error in full", exc_info=error)
    message = redact(str(error).strip()) or type(error).__name__
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=getattr(error, "exit_code", 2))


def user_errors() -> tuple[type[BaseException], ...]:
    """FluxoError, the service's ServingError and a pydantic ValidationError: all the user's to fix."""
    from pydantic import ValidationError

    from serving import ServingError

    return (FluxoError, ServingError, ValidationError)


Command = TypeVar("Command", bound=Callable[..., Any])


def command(function: Command) -> Command:
    """The one error handler of every command: a user's mistake ends it as one line, never a retry."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except user_errors() as error:
            fail(error)

    return guarded  # type: ignore[return-value]


def echo_json(data: dict[str, Any]) -> None:
    typer.echo(json.dumps(data, indent=2))


@dataclass
class Invocation:
    """What the user chose on the command line, resolved once: root, settings, run context, model name."""

    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    root: Path = Path(".")
    _settings: FluxoSettings | None = field(default=None, init=False, repr=False)
    _context: RunContext | None = field(default=None, init=False, repr=False)

    @property
    def settings(self) -> FluxoSettings:
        """The defaults, the preset and every ``--set``, validated on first use (a mistake fails here)."""
        if self._settings is None:
            from pipelines.settings import load_settings

            self._settings = load_settings(self.config, self.overrides)
        return self._settings

    def context(self, experiment: bool = True) -> RunContext:
        """The run context, opened once; ``experiment=False`` for a reader of the registry (a reader's
        context is opened again, once, if the command goes on to need the experiment)."""
        if self._context is None or (experiment and not self._context.experiment_id):
            from pipelines.context import open_run

            self._context = open_run(self.root, self.settings, experiment=experiment)
        return self._context

    def flow_parameters(self) -> dict[str, Any]:
        """What a flow rebuilds its own context from (a deployment's worker has nothing else)."""
        return {"config": str(self.config) if self.config else None, "overrides": self.overrides,
                "root": str(self.root)}

    def model_name(self) -> str:
        """Which registry entry a command about the live model means: the setting, the preset's dataset,
        else what data/ holds."""
        from pipelines.data.store import MANIFEST
        from pipelines.identity import default_registered_model
        from pipelines.settings import dataset_display_name, explicit_dataset

        named = explicit_dataset(self.config, self.overrides)
        dataset = dataset_display_name(named[0]) if named else None
        manifest = Path(self.root) / self.settings.data.data_dir / MANIFEST
        if dataset is None and manifest.is_file():
            dataset = json.loads(manifest.read_text()).get("name")
        return default_registered_model(self.settings.tracking.registered_model,
                                        dataset or dataset_display_name(self.settings.data.dataset))

    def names_a_dataset(self) -> bool:
        from pipelines.settings import explicit_dataset

        return explicit_dataset(self.config, self.overrides) is not None

    def live_model(self, url: str | None, url_may_be_down: bool = False) -> Any:
        """The model `fluxo monitor` and `fluxo status` act on: what is served, then the preset's, then data/'s."""
        from pipelines.live import choose_live_model

        named = self.model_name() if self.names_a_dataset() or self.settings.tracking.registered_model else None
        live = choose_live_model(Path(self.root), url, named, self.model_name, url_may_be_down)
        log.info("model: %s", live.why)
        return live
