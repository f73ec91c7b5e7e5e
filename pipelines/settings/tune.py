"""Hyper-parameter search settings: the space ``fluxo tune`` samples and how a study is run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Scalar = bool | int | float | str | None


class ParamSpace(BaseModel):
    """One searched setting: a range ``{low, high, log?, int?}`` or a list ``{choices: [...]}``."""

    model_config = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    low: float | None = Field(None, description="Lower end of a range (inclusive).")
    high: float | None = Field(None, description="Upper end of a range (inclusive).")
    log: bool = Field(False, description="Sample the range uniformly in log space (learning rates, weight decay).")
    integer: bool = Field(False, alias="int", description="Sample whole numbers from the range (widths, depths).")
    choices: list[Scalar] | None = Field(
        None, description="Values to choose from: numbers, strings or booleans (e.g. optimizer names)."
    )
    when: dict[str, Scalar | list[Scalar]] | None = Field(
        None,
        description="Sample only when these settings hold these values (a list: any of them), e.g. "
        "{train.optimizer: sgd} for train.momentum; otherwise the preset's value stays. A key searched "
        "too must come earlier in the space.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpace:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.integer:
                raise ValueError("give either choices or low/high (with log, int), not both")
            if not self.choices:
                raise ValueError("choices is empty; list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high for a range, or choices for a list of values")
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got low={self.low}")
        if self.integer and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"int=true needs whole-number bounds, got low={self.low}, high={self.high}")
        return self

    def candidates(self) -> list[Any]:
        """The values that bound what can be sampled: each choice, or both ends of the range."""
        if self.choices is not None:
            return list(self.choices)
        if self.integer:
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high  # type: ignore[operator]


class TuneSettings(BaseModel):
    """Hyper-parameter search with Optuna: what to search, for how long, and what decides."""

    model_config = ConfigDict(extra="forbid")

    trials: int = Field(20, ge=1, description="Trials to run (fewer when timeout_s runs out first).")
    timeout_s: float | None = Field(
        None, gt=0, description="Stop starting new trials after this many seconds; None: run every trial."
    )
    metric: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss",
        description="Validation number the study optimises (loss minimised, accuracy maximised), taken at the "
        "epoch whose weights training keeps (train.monitor), and reported every epoch for pruning.",
    )
    pruner: Literal["median", "none"] = Field(
        "median",
        description="median: stop a trial whose best value so far is worse than the median of completed "
        "trials at the same epoch; none: every trial trains to the end (or early stopping).",
    )
    startup_trials: int = Field(
        5, ge=0, description="Completed trials before the median pruner starts pruning (it needs a reference)."
    )
    warmup_epochs: int = Field(2, ge=0, description="Epochs every trial trains before it may be pruned.")
    seed: int = Field(0, description="Seed of the TPE sampler: same seed and space, same sequence of trials.")
    space: dict[str, ParamSpace] = Field(
        default_factory=dict,
        description="Searched settings by dotted path (train.learning_rate, model.params.channels, "
        "train.optimizer) → a range {low, high, log, int} or {choices: [...]}.",
    )

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        return "maximize" if self.metric == "val_accuracy" else "minimize"
