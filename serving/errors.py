"""The service's one error type for what a user can fix."""

from __future__ import annotations


class ServingError(Exception):
    """A user-fixable serving problem: the message names the file, field or value and the fix.

    ``serving`` cannot import ``pipelines.errors.FluxoError``, so it has its own
    type; the CLI catches both the same way.
    """
