"""A graph's logits over whole arrays, exactly as the service computes them (ONNX Runtime, CPU).

Export's parity check, its variants, the registry's gate and the report all score a model
directory through here, so none of them can disagree with what is served. No torch: the
gate and the report run where only the serving stack is installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from serving.contract import INPUT_NAME

if TYPE_CHECKING:  # a cached ParityReport is unpickled where no graph runs: onnxruntime loads on first use
    import onnxruntime as ort


@dataclass(frozen=True)
class ParityReport:
    samples: int
    max_abs_diff: float
    argmax_agreement: float
    atol: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.argmax_agreement == 1.0

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "passed": self.passed}


def onnx_batches(onnx_path: Path, x: np.ndarray, batch_size: int,
                  lengths: np.ndarray | None = None) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(rows, float32 batch, ONNX logits) over ``x``, on the CPU provider, in batches.

    ``lengths``: each row's valid steps, fed to a graph that takes them (a variable-length RNN's).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    yield from session_batches(session, x, batch_size, lengths)


def session_batches(session: ort.InferenceSession, x: np.ndarray, batch_size: int,
                     lengths: np.ndarray | None = None) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(rows, float32 batch, logits) over ``x`` from an open ``session`` (any provider), in batches."""
    from serving.runtime import graph_feeds

    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        # A copy: x is usually a read-only memory map, which torch.from_numpy warns about.
        batch = np.array(x[rows], dtype=np.float32, order="C")
        feeds = graph_feeds(session, INPUT_NAME, batch, None if lengths is None else np.asarray(lengths)[rows])
        yield rows, batch, session.run(None, feeds)[0]


def onnx_logits(onnx_path: Path, x: np.ndarray, batch_size: int = 512, lengths: np.ndarray | None = None) -> np.ndarray:
    """The graph's logits for every row of ``x``, as the service computes them (CPU provider)."""
    parts = [logits for _, _, logits in onnx_batches(onnx_path, x, batch_size, lengths)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def session_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 512,
                   lengths: np.ndarray | None = None) -> np.ndarray:
    """:func:`onnx_logits` from a session already open on the provider that will serve (export's variants)."""
    parts = [np.asarray(logits, dtype=np.float32) for _, _, logits in session_batches(session, x, batch_size, lengths)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def served_accuracy(onnx_path: Path, x: np.ndarray, y: np.ndarray, batch_size: int = 512,
                    lengths: np.ndarray | None = None) -> float:
    """Accuracy of the ONNX graph on padded inputs, as the service runs it.

    A variable-length RNN's graph takes ``lengths`` and stops at each sequence's own end, as
    training did; any other model reads the zero padding as signal, so for it this can fall
    below the run's test accuracy, and the export step records both so a gap is never silent.
    """
    correct = sum(int((logits.argmax(1) == y[rows]).sum())
                  for rows, _, logits in onnx_batches(onnx_path, x, batch_size, lengths))
    return correct / max(len(x), 1)
