"""Secrets handed over as files: ``VAR_FILE=/run/secrets/x`` stands for ``VAR=<the file's content>``.

Compose (and Kubernetes) mount secrets as files so that they appear in no command line, no
``docker inspect`` and no image. A secret read from such a file stays out of ``os.environ``
where a library allows it, because whatever is there is copied into every process fluxo starts
(the model server's web workers, the MLflow UI, torchrun's ranks) and shows in their
``/proc/<pid>/environ``:

- MLflow's password is read from its file on each request to the tracking server, by a request
  auth provider of MLflow's own (:class:`PasswordFileAuth`, named by ``MLFLOW_TRACKING_AUTH``).
  The environment holds only the file's path, so each fluxo process that talks to MLflow (a flow
  run, a Ray worker, a torchrun rank) reads the file itself, and a rotated secret is picked up.
- MLflow's user name is no secret (MLflow tags each run with it): it is exported from its file.
- Prefect reads its settings from the environment, once, on import: its auth string is exported
  to this process (the flow runs it starts need it too).

:func:`without_client_secrets` is the environment for the children that talk to neither (the
model server, the MLflow UI): every client credential of either is left out.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from pipelines.errors import FluxoError

FILE_SUFFIX = "_FILE"

# What fluxo's own processes read from files: MLflow's client account and Prefect's auth string.
# (The service reads FLUXO_API_KEY_FILE itself: serving/__init__.py; boto3 has AWS_SHARED_CREDENTIALS_FILE.)
MLFLOW_USERNAME, MLFLOW_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
PREFECT_SECRETS = ("PREFECT_API_AUTH_STRING",)
# MLflow's choice of request auth provider (mlflow.environment_variables.MLFLOW_TRACKING_AUTH), and ours.
MLFLOW_AUTH = "MLFLOW_TRACKING_AUTH"
PASSWORD_FILE_AUTH = "fluxo-password-file"
# Credentials of MLflow's and Prefect's clients: the model server and the MLflow UI need none of them.
CLIENT_SECRETS = (MLFLOW_PASSWORD, "MLFLOW_TRACKING_TOKEN", *PREFECT_SECRETS, "PREFECT_API_KEY")


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
        value = _from_file(name, env)
        if value is not None:
            env[name] = value
            loaded.append(name)
    return loaded


def _from_file(name: str, env: Mapping[str, str]) -> str | None:
    """The content of the file ``NAME_FILE`` names (None when unset), refused if ``NAME`` says otherwise."""
    path = env.get(name + FILE_SUFFIX, "").strip()
    if not path:
        return None
    value = read_secret_file(name + FILE_SUFFIX, path)
    if env.get(name) not in (None, "", value):
        raise FluxoError(f"both {name} and {name}{FILE_SUFFIX} are set, to different values; unset one of them")
    return value


def mlflow_password(environ: Mapping[str, str] | None = None) -> str | None:
    """The content of ``MLFLOW_TRACKING_PASSWORD_FILE``, read now (None when it is unset)."""
    return _from_file(MLFLOW_PASSWORD, os.environ if environ is None else environ)


def check_mlflow_secrets(environ: MutableMapping[str, str] | None = None) -> None:
    """Check MLflow's account, and name :class:`PasswordFileAuth` for its password file (a password needs an account).

    Exports ``MLFLOW_TRACKING_USERNAME`` from its file and names fluxo's provider in
    ``MLFLOW_TRACKING_AUTH``; the password itself is only checked (readable, not empty, not
    contradicted by ``MLFLOW_TRACKING_PASSWORD``) and stays out of the environment. Imports
    nothing of MLflow (the CLI calls it before any command): :func:`load_mlflow_secrets` does.
    """
    env = os.environ if environ is None else environ
    load_secret_files((MLFLOW_USERNAME,), env)
    from_file = mlflow_password(env)
    if (from_file or env.get(MLFLOW_PASSWORD)) and not env.get(MLFLOW_USERNAME):
        raise FluxoError(f"{MLFLOW_PASSWORD} is set but {MLFLOW_USERNAME} is not: "
                         f"set {MLFLOW_USERNAME} to the account the password belongs to")
    if from_file is None:
        return
    if env.get(MLFLOW_AUTH, "") not in ("", PASSWORD_FILE_AUTH):
        raise FluxoError(f"both {MLFLOW_AUTH}={env[MLFLOW_AUTH]} and {MLFLOW_PASSWORD}{FILE_SUFFIX} are set: "
                         "which authentication is meant? unset one of them")
    env[MLFLOW_AUTH] = PASSWORD_FILE_AUTH


class PasswordFileAuth:
    """MLflow's request auth provider (mlflow.tracking.request_auth) for the password in its file.

    MLflow asks it for every request whose ``MLFLOW_TRACKING_AUTH`` names it: the account is
    ``MLFLOW_TRACKING_USERNAME``, the password read from ``MLFLOW_TRACKING_PASSWORD_FILE`` then,
    sent as MLflow itself would send them (HTTP basic, UTF-8).
    """

    def get_name(self) -> str:
        return PASSWORD_FILE_AUTH

    def get_auth(self) -> Any:
        password = mlflow_password()
        if password is None:  # the file's variable was unset since: no account, as MLflow would do
            return None
        token = base64.standard_b64encode(f"{os.environ.get(MLFLOW_USERNAME, '')}:{password}".encode()).decode()

        def basic(request: Any) -> Any:
            request.headers["Authorization"] = f"Basic {token}"
            return request

        return basic


def load_mlflow_secrets() -> None:
    """:func:`check_mlflow_secrets`, and :class:`PasswordFileAuth` registered with this process's MLflow (once).

    What a process does before its first MLflow call (pipelines/tracking.py). MLflow finds other
    providers through a package entry point; registering ours here works without reinstalling
    fluxo, and in any process that points MLflow at a store through fluxo.
    """
    check_mlflow_secrets()
    if os.environ.get(MLFLOW_AUTH) != PASSWORD_FILE_AUTH:
        return
    from mlflow.tracking.request_auth.registry import _request_auth_provider_registry as providers

    if not any(provider.get_name() == PASSWORD_FILE_AUTH for provider in providers):
        providers.register(PasswordFileAuth)


def without_client_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a child that is no MLflow or Prefect client: no credential of either, nor their files."""
    env = {name: value for name, value in environ.items()
           if name.removesuffix(FILE_SUFFIX) not in CLIENT_SECRETS}
    if env.get(MLFLOW_AUTH) == PASSWORD_FILE_AUTH:
        del env[MLFLOW_AUTH]  # fluxo's provider: MLflow elsewhere would only warn that it cannot find it
    return env


def load_prefect_secrets(environ: MutableMapping[str, str] | None = None) -> None:
    """``PREFECT_API_AUTH_STRING`` from ``PREFECT_API_AUTH_STRING_FILE``.

    Prefect reads its settings once, when it is imported: call this before that (the CLI
    does, first thing), or hand the value over with ``temporary_settings``.
    """
    load_secret_files(PREFECT_SECRETS, environ)


def load_client_secrets(environ: MutableMapping[str, str] | None = None) -> None:
    """Both of the above: what the ``fluxo`` command does before any subcommand runs."""
    check_mlflow_secrets(environ)
    load_prefect_secrets(environ)
