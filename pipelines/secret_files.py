"""Secrets handed over as files: ``VAR_FILE=/run/secrets/x`` stands for ``VAR=<the file's content>``.

Compose (and Kubernetes) mount secrets as files so that they appear in no command line, no
``docker inspect`` and no image. MLflow and Prefect only read their credentials from plain
variables, so fluxo reads the files once, before either library is configured, and exports
the plain variables to this process (the flow runs it starts inherit them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, MutableMapping
from pathlib import Path

from pipelines.errors import FluxoError

FILE_SUFFIX = "_FILE"

# What fluxo's own processes read from files: MLflow's client credentials and Prefect's auth string.
# (The service reads FLUXO_API_KEY_FILE itself: serving/__init__.py; boto3 has AWS_SHARED_CREDENTIALS_FILE.)
MLFLOW_SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
PREFECT_SECRETS = ("PREFECT_API_AUTH_STRING",)


def read_secret_file(variable: str, path: str | Path) -> str:
    """The content of ``path`` (``variable`` names where it came from), without the trailing newline.

    The service's reader (serving.read_secret_file), its refusal raised as fluxo's own error.
    """
    from serving import ServingError
    from serving import read_secret_file as read

    try:
        return read(variable, path)
    except ServingError as error:
        raise FluxoError(str(error)) from None


def load_secret_files(names: Iterable[str], environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Set each ``NAME`` whose ``NAME_FILE`` is set from that file; returns the names it set.

    Idempotent: a second call finds ``NAME`` already equal to the file. ``NAME`` and
    ``NAME_FILE`` with different values are a mistake (which one is meant?), not a choice.
    """
    env = os.environ if environ is None else environ
    loaded = []
    for name in names:
        path = env.get(name + FILE_SUFFIX, "").strip()
        if not path:
            continue
        value = read_secret_file(name + FILE_SUFFIX, path)
        if env.get(name) not in (None, "", value):
            raise FluxoError(f"both {name} and {name}{FILE_SUFFIX} are set, to different values; unset one of them")
        env[name] = value
        loaded.append(name)
    return loaded


def load_mlflow_secrets(environ: MutableMapping[str, str] | None = None) -> None:
    """``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` from their ``_FILE`` variables; a password needs its account."""
    env = os.environ if environ is None else environ
    load_secret_files(MLFLOW_SECRETS, env)
    if env.get("MLFLOW_TRACKING_PASSWORD") and not env.get("MLFLOW_TRACKING_USERNAME"):
        raise FluxoError("MLFLOW_TRACKING_PASSWORD is set but MLFLOW_TRACKING_USERNAME is not: "
                         "set MLFLOW_TRACKING_USERNAME to the account the password belongs to")


def load_prefect_secrets(environ: MutableMapping[str, str] | None = None) -> None:
    """``PREFECT_API_AUTH_STRING`` from ``PREFECT_API_AUTH_STRING_FILE``.

    Prefect reads its settings once, when it is imported: call this before that (the CLI
    does, first thing), or hand the value over with ``temporary_settings``.
    """
    load_secret_files(PREFECT_SECRETS, environ)


def load_client_secrets(environ: MutableMapping[str, str] | None = None) -> None:
    """Both of the above: what the ``fluxo`` command does before any subcommand runs."""
    load_mlflow_secrets(environ)
    load_prefect_secrets(environ)
