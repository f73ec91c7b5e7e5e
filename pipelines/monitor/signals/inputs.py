"""``input``: do the raw inputs differ? Each instance flattened, pixels or time steps as they were sent.

Sees what the model's features may not: on MNIST-1D the GRU is robust to noise, so its
embedding barely moves, where the raw inputs do (bench/drift.py).
"""

from __future__ import annotations

import numpy as np

from pipelines.monitor.signals.base import DriftSignal, Sample, register


def _flat(inputs: np.ndarray) -> np.ndarray:
    return inputs.reshape(len(inputs), -1)


@register
class InputSignal(DriftSignal):
    name = "input"
    order = 10.0

    def features(self, sample: Sample) -> np.ndarray:
        return _flat(sample.inputs)

    def summarize(self, sample: Sample) -> np.ndarray:
        # Ragged requests to a variable-length RNN were logged NaN-padded: as inputs they compare zero-padded,
        # like the reference's stored sequences.
        return _flat(np.nan_to_num(sample.inputs, nan=0.0))
