"""Drift monitoring settings: which window of the payload log ``fluxo monitor`` compares, and how strictly."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MonitorSettings(BaseModel):
    """``fluxo monitor``: the served model's logged inputs and answers against its own validation data."""

    model_config = ConfigDict(extra="forbid")

    payload_log: str | None = Field(
        None, description="Payload log directory to read; unset: serve.payload_log (where the service writes)."
    )
    window_hours: float = Field(24.0, gt=0, description="How far back the window of logged requests reaches.")
    min_instances: int = Field(
        100, ge=10, description="Fewer logged instances than this in the window: no decision (too little to test)."
    )
    max_instances: int = Field(2000, ge=10, description="The window's newest instances kept at most.")
    reference_size: int = Field(
        1000, ge=10, description="Validation samples of the model's data version drawn as the reference."
    )
    alpha: float = Field(
        0.05, gt=0, lt=1,
        description="False-positive level of a drift alarm on clean traffic; split evenly (Bonferroni) between "
        "the drift signals' tests (pipelines/monitor/signals/).",
    )
    seed: int = Field(0, description="Seed of the reference sample.")
