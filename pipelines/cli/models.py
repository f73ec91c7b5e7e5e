"""``fluxo models`` and ``fluxo models show``: what ``model.name`` can be, and what each one looks like."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from pipelines.cli.app import command, models_app
from pipelines.errors import FluxoError


@models_app.callback(invoke_without_command=True)
def models_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the registered models: name, the inputs they take, what they are."""
    if ctx.invoked_subcommand is not None:
        return
    from models import MODEL_REGISTRY

    specs = sorted(MODEL_REGISTRY.values(), key=lambda spec: (spec.input_kind, spec.name))
    if as_json:
        typer.echo(json.dumps([{"name": s.name, "input_kind": s.input_kind, "summary": s.summary} for s in specs],
                              indent=2))
        return
    width = max(len(spec.name) for spec in specs)
    typer.echo(f"{'model'.ljust(width)}  {'inputs':8}  summary")
    for spec in specs:
        typer.echo(f"{spec.name.ljust(width)}  {spec.input_kind:8}  {spec.summary}")
    typer.echo("\n`fluxo models show NAME --input-shape C,H,W` prints its layers and parameter counts.")


@models_app.command("show")
@command
def models_show(
    name: Annotated[str, typer.Argument(help="A registered model, e.g. cnn2d (see `fluxo models`).")],
    input_shape: Annotated[str, typer.Option("--input-shape", help="One instance's shape, e.g. 1,28,28 (C,H,W) "
                                             "or 1,40 (C,L).")],
    classes: Annotated[int, typer.Option("--classes", min=1, help="Number of labels (the head's width).")] = 10,
    params: Annotated[Optional[str], typer.Option("--params", help="The model's config as YAML/JSON, as in "
                                                  "model.params, e.g. '{channels: 8}'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Each layer's output shape and parameter count for NAME on inputs of --input-shape, without training."""
    summary = _model_summary(name, input_shape, classes, params)
    typer.echo(json.dumps(summary.as_dict(), indent=2) if as_json else summary.table())


def _model_summary(name: str, input_shape: str, classes: int, params: str | None) -> Any:
    import yaml

    from models import MODEL_REGISTRY, build_model
    from models.summary import summarize

    if name not in MODEL_REGISTRY:
        raise FluxoError(f"unknown model {name!r}; registered: {', '.join(sorted(MODEL_REGISTRY))} (`fluxo models`)")
    parts = [part.strip() for part in input_shape.replace("x", ",").split(",")]  # 1,28,28 or 1x28x28
    shape = tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else ()
    if not shape or any(size < 1 for size in shape):
        raise FluxoError(f"--input-shape {input_shape!r}: give positive sizes separated by commas, e.g. 1,28,28")
    config = yaml.safe_load(params) if params else {}
    if not isinstance(config, dict):
        raise FluxoError(f"--params {params!r}: give a mapping, e.g. '{{channels: 8}}'")
    try:
        model = build_model(name, shape, classes, **config)
        return summarize(name, model, shape, classes)
    except (ValueError, TypeError, RuntimeError) as error:
        raise FluxoError(f"{name} on inputs of shape {shape}: {error}") from None
