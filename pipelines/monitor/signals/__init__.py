"""The drift signals ``fluxo monitor`` tests: one module each, registered where it is defined.

No single signal sees everything (pipelines/monitor/detect.py), so each asks its own
question of a window, at an equal share of ``monitor.alpha``. Every module of this package
but ``base`` is imported with it, and each registers its signal with ``@register``; so a
new signal is one new module here (a :class:`DriftSignal` subclass with a ``name``, its
``features`` and, if it has something to show, a report ``section``), plus its test.
:func:`in_use` lists them; ``registered(...)`` adds one for a ``with`` block.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipelines.monitor.signals.base import (
    DriftSignal,
    Finding,
    Sample,
    TestResult,
    in_use,
    register,
    registered,
    unregister,
)

__all__ = ["DriftSignal", "Finding", "Sample", "TestResult", "in_use", "load_signals", "register", "registered",
           "unregister"]


def load_signals() -> tuple[DriftSignal, ...]:
    """Import every signal module of this package (importing registers it); the signals in use."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return in_use()


load_signals()
