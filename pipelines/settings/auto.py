"""``model.name: auto`` settings: the portfolio ``fluxo run --auto`` races, and for how long."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

AUTO = "auto"
"""The ``model.name`` that races the portfolio instead of naming one model."""

# What each registered model is tried as: a small width search, per input kind. The MLP is
# always in the race: it is the baseline the winner has to beat.
PORTFOLIO: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "image": [("mlp", {"hidden": 128}), ("mlp", {"hidden": 512}), ("cnn2d", {"channels": 16}),
              ("cnn2d", {"channels": 32}), ("lenet", {"batch_norm": True}), ("resnet_small", {"channels": 16})],
    "sequence": [("mlp", {"hidden": 128}), ("mlp", {"hidden": 512}), ("cnn1d", {"channels": 25}),
                 ("cnn1d", {"channels": 64}), ("resnet1d", {"channels": 32}), ("gru", {"hidden": 64}),
                 ("lstm", {"hidden": 64})],
    # A table's columns have no order: feed-forward models only, the linear reference first.
    "table": [("linear", {}), ("mlp", {"hidden": 128}), ("tabular_mlp", {"width": 64, "depth": 1}),
              ("tabular_mlp", {"width": 128, "depth": 2}), ("tabular_mlp", {"width": 256, "depth": 2, "dropout": 0.3}),
              ("tabular_mlp", {"width": 256, "depth": 3})],
}


# Models raced at auto.learning_rates times this: a linear layer on standardised columns has a convex
# loss and takes ten times larger steps; at Adam's 1e-3 it is still far from its optimum when the first
# rungs judge it (diabetes, 2 rungs: R² -0.41 at 3e-3, the closed form's 0.50).
LEARNING_RATE_SCALE: dict[str, float] = {"linear": 10.0}


class AutoSettings(BaseModel):
    """The race behind ``model.name: auto`` (pipelines/train/auto.py): successive halving on validation accuracy
    (R² for a regression target)."""

    model_config = ConfigDict(extra="forbid")

    budget_minutes: float = Field(
        5.0, gt=0, description="Wall time for the race; the winner's full training comes after it. Sized for 2 CPU "
        "cores: more hardware finishes more rungs, with the same candidates and the same code path.",
    )
    models: list[str] | None = Field(
        None, description="Registered models to race (the MLP is always added); unset: every one in the portfolio "
        "that takes the dataset's input kind.",
    )
    learning_rates: list[float] = Field([1e-3, 3e-3], description="Adam learning rates tried for each model.")
    first_epochs: int = Field(1, ge=1, description="Epochs of every candidate in the first rung.")
    eta: int = Field(3, ge=2, description="Each rung keeps the best 1/eta of the candidates and trains them eta times longer.")
    with_augmentation: bool = Field(
        True, description="Also try each candidate with the preset's augment section (when it has one) and without."
    )
    with_presets: bool = Field(
        True, description="Also race the shipped presets (configs/*.yaml, not smoke or tuning ones) whose model takes "
        "the dataset's inputs, each with its own training recipe and augmentation.",
    )
