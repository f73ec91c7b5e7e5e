"""Univariate drift tests: a table's raw columns one by one, and a regression model's predicted value.

A table's columns are unrelated measurements, some empty, some category codes; MMD over
them would mix scales, read a vocabulary index as a distance and turn on a single NaN.
So each column gets the test its users expect, on its own values:

- a number column: its present values (two-sample Kolmogorov-Smirnov), and its share of
  empty cells (Fisher's exact test): a column that starts arriving empty has drifted even
  when the values still sent look the same;
- a category column: its category frequencies, empty and unseen values one more bucket
  (chi-squared test of homogeneity; buckets expected fewer than
  :data:`MIN_EXPECTED` times are pooled, so that the chi-squared approximation holds).

The tests of one table share their signal's level, Bonferroni-corrected like the signals
themselves (pipelines/monitor/detect.py): each runs at ``level / m`` for ``m`` tests, and
the signal's p-value is the smallest one times ``m`` (at most 1). A test with nothing to
compare (no present value on one side, a single bucket) is left out, never counted as a
p-value of 1 it did not compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.monitor.mmd import TestResult

if TYPE_CHECKING:
    from serving.contract import TableColumn, TableInput

# A chi-squared bucket expected fewer times than this, on either side, is pooled with the other rare ones.
MIN_EXPECTED = 5.0
EMPTY = "(empty or unseen)"


@dataclass(frozen=True)
class ColumnTest:
    """One test of one column: ``test`` is ``values``, ``missing`` or ``categories``."""

    column: str
    type: str  # number | category
    test: str
    method: str  # ks | fisher | chi2
    statistic: float  # KS distance, window minus reference empty share, chi-squared
    p_value: float
    reference: float | dict[str, float]  # median of present values, empty share, or category shares
    window: float | dict[str, float]
    drift: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ColumnsResult(TestResult):
    """A signal decided by several univariate tests: the most significant one, Bonferroni-adjusted."""

    tests: tuple[ColumnTest, ...] = field(default=())

    @property
    def drifted_columns(self) -> list[str]:
        """The names of the columns with a drifted test, in column order, each once."""
        return list(dict.fromkeys(t.column for t in self.tests if t.drift))

    def as_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "statistic": self.statistic, "p_value": self.p_value, "level": self.level,
                "drift": self.drift, "drifted_columns": self.drifted_columns,
                "columns": [t.as_dict() for t in self.tests]}


def ks_test(signal: str, reference: np.ndarray, window: np.ndarray, level: float) -> TestResult:
    """Two-sample Kolmogorov-Smirnov on one value per instance (e.g. a regression model's prediction)."""
    from scipy.stats import ks_2samp

    ref, win = _finite(reference), _finite(window)
    if not len(ref) or not len(win):
        raise ValueError(f"drift signal {signal!r}: no finite value on the {'reference' if not len(ref) else 'window'}"
                         " side to test")
    result = ks_2samp(ref, win)
    p_value = float(result.pvalue)
    return TestResult(signal, float(result.statistic), p_value, level, p_value < level)


def table_tests(signal: str, reference: np.ndarray, window: np.ndarray, table: TableInput,
                level: float) -> ColumnsResult:
    """Every column of ``table`` (the model's contract) tested on raw inputs ``(n, columns)``, at ``level`` in all."""
    ref, win = _columns(reference, table), _columns(window, table)
    tests: list[ColumnTest] = []
    for index, column in enumerate(table.columns):
        if column.type == "category":
            tests += _category_tests(column, ref[:, index], win[:, index])
        else:
            tests += _number_tests(column, ref[:, index], win[:, index])
    if not tests:
        return ColumnsResult(signal, 0.0, 1.0, level, False, ())
    each = level / len(tests)
    tests = [ColumnTest(**{**t.as_dict(), "drift": t.p_value < each}) for t in tests]
    best = min(tests, key=lambda t: t.p_value)
    p_value = min(1.0, best.p_value * len(tests))
    return ColumnsResult(signal, best.statistic, p_value, level, any(t.drift for t in tests), tuple(tests))


def _columns(inputs: np.ndarray, table: TableInput) -> np.ndarray:
    values = np.asarray(inputs, np.float64).reshape(len(inputs), -1)
    if values.shape[1] != len(table.columns):
        raise ValueError(f"table inputs have {values.shape[1]} columns, the model's contract "
                         f"{len(table.columns)} ({', '.join(table.names())})")
    return values


def _finite(values: np.ndarray) -> np.ndarray:
    flat = np.asarray(values, np.float64).ravel()
    return flat[np.isfinite(flat)]


def _number_tests(column: TableColumn, ref: np.ndarray, win: np.ndarray) -> list[ColumnTest]:
    """Present values (KS) and the share of empty cells (Fisher's exact test) of one number column."""
    from scipy.stats import fisher_exact, ks_2samp

    tests = []
    ref_present, win_present = ref[np.isfinite(ref)], win[np.isfinite(win)]
    if len(ref_present) and len(win_present):
        result = ks_2samp(ref_present, win_present)
        tests.append(ColumnTest(column.name, "number", "values", "ks", float(result.statistic), float(result.pvalue),
                                float(np.median(ref_present)), float(np.median(win_present))))
    ref_empty, win_empty = len(ref) - len(ref_present), len(win) - len(win_present)
    if ref_empty or win_empty:  # neither side has an empty cell: nothing to test
        table = [[ref_empty, len(ref_present)], [win_empty, len(win_present)]]
        ref_share, win_share = ref_empty / max(len(ref), 1), win_empty / max(len(win), 1)
        tests.append(ColumnTest(column.name, "number", "missing", "fisher", win_share - ref_share,
                                float(fisher_exact(table).pvalue), ref_share, win_share))
    return tests


def _category_tests(column: TableColumn, ref: np.ndarray, win: np.ndarray) -> list[ColumnTest]:
    """The category frequencies of one category column, empty and unseen values a bucket of their own."""
    from scipy.stats import chi2_contingency

    names = [*(column.categories or []), EMPTY]
    counts = np.stack([_bucket_counts(ref, len(names) - 1), _bucket_counts(win, len(names) - 1)])
    shares = [{name: float(c) / max(int(row.sum()), 1) for name, c in zip(names, row) if c} for row in counts]
    pooled = _pool_rare(counts)
    if pooled.shape[1] < 2 or (pooled.sum(axis=1) == 0).any():
        return []  # one bucket (or an empty side): every instance alike, nothing to compare
    result = chi2_contingency(pooled, correction=False)
    return [ColumnTest(column.name, "category", "categories", "chi2", float(result.statistic), float(result.pvalue),
                       shares[0], shares[1])]


def _bucket_counts(codes: np.ndarray, size: int) -> np.ndarray:
    """Counts of codes ``0 .. size - 1``; the last bucket (index ``size``) holds empty, unseen and invalid codes."""
    valid = np.isfinite(codes) & (codes >= 0) & (codes < size) & (codes == np.round(codes))
    counts = np.bincount(codes[valid].astype(np.int64), minlength=size)
    return np.append(counts, int((~valid).sum()))


def _pool_rare(counts: np.ndarray) -> np.ndarray:
    """``counts`` (2, buckets) without empty buckets, the rarely expected ones pooled into one."""
    counts = counts[:, counts.sum(axis=0) > 0]
    if counts.shape[1] < 2:
        return counts
    totals = counts.sum(axis=1, keepdims=True)
    expected = totals * counts.sum(axis=0, keepdims=True) / max(int(totals.sum()), 1)
    rare = expected.min(axis=0) < MIN_EXPECTED
    if rare.sum() < 1:
        return counts
    kept = counts[:, ~rare]
    pool = counts[:, rare].sum(axis=1, keepdims=True)
    if kept.shape[1]:
        pool_expected = totals * pool.sum() / max(int(totals.sum()), 1)
        if pool_expected.min() < MIN_EXPECTED:  # still rare: joined with the least frequent kept bucket
            smallest = int(np.argmin(kept.sum(axis=0)))
            pool = pool + kept[:, smallest:smallest + 1]
            kept = np.delete(kept, smallest, axis=1)
    return np.concatenate([kept, pool], axis=1)
