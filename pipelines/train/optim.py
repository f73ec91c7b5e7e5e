"""Optimisers, learning-rate schedules and regularisers chosen by name.

The engine asks for ``build_optimizer(settings...)`` and ``build_scheduler(...)``
instead of hard-coding Adam, so a run's optimiser is a setting saved with it and
comparing SGD, momentum, Adagrad, RMSprop and Adam is a ``--set`` away.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LRScheduler

from pipelines.errors import FluxoError


class OptimSettingError(FluxoError, ValueError):
    """A bad optimiser or scheduler setting: a FluxoError for the CLI, a ValueError for callers."""


Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
_TAKES_MOMENTUM = {"sgd", "rmsprop"}  # the only two with a momentum argument

OPTIMIZERS = tuple(_OPTIMIZERS)
SCHEDULERS = ("none", "step", "cosine", "onecycle")


def build_optimizer(
    name: str,
    parameters: Params,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    lr_tensor: bool = False,
    **extra: Any,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` over ``parameters`` (tensors or param groups).

    ``momentum`` applies to sgd and rmsprop only, ``nesterov`` to sgd with
    momentum only: asking for them elsewhere is refused rather than silently
    ignored, because a comparison run that quietly drops a setting is misleading.
    ``extra`` goes straight to the torch class (e.g. ``betas`` for adam,
    ``rho`` for adadelta); keys it does not know are reported with the name.
    Note ``adam``'s weight decay is L2 added to the gradient, ``adamw``'s is
    decoupled (Loshchilov & Hutter), which is why both are offered.
    ``lr_tensor`` holds the learning rate in a 0-d tensor that schedulers fill in
    place, for a torch.compile'd step (a float lr would recompile at every change).
    """
    key = name.lower()
    if key not in _OPTIMIZERS:
        raise OptimSettingError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if lr <= 0 or not math.isfinite(lr):
        raise OptimSettingError(f"optimizer {key}: learning rate must be a positive number, got {lr}")
    if weight_decay < 0:
        raise OptimSettingError(f"optimizer {key}: weight_decay must be >= 0, got {weight_decay}")
    if not 0 <= momentum < 1:
        raise OptimSettingError(f"optimizer {key}: momentum must lie in [0, 1), got {momentum}")
    if momentum and key not in _TAKES_MOMENTUM:
        raise OptimSettingError(
            f"optimizer {key} has no momentum setting (only {', '.join(sorted(_TAKES_MOMENTUM))} do); "
            "set momentum=0" + (" or pass betas=(b1, b2)" if key in ("adam", "adamw") else "")
        )
    if nesterov and key != "sgd":
        raise OptimSettingError(f"nesterov applies to sgd only, not {key}")
    if nesterov and momentum == 0:
        raise OptimSettingError("nesterov=True needs momentum > 0 (Nesterov is a look-ahead on the momentum)")
    options: dict[str, Any] = {"lr": torch.tensor(lr) if lr_tensor else lr, "weight_decay": weight_decay, **extra}
    if lr_tensor:
        options.setdefault("foreach", False)  # torch refuses a tensor lr with foreach unless capturable
    if key in _TAKES_MOMENTUM:
        options["momentum"] = momentum
    if key == "sgd":
        options["nesterov"] = nesterov
    try:
        return _OPTIMIZERS[key](parameters, **options)
    except TypeError as error:
        raise OptimSettingError(f"optimizer {key}: bad option ({error})") from error


