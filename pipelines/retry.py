"""Which failures are worth retrying: transient faults of a network, a database or an object store.

A user's mistake (``FluxoError``, a settings ``ValidationError``) or a failed check
(parity) gives the same answer every time, so retrying it only repeats the
traceback; Prefect tasks retry through :func:`retry_transient_only`.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Any

from pipelines.errors import FluxoError

# errno values of faults that go away by themselves (a busy peer, a dropped connection).
_TRANSIENT_ERRNO = {errno.EAGAIN, errno.EBUSY, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                    errno.ETIMEDOUT, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH}
# Exception class names from botocore/urllib3/requests/httpx, matched by name so none must be installed.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                    "ProtocolError", "ReadTimeout", "ConnectTimeout", "RemoteDisconnected", "ServiceUnavailable"}
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "temporarily unavailable", "too many requests",
                   "slowdown", "service unavailable", "connection reset", "timed out")


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def is_user_error(error: BaseException) -> bool:
    """A mistake the user must fix: never retried, reported as one line."""
    from pydantic import ValidationError

    try:
        from serving import ServingError
    except ImportError:  # pragma: no cover - serving ships with fluxo
        ServingError = FluxoError  # noqa: N806
    return isinstance(error, (FluxoError, ServingError, ValidationError))


def is_transient(error: BaseException) -> bool:
    """True when the error, or one it was raised from, is a fault that a retry may not meet again."""
    if is_user_error(error):
        return False
    for item in _chain(error):
        if is_user_error(item):
            return False
        names = {cls.__name__ for cls in type(item).__mro__}
        if names & _TRANSIENT_NAMES or isinstance(item, (ConnectionError, TimeoutError)):
            return True
        if isinstance(item, OSError) and item.errno in _TRANSIENT_ERRNO:
            return True
        text = str(item).lower()
        if isinstance(item, sqlite3.OperationalError) or "OperationalError" in names or "MlflowException" in names:
            if any(fragment in text for fragment in _TRANSIENT_TEXT):
                return True
    return False


def retry_transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only for a transient fault."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            error = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result is no reason to retry
            return False
    return isinstance(error, BaseException) and is_transient(error)
