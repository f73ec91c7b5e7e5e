"""The torch.compile'd training step: same learning as eager, and schedules that never recompile it.

Runs on the CPU (inductor with the system C++ compiler); on a GPU the same code
path adds CUDA graphs with ``train.compile_mode=reduce-overhead``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from pipelines.settings import TrainSettings
from pipelines.train.engine import ClassificationStep, FitConfig, compiled_step, evaluate, fit, seed_everything
from pipelines.train.optim import build_optimizer, build_scheduler
from tests.training.test_train import _digits_tensors, _model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step_with_schedule(lr_tensor: bool, steps: int = 6) -> None:
    """A compiled optimiser step driven by a per-batch schedule, with recompiles turned into errors."""
    seed_everything(0)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer("adam", model.parameters(), 1e-2, lr_tensor=lr_tensor)
    schedule = build_scheduler("onecycle", optimizer, epochs=1, steps_per_epoch=steps, compiled=True)
    step = compiled_step(optimizer)
    seen = []
    for i in range(steps):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        with torch._dynamo.config.patch(error_on_recompile=i > 0):  # the first call compiles; none may again
            step()
        optimizer.zero_grad(set_to_none=True)
        seen.append(float(optimizer.param_groups[0]["lr"]))
        schedule.after_batch()
    assert len(set(seen)) == steps, "the schedule did not move the learning rate"


def test_a_tensor_learning_rate_lets_the_schedule_run_without_recompiling() -> None:
    _step_with_schedule(lr_tensor=True)


def test_a_float_learning_rate_would_recompile_at_every_schedule_step() -> None:
    """The guard above is real: with a float lr the same loop recompiles."""
    with pytest.raises(Exception, match="(?i)recompil"):
        _step_with_schedule(lr_tensor=False)


def test_compiled_training_learns_like_eager() -> None:
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        seed_everything(0)
        train, val = _digits_tensors(batch_size=100)  # 1,200 samples: every batch the same shape
        model = _model()
        config = FitConfig.from_settings(TrainSettings(epochs=5, batch_size=100, learning_rate=2e-2, weight_decay=0,
                                                       patience=5, seed=0, scheduler="onecycle", compile=compiled))
        result = fit(model, train, val, config)
        _, accuracy, _, _ = evaluate(model, val, ClassificationStep())
        results[compiled] = (accuracy, [h["learning_rate"] for h in result.history], result)
    eager, compiled = results[False], results[True]
    assert compiled[0] > 0.85 and abs(compiled[0] - eager[0]) < 0.03, (eager[0], compiled[0])
    assert compiled[1] == pytest.approx(eager[1])  # the same schedule, logged as floats
    assert all(isinstance(lr, float) for lr in compiled[1])
