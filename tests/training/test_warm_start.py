"""Warm start and transfer: real runs in a real MLflow store, a champion from the real registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from models import build_model
from models.preprocess import Standardized
from pipelines.context import open_run
from pipelines.data.ingest import ingest, version
from pipelines.errors import FluxoError
from pipelines.release import export_run
from pipelines.train.checkpoint import load_checkpoint, model_payload
from pipelines.train.run import train
from pipelines.train.warm_start import IncompatibleWarmStart, freeze, transfer


def _spec(name: str, labels: list[str], shape=(1, 8, 8), **params) -> dict:
    return {"architecture": name, "params": params, "input_shape": list(shape), "labels": labels}


def _payload(name: str, labels: list[str], **params) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(1)
    inner = build_model(name, (1, 8, 8), len(labels), **params)
    return model_payload(Standardized(inner, 3.0, 2.0), _spec(name, labels, **params)), inner


def test_the_same_network_takes_every_weight_and_other_labels_replace_only_the_head() -> None:
    digits = [str(i) for i in range(10)]
    payload, source = _payload("cnn2d", digits, channels=8)
    torch.manual_seed(2)
    same = build_model("cnn2d", (1, 8, 8), 10, channels=8)
    loaded, replaced = transfer(same, _spec("cnn2d", digits, channels=8), payload, "v1")
    assert replaced == [] and len(loaded) == len(same.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), source.state_dict().values()))

    torch.manual_seed(2)
    fewer = build_model("cnn2d", (1, 8, 8), 3, channels=8)
    fresh_head = fewer.head[-1].weight.detach().clone()
    loaded, replaced = transfer(fewer, _spec("cnn2d", ["a", "b", "c"], channels=8), payload, "v1")
    assert replaced == ["head.2.bias", "head.2.weight"]
    assert torch.equal(fewer.features[0].weight, source.features[0].weight)  # the body is the source's
    assert torch.equal(fewer.head[-1].weight, fresh_head)  # the head is this run's own

    renamed = build_model("cnn2d", (1, 8, 8), 10, channels=8)  # as many labels, other names: a new head too
    assert transfer(renamed, _spec("cnn2d", list("abcdefghij"), channels=8), payload, "v1")[1] == replaced


@pytest.mark.parametrize(("spec", "message"), [
    (_spec("mlp", [str(i) for i in range(10)]), "has architecture 'cnn2d', this run 'mlp'"),
    (_spec("cnn2d", [str(i) for i in range(10)], channels=16), "has params {'channels': 8}"),
    (_spec("cnn2d", [str(i) for i in range(10)], shape=(1, 28, 28), channels=8), "has input_shape [1, 8, 8]"),
])
def test_another_network_is_refused_naming_what_differs(spec: dict, message: str) -> None:
    payload, _ = _payload("cnn2d", [str(i) for i in range(10)], channels=8)
    target = build_model(spec["architecture"], tuple(spec["input_shape"]), 10, **spec["params"])
    with pytest.raises(IncompatibleWarmStart, match=message.replace("[", r"\[").replace("{", r"\{")):
        transfer(target, spec, payload, "v1")


def test_freeze_stops_gradients_and_names_the_layers_when_wrong() -> None:
    model = build_model("cnn2d", (1, 8, 8), 10, channels=8)
    frozen = freeze(model, ["features"])
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("features."))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("head."))
    with pytest.raises(FluxoError, match="'feature' names no layer of this model; its layers are features, head"):
        freeze(model, ["feature"])


@pytest.fixture
def champion(project: Path, settings_for):
    """A digits champion trained for 6 epochs, then the data changed (another split of the same digits)."""
    settings = settings_for("train.epochs=6")
    ingest(project, settings.data)
    first = train(open_run(project, settings), version(project, settings.data))
    export_run(open_run(project, settings), first.run_id)
    changed = settings_for("data.split_seed=1")
    ingest(project, changed.data)
    return first, version(project, changed.data)


@pytest.mark.slow  # half a minute or more: `make test-slow` (make test stays under 20 minutes)
def test_a_warm_start_from_the_champion_reaches_its_accuracy_in_fewer_epochs(project: Path, settings_for,
                                                                                champion) -> None:
    first, changed = champion
    scratch = train(open_run(project, settings_for("data.split_seed=1", "train.epochs=1")), changed)
    warm = train(open_run(project, settings_for("data.split_seed=1", "train.epochs=1", "train.init_from=champion")), changed)
    assert warm.test_metrics["test_accuracy"] > scratch.test_metrics["test_accuracy"] + 0.2, (warm, scratch)
    assert warm.test_metrics["test_accuracy"] >= first.test_metrics["test_accuracy"] - 0.05
    tags = MlflowClient().get_run(warm.run_id).data.tags
    assert tags["fluxo.init_from"] == "models:/fluxo-digits/1 (@champion)" and tags["fluxo.init_from_run"] == first.run_id
    assert "fluxo.init_from" not in MlflowClient().get_run(scratch.run_id).data.tags


def test_frozen_layers_keep_the_champions_weights(project: Path, settings_for, champion) -> None:
    first, changed = champion
    tuned = train(open_run(project, settings_for("data.split_seed=1", "train.epochs=2", f"train.init_from={first.run_id}",
                                        "train.freeze=[features]")), changed)
    before, after = (load_checkpoint(r.checkpoint)["state_dict"] for r in (first, tuned))
    weights = [k for k in after if k.startswith("inner.features.") and k.endswith("weight")]
    assert weights and all(torch.equal(before[k], after[k]) for k in weights if "running" not in k)
    assert not torch.equal(before["inner.head.2.weight"], after["inner.head.2.weight"])


def test_an_unknown_source_is_one_clear_error(project: Path, settings_for) -> None:
    settings = settings_for("train.epochs=1", "train.init_from=0123456789abcdef")
    ingest(project, settings.data)
    with pytest.raises(FluxoError, match="train.init_from='0123456789abcdef': not found in the tracking store"):
        train(open_run(project, settings), version(project, settings.data))


def test_scheduled_runs_start_from_the_champion_unless_told_otherwise(project: Path) -> None:
    from pipelines.flows import scheduled_deployment

    default = scheduled_deployment(None, None, [], str(project), "scheduled")
    assert default.parameters["overrides"] == ["train.init_from=champion"]
    told = scheduled_deployment(None, None, ["train.init_from=scratch"], str(project), "scheduled")
    assert told.parameters["overrides"] == ["train.init_from=scratch"]
