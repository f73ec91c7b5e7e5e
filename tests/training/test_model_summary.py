"""`fluxo models` and `fluxo models show`: every registered model described before training."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from models import MODEL_REGISTRY, build_model
from models.summary import summarize
from pipelines.cli import app

SHAPES = {"image": (1, 28, 28), "sequence": (1, 40), "any": (1, 8, 8), "table": (12,)}


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_the_summary_counts_every_parameter_and_ends_in_the_head(name: str) -> None:
    shape = SHAPES[MODEL_REGISTRY[name].input_kind]
    model = build_model(name, shape, 7)
    summary = summarize(name, model, shape, 7)
    assert summary.parameters == sum(p.numel() for p in model.parameters())
    ran = [row for row in summary.layers if row.output_shape is not None]
    assert ran and ran[-1].output_shape == (None, 7)  # the last layer to run hands on one logit per class
    assert model.training  # the summary's eval-mode pass leaves the model as it found it


def test_frozen_parameters_are_counted_apart() -> None:
    model = build_model("mlp", (1, 8, 8), 3)
    first = next(model.parameters())
    first.requires_grad_(False)
    summary = summarize("mlp", model, (1, 8, 8), 3)
    assert summary.parameters - summary.trainable == first.numel()
    assert "total parameters" in summary.table()


def test_fluxo_models_lists_the_registry_and_show_prints_the_layers() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["models", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {m["name"]: m["input_kind"] for m in json.loads(listed.output)} == {
        name: spec.input_kind for name, spec in MODEL_REGISTRY.items()}
    assert "cnn2d" in runner.invoke(app, ["models"]).output

    shown = runner.invoke(app, ["models", "show", "cnn2d", "--input-shape", "1,28,28", "--params", "{channels: 8}",
                                "--json"])
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.output)
    expected = sum(p.numel() for p in build_model("cnn2d", (1, 28, 28), 10, channels=8).parameters())
    assert body["parameters"] == expected and body["layers"][0]["output_shape"] == [None, 8, 28, 28]
    table = runner.invoke(app, ["models", "show", "gru", "--input-shape", "1,40", "--classes", "3"]).output
    assert "(N, 3)" in table and f"{sum(p.numel() for p in build_model('gru', (1, 40), 3).parameters()):,}" in table


@pytest.mark.parametrize(
    ("args", "message"),
    [(["nope", "--input-shape", "1,8,8"], "unknown model 'nope'; registered: "),
     (["mlp", "--input-shape", "a,b"], "--input-shape 'a,b': give positive sizes"),
     (["gru", "--input-shape", "1,28,28"], "expects input shaped (C, L)"),
     (["cnn2d", "--input-shape", "1,28,28", "--params", "{chanels: 8}"], "'chanels' (did you mean channels?)"),
     (["cnn2d", "--input-shape", "1,28,28", "--params", "[8]"], "give a mapping")],
)
def test_a_wrong_model_shape_or_config_is_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["models", "show", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_summary_needs_no_gradient_and_changes_no_weight() -> None:
    model = build_model("cnn2d", (1, 8, 8), 10)
    before = [p.detach().clone() for p in model.parameters()]
    summarize("cnn2d", model, (1, 8, 8), 10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
