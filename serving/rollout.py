"""Rollout policy: which variant answers a request, which requests are mirrored, how answers compare.

Three modes (``FLUXO_ROLLOUT``):

- ``champion``: the champion answers everything; none of this module runs per request.
- ``shadow``: the champion answers everything; a sampled share of requests
  (``FLUXO_SHADOW_SAMPLE``) is also run on the challenger off the response path,
  and the two answers are compared (argmax equal or not; for a regression model, values
  within a tolerance or not: :func:`agreements`).
- ``canary``: a share ``FLUXO_CANARY_SHARE`` of requests is answered by the
  challenger. A request with an ``X-Request-Key`` header always gets the same
  variant (its key is hashed, not drawn), so one user sees one model; a key-less
  request draws at random.

Everything here is pure (no model, no HTTP, no I/O) so the choices can be tested
exactly; serving/server.py wires it to the live models and the metrics.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving import ROLLOUT_MODES
from serving.contract import contract_mismatch

CHAMPION = "champion"
CHALLENGER = "challenger"
SHADOW = "shadow"
CANARY = "canary"
MODES = ROLLOUT_MODES  # (CHAMPION, SHADOW, CANARY); serving/__init__.py reads FLUXO_ROLLOUT against it
VARIANTS = (CHAMPION, CHALLENGER)
OUTCOMES = ("agree", "disagree", "error")

REQUEST_KEY_HEADER = "x-request-key"
"""Request header whose value pins a client to one variant in canary mode."""
VARIANT_HEADER = "x-fluxo-variant"
"""Response header naming the variant that answered (champion or challenger)."""

_HASH_SPAN = float(2**64)


def key_fraction(key: str) -> float:
    """A stable point in [0, 1) for ``key``: the same in every worker, process and restart.

    blake2b rather than ``hash()``: Python salts ``hash`` of strings per process,
    so two workers would disagree about the same key.
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPAN


@dataclass(frozen=True)
class RolloutPolicy:
    """The mode and its two shares; decides per request, holds no per-request state."""

    mode: str = CHAMPION
    canary_share: float = 0.1
    shadow_sample: float = 1.0
    draw: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    """Source of uniform [0, 1) numbers for key-less canary requests and shadow sampling (tests pin it)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"rollout mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("canary_share", "shadow_sample"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")

    def challenger_answers(self, key: str | None) -> bool:
        """Canary: True when this request goes to the challenger; sticky when ``key`` is given."""
        if self.mode != CANARY:
            return False
        share = self.canary_share
        if share <= 0.0:
            return False
        if share >= 1.0:
            return True
        point = key_fraction(key) if key is not None else self.draw()
        return point < share

    def mirrors(self) -> bool:
        """Shadow: True when this request is also run on the challenger."""
        if self.mode != SHADOW:
            return False
        sample = self.shadow_sample
        if sample >= 1.0:
            return True
        return sample > 0.0 and self.draw() < sample

    def mirrored_rows(self, sizes: Sequence[int]) -> tuple[int, np.ndarray | None]:
        """Shadow: for one champion batch of requests with ``sizes`` instances each, (requests mirrored,
        row mask); the mask is None when every row is mirrored, so the usual case costs no indexing."""
        if self.mode != SHADOW or self.shadow_sample <= 0.0:
            return 0, None
        if self.shadow_sample >= 1.0:
            return len(sizes), None
        keep = [self.mirrors() for _ in sizes]
        taken = sum(keep)
        if taken == len(sizes):
            return taken, None
        return taken, np.repeat(np.array(keep, dtype=bool), sizes)


REGRESSION_RTOL = 0.05
"""Regression: a challenger's value agrees within 5% of the champion's value..."""
REGRESSION_RMSE_SHARE = 0.1
"""...or within a tenth of the champion's test RMSE (its typical error), whichever is wider: a value near 0
cannot agree by a relative tolerance alone, and a difference well inside the champion's own error is no
disagreement a reader should act on."""


def value_tolerance(champion_info: Mapping[str, Any]) -> float:
    """The absolute part of the regression tolerance: :data:`REGRESSION_RMSE_SHARE` * the champion's
    test RMSE (``/metadata`` test_metrics.test_rmse), 0 when the model directory does not record it."""
    rmse = (champion_info.get("test_metrics") or {}).get("test_rmse")
    return REGRESSION_RMSE_SHARE * float(rmse) if isinstance(rmse, (int, float)) and math.isfinite(rmse) else 0.0


def agreements(champion: np.ndarray, challenger: np.ndarray, regression: bool = False, atol: float = 0.0) -> int:
    """How many rows of two (n, n_labels) answers pick the same label (argmax equal).

    ``regression``: the answers are (n, 1) values; a row agrees when
    ``|challenger - champion| <= max(REGRESSION_RTOL * |champion|, atol)`` (``atol``: :func:`value_tolerance`).
    The share that agrees is what ``fluxo_shadow_comparisons_total{outcome="agree"}`` counts either way.
    """
    if champion.shape != challenger.shape:
        raise ValueError(f"answers of shape {champion.shape} and {challenger.shape} cannot be compared")
    if regression:
        ours, theirs = champion.astype(np.float64), challenger.astype(np.float64)
        within = np.abs(theirs - ours) <= np.maximum(REGRESSION_RTOL * np.abs(ours), atol)
        return int(np.count_nonzero(within.all(axis=1)))
    return int(np.count_nonzero(champion.argmax(axis=1) == challenger.argmax(axis=1)))


def rollout_mismatch(champion_info: Mapping[str, Any], challenger_info: Mapping[str, Any]) -> str | None:
    """Why a challenger cannot stand in for the champion: another input contract (:func:`contract_mismatch`)
    or another task (a regression model's values and a classifier's probabilities cannot be compared); or None."""
    problem = contract_mismatch(champion_info, challenger_info)
    if problem is not None:
        return problem
    ours, theirs = champion_info.get("task") or "multiclass", challenger_info.get("task") or "multiclass"
    if (ours == "regression") != (theirs == "regression"):
        return f"its task is {theirs!r}, the champion's is {ours!r}"
    return None


class ShadowBook:
    """Mirrored requests in flight, capped so a slow challenger can never pile up work (or memory) without end.

    The cap is the worker's request limit (``FLUXO_MAX_CONCURRENCY``): a champion
    batch is mirrored while fewer requests than that wait on the challenger (so
    the cap is exceeded by one batch at most); otherwise it is skipped and
    counted, never queued.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.skipped = 0

    def admit(self, requests: int = 1) -> bool:
        """Take slots for ``requests`` mirrored requests; False (and counted as skipped) when the cap is reached."""
        if self.in_flight >= self.limit:
            self.skipped += requests
            return False
        self.in_flight += requests
        return True

    def release(self, requests: int = 1) -> None:
        """Give back the slots of mirrors that finished (answered or failed)."""
        self.in_flight -= requests


__all__ = [
    "CANARY", "CHALLENGER", "CHAMPION", "MODES", "OUTCOMES", "REGRESSION_RMSE_SHARE", "REGRESSION_RTOL",
    "REQUEST_KEY_HEADER", "SHADOW", "VARIANTS", "VARIANT_HEADER", "RolloutPolicy", "ShadowBook", "agreements",
    "contract_mismatch", "key_fraction", "rollout_mismatch", "value_tolerance",
]
