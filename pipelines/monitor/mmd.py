"""The two-sample test behind ``fluxo monitor``: hyppo's MMD with its chi-square null approximation.

Chosen by measurement (bench/drift.py, bench/results/drift.json, 2 CPUs): at alpha 0.05
over 40 clean and 10 shifted windows of 200 per shift, hyppo's fast MMD on the model's
embedding found every inverted, rotated and noised MNIST window with no false alarm, in
about 0.1 s per decision; the permutation nulls of hyppo and frouros gave the same
answers in 4-6 s. Alibi Detect (needs numpy < 2 and transformers) and Evidently (does not
import with pandas 3) could not be installed beside fluxo's stack.

Every drift signal (pipelines/monitor/signals/) uses this test unless it brings its own.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

# Permutations of the null when its chi-square approximation is undefined (degenerate kernels).
PERMUTATIONS = 500


@dataclass(frozen=True)
class TestResult:
    """One signal's test: its statistic (MMD's, or that of the signal's own test), p-value and decision at its level."""

    signal: str
    statistic: float
    p_value: float
    level: float
    drift: bool

    def as_dict(self) -> dict[str, float | bool | str]:
        return asdict(self)


def mmd_test(signal: str, reference: np.ndarray, window: np.ndarray, level: float) -> TestResult:
    """hyppo's unbiased MMD (gaussian kernel, median bandwidth) with the chi-square approximation of its null.

    Never a silent "no drift": NaN or infinite features are refused (ValueError: a signal
    imputes empty cells before it tests; a NaN statistic would read as p = 1). Both sides
    one constant row (hyppo refuses zero variance) are alike: p = 1. A chi-square p-value
    that comes out NaN is computed again from a permutation null; still NaN is an error.
    """
    from hyppo.ksample import MMD

    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    win = np.asarray(window, np.float64).reshape(len(window), -1)
    for side, values in (("reference", ref), ("window", win)):
        if not np.isfinite(values).all():
            raise ValueError(f"drift signal {signal!r}: its {side} holds NaN or infinite values; a signal imputes "
                             "empty values before MMD (a NaN statistic would read as no drift)")
    pooled = np.concatenate([ref, win])
    if not len(pooled) or (pooled == pooled[0]).all():
        return TestResult(signal, 0.0, 1.0, level, False)  # every instance alike, on both sides: nothing differs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # hyppo warns about "replications" it does not run here
        statistic, p_value = MMD().test(ref, win, auto=True)
        if not np.isfinite(p_value):
            statistic, p_value = MMD().test(ref, win, reps=PERMUTATIONS, auto=False, random_state=0)
    if not (np.isfinite(p_value) and np.isfinite(statistic)):
        raise ValueError(f"drift signal {signal!r}: MMD gives statistic {statistic}, p-value {p_value}")
    p_value = float(p_value)
    return TestResult(signal, float(statistic), p_value, level, p_value < level)
