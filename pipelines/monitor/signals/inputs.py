"""``input``: do the raw inputs differ? Each instance flattened, pixels or time steps as they were sent.

Sees what the model's features may not: on MNIST-1D the GRU is robust to noise, so its
embedding barely moves, where the raw inputs do (bench/drift.py).

A table model's inputs are named columns, not pixels: numbers with empty cells (NaN) and
category codes. Each column is tested on its own (pipelines/monitor/columns.py: present
values and share of empty cells, category frequencies with empty and unseen as a bucket),
at this signal's level split over the columns' tests; the score names the drifted columns.
"""

from __future__ import annotations

import numpy as np

from pipelines.monitor.columns import ColumnsResult, table_tests
from pipelines.monitor.signals.base import DriftSignal, Finding, Sample, register
from pipelines.reporting import esc, table


def _flat(inputs: np.ndarray) -> np.ndarray:
    # Ragged requests to a variable-length RNN were logged NaN-padded: as inputs they compare zero-padded,
    # like the reference's stored sequences. MMD never sees a NaN (it would read as no drift).
    return np.nan_to_num(inputs.reshape(len(inputs), -1), nan=0.0)


def _shown(value: float | dict[str, float]) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{name} {share:.0%}" for name, share in sorted(value.items(), key=lambda kv: -kv[1])[:6])
    return f"{value:.4g}"


@register
class InputSignal(DriftSignal):
    name = "input"
    order = 10.0

    def features(self, sample: Sample) -> np.ndarray:
        return _flat(sample.inputs)

    def compare(self, reference: Sample, window: Sample, level: float) -> Finding:
        if reference.table is None:
            return super().compare(reference, window, level)
        ref, win = np.asarray(reference.inputs), np.asarray(window.inputs)
        return Finding(self, ref, win, table_tests(self.name, ref, win, reference.table, level))

    def section(self, finding: Finding, labels: list[str]) -> tuple[str, str] | None:
        result = finding.test
        if not isinstance(result, ColumnsResult):
            return None
        drifted = result.drifted_columns
        head = (f'<p class="bad">drifted columns: {esc(", ".join(drifted))}</p>' if drifted
                else '<p class="good">no column drifted</p>')
        each = result.level / max(len(result.tests), 1)
        rows = [(t.column, t.type, f"{t.test} ({t.method})", _shown(t.reference), _shown(t.window),
                 f"{t.statistic:.4g}", f"{t.p_value:.3g}", "yes" if t.drift else "no") for t in result.tests]
        return ("Inputs: the table's columns", head + f'<p class="muted">each test at level {each:.3g} '
                f"({len(result.tests)} tests sharing {result.level:.3g}); reference: median of present values, "
                "share of empty cells, or category shares</p>" + table(
                    ["column", "type", "test", "reference", "window", "statistic", "p-value", "drift"], rows, left=5))
