"""Optimisers, schedules, L1 and clipping by name: each does what its name promises."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipelines.errors import FluxoError
from pipelines.train.optim import (
    OPTIMIZERS,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    l1_penalty,
    parameter_groups,
)

TARGET = torch.tensor([1.0, -2.0, 0.5])


def quadratic(w: torch.Tensor) -> torch.Tensor:
    return ((w - TARGET) ** 2).sum()


@pytest.mark.parametrize(
    ("name", "options"),
    [(name, {}) for name in OPTIMIZERS] + [("sgd", {"momentum": 0.9, "nesterov": True}), ("rmsprop", {"momentum": 0.5})],
)
def test_optimizer_reduces_a_quadratic(name: str, options: dict) -> None:
    w = nn.Parameter(torch.zeros(3))
    lr = 1.0 if name == "adadelta" else 0.05  # Adadelta's lr scales an already unit-free step
    optimizer = build_optimizer(name, [w], lr=lr, **options)
    start = float(quadratic(w.detach()))
    for _ in range(5):
        optimizer.zero_grad()
        quadratic(w).backward()
        optimizer.step()
    assert float(quadratic(w.detach())) < start


def test_settings_reach_the_torch_optimizer() -> None:
    w = nn.Parameter(torch.zeros(3))
    sgd = build_optimizer("SGD", [w], lr=0.1, weight_decay=1e-4, momentum=0.9, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 1e-4
    adam = build_optimizer("adam", [w], lr=0.01, betas=(0.8, 0.9))
    assert adam.defaults["betas"] == (0.8, 0.9)
    assert isinstance(build_optimizer("adamw", [w], lr=0.01), torch.optim.AdamW)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lbfgs", {}, "choose one of: sgd, adagrad, adadelta, rmsprop, adam, adamw"),
        ("sgd", {"nesterov": True}, "nesterov=True needs momentum > 0"),
        ("adam", {"nesterov": True}, "nesterov applies to sgd only"),
        ("adam", {"momentum": 0.9}, "adam has no momentum setting.*betas"),
        ("sgd", {"momentum": 1.5}, r"momentum must lie in \[0, 1\)"),
        ("adam", {"betas2": (0.9, 0.99)}, "optimizer adam: bad option"),
    ],
)
def test_bad_optimizer_settings_are_explained(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        build_optimizer(name, [nn.Parameter(torch.zeros(1))], lr=0.1, **options)
    assert isinstance(caught.value, FluxoError)  # the CLI reports it without a traceback


def _lr_curve(name: str, optimizer_name: str = "sgd", epochs: int = 10, steps: int = 4, **options) -> list[float]:
    """The lr each batch trains with, stepping the schedule the way the engine will."""
    w = nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(optimizer_name, [w], lr=0.1)
    schedule = build_scheduler(name, optimizer, epochs=epochs, steps_per_epoch=steps, **options)
    curve = []
    for _ in range(epochs):
        for _ in range(steps):
            curve.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.after_batch()
        schedule.after_epoch()
    return curve


def test_none_schedule_keeps_the_lr() -> None:
    assert set(_lr_curve("none")) == {0.1}


def test_step_schedule_drops_by_gamma_every_step_size_epochs() -> None:
    curve = _lr_curve("step", epochs=6, steps=2, step_size=2, gamma=0.5)
    per_epoch = curve[::2]
    assert per_epoch == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_cosine_schedule_decays_smoothly_to_min_lr() -> None:
    curve = _lr_curve("cosine")
    assert curve[0] == pytest.approx(0.1)
    assert curve[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(b <= a + 1e-12 for a, b in zip(curve, curve[1:]))
    assert curve[len(curve) // 2] == pytest.approx(0.05, rel=0.1)  # half-way down at half time


def test_onecycle_warms_up_to_max_lr_then_anneals() -> None:
    curve = _lr_curve("onecycle", epochs=10, steps=10)
    peak = max(range(len(curve)), key=curve.__getitem__)
    assert max(curve) == pytest.approx(0.1)  # max_lr defaults to the optimiser's lr
    assert 0.2 < peak / len(curve) < 0.5
    assert curve[0] == pytest.approx(0.1 / 25)
    assert curve[-1] < curve[0] / 100


def test_onecycle_cycles_momentum_only_where_the_optimizer_has_it() -> None:
    w = nn.Parameter(torch.zeros(1))
    plain = build_optimizer("sgd", [w], lr=0.1)
    build_scheduler("onecycle", plain, epochs=2, steps_per_epoch=3)
    assert plain.param_groups[0]["momentum"] == 0.0
    adam = build_optimizer("adam", [w], lr=0.1)
    build_scheduler("onecycle", adam, epochs=2, steps_per_epoch=3)
    assert adam.param_groups[0]["betas"][0] == pytest.approx(0.95)  # beta1 starts at the cycle's top


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("exponential", {}, "choose one of: none, step, cosine, onecycle"),
        ("step", {"milestones": [3]}, "unknown option.*milestones.*accepts step_size, gamma"),
        ("step", {"gamma": 0.0}, "0 < gamma"),
    ],
)
def test_bad_scheduler_settings_are_explained(name: str, options: dict, message: str) -> None:
    optimizer = build_optimizer("sgd", [nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=message):
        build_scheduler(name, optimizer, epochs=3, steps_per_epoch=2, **options)


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(-1.0)
    return net


def test_l1_penalty_counts_weights_but_not_biases_or_norm_params() -> None:
    net = _net()
    penalty = l1_penalty(net, 0.5)
    assert penalty.item() == pytest.approx(0.5 * (2 * 3 + 3 * 1))
    penalty.backward()
    assert net[0].weight.grad is not None and net[0].bias.grad is None
    assert net[1].weight.grad is None and net[1].bias.grad is None
    assert float(l1_penalty(net, 0.0)) == 0.0


def test_parameter_groups_exempt_biases_and_norm_params_from_decay() -> None:
    decayed, exempt = parameter_groups(_net(), weight_decay=0.01)
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    assert [tuple(p.shape) for p in decayed["params"]] == [(3, 2), (1, 3)]
    assert len(exempt["params"]) == 4  # two linear biases, BN weight and bias


def test_clip_gradients_bounds_the_global_norm() -> None:
    net = _net()
    for p in net.parameters():
        p.grad = torch.full_like(p, 10.0)
    before = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    reported = clip_gradients(net, 1.0)
    after = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert float(reported) == pytest.approx(float(before))
    assert float(after) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("max_norm", [None, 0, 0.0])
def test_clip_gradients_is_a_no_op_when_disabled(max_norm) -> None:
    net = _net()
    for p in net.parameters():
        p.grad = torch.full_like(p, 10.0)
    assert clip_gradients(net, max_norm) is None
    assert all(torch.equal(p.grad, torch.full_like(p, 10.0)) for p in net.parameters())
