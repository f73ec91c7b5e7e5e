"""What export hands the registry's steps: a plain record of the model directory, importable without torch.

The pipeline flow caches it (Prefect persists task results), so an unchanged rerun reads
it back without loading the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.identity import RunIdentity
from serving.contract import ModelMetadata
from serving.scoring import ParityReport


@dataclass(frozen=True)
class ExportedModel:
    """What the later steps need: where the model directory is and what it is."""

    identity: RunIdentity
    model_dir: Path
    metadata: ModelMetadata
    parity: ParityReport
