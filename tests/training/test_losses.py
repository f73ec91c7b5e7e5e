"""Task heads by name: each loss matches its textbook formula, predictions and metrics agree with it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.errors import FluxoError
from pipelines.train.losses import TASKS, build_task


def test_build_task_names_and_options_are_checked() -> None:
    assert set(TASKS) == {"multiclass", "binary", "multilabel", "regression"}
    with pytest.raises(ValueError, match="choose one of: multiclass, binary, multilabel, regression") as caught:
        build_task("ranking")
    assert isinstance(caught.value, FluxoError)
    with pytest.raises(ValueError, match="unknown option.*smoothing.*accepts label_smoothing, num_classes"):
        build_task("multiclass", smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_task("multiclass", label_smoothing=1.0)
    with pytest.raises(ValueError, match="criterion 'l3'.*mse, mae, huber"):
        build_task("regression", criterion="l3")
    with pytest.raises(ValueError, match="threshold"):
        build_task("binary", threshold=1.5)


# --- multiclass -----------------------------------------------------------------------------


def test_multiclass_loss_takes_indices_or_probability_rows() -> None:
    torch.manual_seed(0)
    task = build_task("multiclass")
    logits, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    hard = task.loss(logits, y)
    torch.testing.assert_close(hard, F.cross_entropy(logits, y))
    torch.testing.assert_close(task.loss(logits, F.one_hot(y, 4).float()), hard)
    # A mixup target λ·a + (1-λ)·b costs λ·CE(a) + (1-λ)·CE(b).
    z = torch.tensor([3, 3, 0, 1, 2, 2])
    mixed = 0.3 * F.one_hot(y, 4).float() + 0.7 * F.one_hot(z, 4).float()
    torch.testing.assert_close(task.loss(logits, mixed), 0.3 * hard + 0.7 * F.cross_entropy(logits, z))
    assert task.target_dtype == torch.long and task.num_outputs(4) == 4


def test_label_smoothing_penalises_overconfidence() -> None:
    confident = torch.tensor([[20.0, 0.0, 0.0]])
    y = torch.tensor([0])
    plain, smooth = build_task("multiclass"), build_task("multiclass", label_smoothing=0.3)
    assert float(plain.loss(confident, y)) < 1e-6
    # Smoothed target: 0.8 on the class, 0.1 on each other one.
    expected = -(torch.tensor([0.8, 0.1, 0.1]) * confident.log_softmax(1)).sum()
    torch.testing.assert_close(smooth.loss(confident, y), expected)


def test_multiclass_predictions_and_metrics() -> None:
    task = build_task("multiclass", num_classes=3)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    y = np.array([0, 1, 0, 2])
    assert task.predict(logits).tolist() == [0, 1, 1, 2]
    from_scores = task.metrics(y, task.scores(logits))
    assert from_scores == task.metrics(y, task.predict(logits))
    assert from_scores["accuracy"] == pytest.approx(0.75)
    assert from_scores["recall_macro"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert set(from_scores) == {"accuracy", "precision_macro", "recall_macro", "f1_macro"}
    # A class absent from both truth and predictions still counts in the macro average when num_classes says so.
    assert build_task("multiclass", num_classes=4).metrics(y, task.predict(logits))["f1_macro"] < from_scores["f1_macro"]


# --- binary and multilabel ------------------------------------------------------------------


def test_binary_loss_is_bce_on_the_sigmoid_for_either_logit_shape() -> None:
    task = build_task("binary")
    logits, y = torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1, 0, 0])
    expected = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(1 - torch.sigmoid(torch.tensor(-1.0)))
                 + torch.log(1 - torch.sigmoid(torch.tensor(0.5)))) / 3
    torch.testing.assert_close(task.loss(logits, y), expected)
    torch.testing.assert_close(task.loss(logits.reshape(-1), y.float()), expected)
    assert task.predict(logits).tolist() == [1, 0, 1]
    assert task.num_outputs(2) == 1 and task.target_dtype == torch.float32


def test_binary_pos_weight_and_threshold() -> None:
    logits, positive = torch.tensor([-1.0]), torch.tensor([1.0])
    assert float(build_task("binary", pos_weight=3.0).loss(logits, positive)) == pytest.approx(
        3 * float(build_task("binary").loss(logits, positive))
    )
    assert build_task("binary", threshold=0.7).predict(torch.tensor([0.5, 1.0])).tolist() == [0, 1]


def test_binary_metrics_add_roc_auc_only_when_it_is_defined() -> None:
    task = build_task("binary")
    y, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])
    result = task.metrics(y, scores)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["roc_auc"] == pytest.approx(0.75)
    assert {"precision", "recall", "f1"} <= set(result)
    assert "roc_auc" not in task.metrics(np.array([1, 1]), np.array([0.2, 0.9]))
    assert "roc_auc" not in task.metrics(y, np.array([0, 1, 1, 1]))  # hard predictions carry no ranking
    with pytest.raises(ValueError, match="probabilities.*task.scores"):
        task.metrics(y, np.array([-2.0, 0.3, 1.5, 4.0]))  # raw logits


def test_multilabel_loss_and_metrics() -> None:
    task = build_task("multilabel", pos_weight=[1.0, 2.0])
    logits = torch.tensor([[3.0, -3.0], [3.0, 3.0], [-3.0, -3.0]])
    y = torch.tensor([[1, 0], [1, 0], [0, 1]])
    weights = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(
        task.loss(logits, y), F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=weights)
    )
    result = task.metrics(y, task.scores(logits))
    assert result["accuracy"] == pytest.approx(1 / 3)  # exact match: only the first row
    assert result["hamming_accuracy"] == pytest.approx(4 / 6)
    assert {"f1_micro", "f1_macro", "roc_auc_macro"} <= set(result)
    assert task.num_outputs(5) == 5
    with pytest.raises(ValueError, match="pos_weight has 2 entries, the model 3 labels"):
        task.loss(torch.zeros(1, 3), torch.zeros(1, 3))


# --- regression -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("criterion", "reference"),
    [("mse", F.mse_loss), ("mae", F.l1_loss), ("huber", lambda a, b: F.huber_loss(a, b, delta=0.5))],
)
def test_regression_losses(criterion: str, reference) -> None:
    task = build_task("regression", criterion=criterion, huber_delta=0.5)
    outputs, y = torch.tensor([[1.0], [2.5], [-1.0]]), torch.tensor([1.5, 2.0, 2.0])
    torch.testing.assert_close(task.loss(outputs, y), reference(outputs.squeeze(1), y))
    assert task.predict(outputs).shape == (3,)


def test_regression_refuses_shapes_that_would_broadcast() -> None:
    with pytest.raises(ValueError, match=r"outputs \(3, 2\) and targets \(3,\)"):
        build_task("regression").loss(torch.zeros(3, 2), torch.zeros(3))


def test_regression_metrics() -> None:
    task = build_task("regression")
    y, predicted = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 2.0, 3.0, 6.0])
    result = task.metrics(y, predicted)
    assert result["mse"] == pytest.approx(1.0)
    assert result["rmse"] == pytest.approx(1.0)
    assert result["mae"] == pytest.approx(0.5)
    assert result["r2"] == pytest.approx(1 - 4 / 5)
    assert task.metrics(y, y)["r2"] == pytest.approx(1.0)
    assert math.isnan(task.metrics(y[:1], y[:1])["r2"])  # R² needs two samples


# --- every task trains ----------------------------------------------------------------------


def _data(name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=generator)
    if name == "multiclass":
        return x, x[:, :3].argmax(1), 3
    if name == "binary":
        return x, (x[:, 0] + x[:, 1] > 0).float(), 1
    if name == "multilabel":
        return x, (x[:, :2] > 0).float(), 2
    return x, x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.3, 1


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_trains_a_linear_model(name: str) -> None:
    torch.manual_seed(0)
    task = build_task(name)
    x, y, width = _data(name)
    model = nn.Linear(4, task.num_outputs(width))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    start = task.loss(model(x), y).item()
    for _ in range(60):
        optimizer.zero_grad()
        task.loss(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        logits = model(x)
    assert float(task.loss(logits, y)) < start / 2
    result = task.metrics(y, task.scores(logits))
    headline = result["r2"] if name == "regression" else result["accuracy"]
    assert headline > 0.9, result
