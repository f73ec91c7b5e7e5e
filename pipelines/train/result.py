"""What a training run hands on: a plain record, importable without torch.

The pipeline flow caches it (Prefect persists task results), so an unchanged rerun
reads it back without loading the training engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainResult:
    run_id: str
    checkpoint: Path
    test_metrics: dict[str, float]
    best_epoch: int
    seconds: float
    registered_model: str = ""
