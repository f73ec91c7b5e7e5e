"""``fluxo promote``, ``rollback`` and ``status``: the registry's aliases as one-command operations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipelines.cli.app import ConfigOption, Invocation, ModelNameOption, RootOption, SetOption, app, command, echo_json


@app.command()
@command
def promote(
    version: Annotated[str, typer.Argument(help="Registry version to promote, e.g. 3.")],
    challenger: Annotated[bool, typer.Option("--challenger", help="Make it the challenger instead of the champion.")] = False,
    model: ModelNameOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Give a version the champion (or challenger) alias by hand; running servers switch to it."""
    from pipelines.registry.aliases import promote_version

    invocation = Invocation(config, overrides or [], root)
    echo_json(promote_version(invocation.context(), model or invocation.model_name(), version, challenger))


@app.command()
@command
def rollback(
    model: ModelNameOption = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Give the champion alias back to the version that held it before; running servers switch back."""
    from pipelines.registry.aliases import rollback as rollback_step

    invocation = Invocation(config, overrides or [], root)
    echo_json(rollback_step(invocation.context(), model or invocation.model_name()))


@app.command()
@command
def status(
    model: ModelNameOption = None,
    url: Annotated[
        Optional[str], typer.Option("--url", help="A running server to ask what it serves; default this project's "
                                                  "running server, else the configured address.")
    ] = None,
    config: ConfigOption = None,
    overrides: SetOption = None,
    root: RootOption = Path("."),
) -> None:
    """Which versions hold which alias, their gate scores, and what a running server reports serving."""
    from pipelines.registry.aliases import status as status_step

    invocation = Invocation(config, overrides or [], root)
    settings = invocation.settings
    live = None if model else invocation.live_model(url, url_may_be_down=True)
    server = url or (live.url if live else None) or f"http://{settings.serve.host}:{settings.serve.port}"
    report = status_step(invocation.context(experiment=False), model or live.name, server)
    echo_json({**report, "chosen": live.why if live else "--model"})
