"""What a drift signal is, and the registry of the signals ``fluxo monitor`` tests.

A signal is one question asked of a window: it builds its reference from the model's
reference data, summarizes a window of payloads the same way, tests the two (hyppo's MMD
unless it brings its own test) and may add a section to the drift report. Its ``name``
keys its results everywhere they are published: ``scores[name]`` in the summary (the
status file, the Prefect event, ``fluxo monitor --json``), the MLflow metrics
``drift_<name>_statistic`` / ``drift_<name>_p_value`` and the ``signal`` label of the
service's ``fluxo_drift_*`` gauges.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from pipelines.monitor.mmd import TestResult, mmd_test

if TYPE_CHECKING:
    from pipelines.monitor.embedding import Embedded
    from pipelines.monitor.reference import Reference
    from pipelines.monitor.window import Window
    from serving.contract import TableInput


@dataclass(frozen=True)
class Sample:
    """One side of a comparison, everything a signal may read: raw inputs and what the served graph made of them."""

    inputs: np.ndarray  # (n, *input_shape): as stored, or as clients sent them (ragged sequences NaN-padded)
    embeddings: np.ndarray  # (n, d): the head's input (pipelines/monitor/embedding.py)
    probabilities: np.ndarray  # (n, classes): the reference's from the graph, a window's as the service answered
    labels: np.ndarray | None = None  # true classes: known for the reference's validation samples, not for traffic
    values: np.ndarray | None = None  # (n,): a regression model's predicted values; None for a classifier
    table: TableInput | None = None  # a table model's columns (serving/contract.py); inputs are then its raw columns

    @classmethod
    def of_reference(cls, reference: Reference) -> Sample:
        """The model's reference data (pipelines/monitor/reference.py)."""
        return cls(reference.inputs, reference.embedded.embeddings, reference.embedded.probabilities,
                   reference.labels, reference.embedded.values, reference.table)

    @classmethod
    def of_window(cls, window: Window, seen: Embedded, table: TableInput | None = None) -> Sample:
        """A window of logged payloads, with what the served graph makes of its inputs (``seen``).

        A regression model's values are the service's answers when the log holds them, else the graph's
        (``seen``: the same graph). ``table``: the model's columns, for a table model.
        """
        values = window.values if window.values is not None else seen.values
        return cls(window.inputs, seen.embeddings, window.probabilities, None, values, table)


@dataclass(frozen=True)
class Finding:
    """One signal's outcome on one window: what it compared and its test."""

    signal: DriftSignal
    reference: np.ndarray
    window: np.ndarray
    test: TestResult


class DriftSignal:
    """One drift signal. Subclass it in a module of pipelines/monitor/signals/ and decorate it with :func:`register`.

    ``name`` keys its results (see the module's docstring); ``order`` places it among the
    signals in use (scores, the report's rows and sections): the built-in ones stand at 10,
    20, 30, and a new one at 100 goes last. Only :meth:`features` is required.
    """

    name: ClassVar[str]
    order: ClassVar[float] = 100.0

    def features(self, sample: Sample) -> np.ndarray:
        """What is compared, one row per instance; both sides alike unless :meth:`reference`/:meth:`summarize` differ."""
        raise NotImplementedError(f"{type(self).__name__} defines no features")

    def reference(self, sample: Sample) -> np.ndarray:
        """The reference side, from the model's reference data."""
        return self.features(sample)

    def summarize(self, sample: Sample) -> np.ndarray:
        """The window side, from the logged payloads."""
        return self.features(sample)

    def compare(self, reference: Sample, window: Sample, level: float) -> Finding:
        """This signal on one window: :meth:`reference` and :meth:`summarize`, then :meth:`test`.

        A signal whose test needs more than the two arrays (a table's column contract) overrides this.
        """
        ref, win = self.reference(reference), self.summarize(window)
        return Finding(self, ref, win, self.test(ref, win, level))

    def test(self, reference: np.ndarray, window: np.ndarray, level: float) -> TestResult:
        """The two-sample test at ``level`` (its share of ``monitor.alpha``)."""
        return mmd_test(self.name, reference, window, level)

    def section(self, finding: Finding, labels: list[str]) -> tuple[str, str] | None:
        """The report section (title, HTML) this signal adds, or None; ``labels``: the model's class names."""
        return None

    def score(self, test: TestResult) -> dict[str, Any]:
        """Its entry in the summary's ``scores``: the MLflow metrics and gauges read ``statistic`` and ``p_value``."""
        return test.as_dict()


_IN_USE: list[DriftSignal] = []
S = TypeVar("S", bound="type[DriftSignal] | DriftSignal")


def register(signal: S) -> S:
    """Add a signal to those in use (a :class:`DriftSignal` subclass, instantiated, or an instance).

    As a class decorator it returns the class. Names are unique: a second one raises ValueError.
    """
    instance = signal() if isinstance(signal, type) else signal
    if not getattr(instance, "name", None):
        raise ValueError(f"{type(instance).__name__}: a drift signal needs a name")
    if any(known.name == instance.name for known in _IN_USE):
        raise ValueError(f"a drift signal named {instance.name!r} is registered already")
    _IN_USE.append(instance)
    _IN_USE.sort(key=lambda known: known.order)  # stable: equal orders keep their registration order
    return signal


def unregister(name: str) -> None:
    """Take the signal ``name`` out of use (nothing if there is none)."""
    _IN_USE[:] = [known for known in _IN_USE if known.name != name]


@contextmanager
def registered(*signals: type[DriftSignal] | DriftSignal) -> Iterator[None]:
    """``signals`` in use for the ``with`` block only (a test's toy signal)."""
    added: list[str] = []
    try:
        for signal in signals:
            register(signal)
            added.append(signal.name)
        yield
    finally:
        for name in added:
            unregister(name)


def in_use() -> tuple[DriftSignal, ...]:
    """The signals ``fluxo monitor`` tests, in order: the one list of them."""
    return tuple(_IN_USE)