@dataclass(frozen=True)
class Schedule:
    """A scheduler and when to step it; ``after_batch``/``after_epoch`` are no-ops at the other interval.

    Warm-up shapes (onecycle) and smooth cosine decay need a step per batch;
    step decay is counted in epochs. Keeping that decision here lets the
    training loop call both hooks unconditionally.
    """

    scheduler: LRScheduler | None
    per_batch: bool

    def after_batch(self) -> None:
        if self.scheduler is not None and self.per_batch:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    compiled: bool = False,
    **options: Any,
) -> Schedule:
    """The learning-rate schedule ``name`` over a run of ``epochs × steps_per_epoch`` batches.

    - ``none``: constant lr.
    - ``step``: multiply lr by ``gamma`` (0.1) every ``step_size`` epochs (a third of the run).
    - ``cosine``: per batch from lr down to ``min_lr`` (0) at the last batch.
    - ``onecycle``: per batch, warm up to ``max_lr`` (the optimiser's lr) over
      ``pct_start`` (0.3) of the run, then anneal far below the start. Momentum
      (or Adam's beta1) is cycled only when the optimiser already uses it, so a
      plain-SGD run does not quietly gain momentum. With ``compiled`` (a
      torch.compile'd optimiser step) it is not cycled unless asked for: betas
      and momentum are floats in the graph, and changing them every batch
      would recompile the step each time.
    """
    key = name.lower()
    if key not in SCHEDULERS:
        raise OptimSettingError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if epochs < 1 or steps_per_epoch < 1:
        raise OptimSettingError(f"scheduler {key}: epochs and steps_per_epoch must be >= 1, got {epochs}, {steps_per_epoch}")
    total = epochs * steps_per_epoch
    base_lr = float(optimizer.param_groups[0]["lr"])
    if key == "none":
        _take(key, options, {})
        return Schedule(None, per_batch=False)
    if key == "step":
        opts = _take(key, options, {"step_size": max(1, epochs // 3), "gamma": 0.1})
        if opts["step_size"] < 1 or not 0 < opts["gamma"] <= 1:
            raise OptimSettingError(f"scheduler step: need step_size >= 1 and 0 < gamma <= 1, got {opts}")
        return Schedule(torch.optim.lr_scheduler.StepLR(optimizer, int(opts["step_size"]), opts["gamma"]), False)
    if key == "cosine":
        opts = _take(key, options, {"min_lr": 0.0})
        # T_max = total - 1 so the last batch that trains runs at min_lr.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - 1, 1), eta_min=opts["min_lr"])
        return Schedule(scheduler, per_batch=True)
    opts = _take(
        key,
        options,
        {
            "max_lr": base_lr,
            "pct_start": 0.3,
            "div_factor": 25.0,
            "final_div_factor": 1e4,
            "anneal_strategy": "cos",
            "cycle_momentum": _uses_momentum(optimizer) and not compiled,
        },
    )
    try:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, total_steps=total, **opts)
    except ValueError as error:
        raise OptimSettingError(f"scheduler onecycle: {error}") from error
    return Schedule(scheduler, per_batch=True)


def _take(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(defaults) or "no options"
        raise OptimSettingError(f"scheduler {name}: unknown option(s) {', '.join(unknown)}; it accepts {accepted}")
    return {**defaults, **options}


def _uses_momentum(optimizer: torch.optim.Optimizer) -> bool:
    defaults = optimizer.defaults
    return "betas" in defaults or float(defaults.get("momentum", 0.0)) > 0


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm))


def penalised_parameters(model: nn.Module) -> list[torch.Tensor]:
    """Weights that regularisation should shrink: not biases, not normalisation scales and shifts.

    Shrinking a bias or a BN shift towards zero does not simplify the function the
    net computes, and shrinking a BN scale just fights the next layer, so the
    usual practice (and the course's) is to penalise weight matrices and kernels only.
    """
    skip = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    return [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in skip and not name.rsplit(".", 1)[-1].startswith("bias")
    ]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups for ``build_optimizer``: weights with ``weight_decay``, biases and norm params without."""
    decayed = {id(p) for p in penalised_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]


def l1_penalty(model: nn.Module, weight: float) -> torch.Tensor:
    """``weight × Σ|w|`` over ``penalised_parameters``, to add to the loss.

    L1 pushes small weights to exactly zero (sparse nets), unlike weight decay's
    L2 which only shrinks them; torch optimisers offer no L1, hence this term.
    Zero weight costs nothing: a zero scalar on the model's device is returned.
    """
    params = penalised_parameters(model)
    if not weight or not params:
        first = next(model.parameters(), None)
        return torch.zeros((), device=first.device if first is not None else None)
    return weight * torch.stack([p.abs().sum() for p in params]).sum()


def clip_gradients(model: nn.Module, max_norm: float | None) -> torch.Tensor | None:
    """Rescale all gradients together so their global L2 norm is at most ``max_norm``.

    Exploding gradients (RNNs over long sequences, high learning rates) turn one
    bad batch into a diverged run; clipping the global norm keeps the update's
    direction and only bounds its length. Returns the norm before clipping (a
    tensor, so logging it does not force a device sync), or None when disabled.
    """
    if not max_norm:
        return None
    if max_norm < 0:
        raise OptimSettingError(f"gradient clipping max_norm must be > 0 (or 0/None to disable), got {max_norm}")
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)


__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "OptimSettingError",
    "Schedule",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "l1_penalty",
    "parameter_groups",
    "penalised_parameters",
]
