"""Which failures a Prefect task retries: transient faults only, never a user's mistake."""

from __future__ import annotations

import errno
import sqlite3
from types import SimpleNamespace

import pytest
from pydantic import BaseModel, ValidationError

from pipelines.errors import FluxoError
from pipelines.export.package import ParityFailed
from pipelines.retry import is_transient, is_user_error, retry_transient_only
from serving import ServingError


class _Strict(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        _Strict(n="x")
    except ValidationError as error:
        return error
    raise AssertionError("unreachable")


def _wrapped(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("step failed") from cause
    except RuntimeError as error:
        return error


@pytest.mark.parametrize(
    "error",
    [
        ConnectionError("tracking server went away"),
        TimeoutError("read timed out"),
        OSError(errno.ECONNRESET, "connection reset by peer"),
        sqlite3.OperationalError("database is locked"),
        _wrapped(sqlite3.OperationalError("database is locked")),
        type("EndpointConnectionError", (Exception,), {})("could not connect to the endpoint URL"),
    ],
)
def test_transient_faults_are_retried(error: BaseException) -> None:
    assert is_transient(error)
    assert retry_transient_only(None, None, SimpleNamespace(data=error))


@pytest.mark.parametrize(
    "error",
    [
        FluxoError("data.sequence.label_column: no column 'target'"),
        ParityFailed("ONNX parity failed"),
        ServingError("metadata.json: labels must be a non-empty list"),
        _validation_error(),
        _wrapped(FluxoError("bad preset")),
        FileNotFoundError(errno.ENOENT, "no such file"),
        ValueError("a bug"),
        sqlite3.OperationalError("no such table: runs"),
    ],
)
def test_mistakes_checks_and_bugs_are_not(error: BaseException) -> None:
    assert not is_transient(error)
    assert not retry_transient_only(None, None, SimpleNamespace(data=error))


def test_user_errors_are_named_as_such() -> None:
    assert is_user_error(FluxoError("x")) and is_user_error(ServingError("x")) and is_user_error(_validation_error())
    assert not is_user_error(ConnectionError("x"))
