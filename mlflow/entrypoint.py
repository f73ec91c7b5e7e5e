"""Entrypoint of the MLflow server image: secrets from files, then ``exec`` the command unchanged.

A password on ``mlflow server``'s command line (``--backend-store-uri postgresql://user:pw@...``)
is visible to ``ps`` and ``docker inspect``; one in the image or the compose file is visible to
everyone with the repository. So the compose stack hands secrets over as files (``/run/secrets``)
and this script turns them into what ``mlflow server`` reads, in its own environment only:

- ``MLFLOW_BACKEND_STORE_URI`` (the ``--backend-store-uri`` option's variable), built from
  ``POSTGRES_HOST``, ``POSTGRES_PORT``, ``POSTGRES_USER``, ``POSTGRES_PASSWORD_FILE`` and ``MLFLOW_DB``;
- ``MLFLOW_AUTH_CONFIG_PATH``: a ``basic_auth.ini`` written to a private temporary folder, with the
  user store in the database ``MLFLOW_AUTH_DB`` on the same server (or ``MLFLOW_AUTH_DATABASE_URI``
  as given), ``default_permission = NO_PERMISSIONS`` (an account sees what it was granted) and a
  login cache (``auth_cache_ttl_seconds``, see below);
- ``MLFLOW_AUTH_ADMIN_PASSWORD`` and ``MLFLOW_FLASK_SERVER_SECRET_KEY`` from their ``_FILE`` variables.

Whatever is not configured is left alone, so ``docker run fluxo-mlflow`` still starts the plain
standalone server. Run as ``python entrypoint.py mlflow server --app-name basic-auth ...``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

# An account that was granted nothing sees nothing (MLflow's own default is READ for everyone).
DEFAULT_PERMISSION = "NO_PERMISSIONS"
# Checking a password costs ~0.6 s of CPU (werkzeug's scrypt; measured on a loaded 2-core box), and
# clients authenticate every request: a training run makes hundreds. A good login is remembered this
# long per server worker; the price is that a changed or deleted password is still accepted by the
# other workers for up to that long.
AUTH_CACHE_TTL_SECONDS = 60
FILE_VARIABLES = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


class SetupError(Exception):
    """A missing or empty secret, or a half-configured database: the message names the variable and file."""


def read_secret(variable: str, env: dict[str, str]) -> str:
    """The content of the file ``env[variable]`` names, without its trailing newline; never empty."""
    path = env.get(variable, "").strip()
    if not path:
        raise SetupError(f"{variable} is not set: point it at the secret file (deploy/make-secrets.sh writes them)")
    try:
        value = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as error:
        raise SetupError(f"{variable}={path}: cannot read it ({error.strerror}); run deploy/make-secrets.sh") from None
    if not value.strip():
        raise SetupError(f"{variable}={path}: the file is empty; run deploy/make-secrets.sh")
    return value


def postgres_uri(database: str, env: dict[str, str]) -> str:
    """A psycopg2 URI of ``database`` on the configured server (psycopg2: the image has no psycopg 3)."""
    user = env.get("POSTGRES_USER", "").strip()
    if not user:
        raise SetupError("POSTGRES_USER is not set, but POSTGRES_HOST is: set both (docker-compose.yml, service mlflow)")
    password = quote(read_secret("POSTGRES_PASSWORD_FILE", env), safe="")
    host, port = env["POSTGRES_HOST"].strip(), env.get("POSTGRES_PORT", "").strip() or "5432"
    return f"postgresql+psycopg2://{quote(user, safe='')}:{password}@{host}:{port}/{database}"


def configure(env: dict[str, str]) -> dict[str, str]:
    """The variables to add to ``env`` before the server starts (``env`` itself is not changed)."""
    added: dict[str, str] = {}
    for name in FILE_VARIABLES:
        if env.get(name + "_FILE", "").strip():
            added[name] = read_secret(name + "_FILE", env)
    if env.get("POSTGRES_HOST", "").strip():
        database = env.get("MLFLOW_DB", "").strip()
        if not database:
            raise SetupError("MLFLOW_DB is not set, but POSTGRES_HOST is: name MLflow's database")
        added["MLFLOW_BACKEND_STORE_URI"] = postgres_uri(database, env)
    auth_uri = env.get("MLFLOW_AUTH_DATABASE_URI", "").strip()
    if not auth_uri and env.get("MLFLOW_AUTH_DB", "").strip():
        if not env.get("POSTGRES_HOST", "").strip():
            raise SetupError("MLFLOW_AUTH_DB is set but POSTGRES_HOST is not: the user store lives on that server")
        auth_uri = postgres_uri(env["MLFLOW_AUTH_DB"].strip(), env)
    if auth_uri:
        added["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(auth_uri))
    return added


def write_auth_config(database_uri: str) -> Path:
    """``basic_auth.ini`` readable by this user only (it holds the user store's password)."""
    folder = Path(tempfile.mkdtemp(prefix="mlflow-auth-"))  # mode 0700
    path = folder / "basic_auth.ini"
    # configparser interpolates '%': a percent-encoded password must be written as '%%'.
    text = (f"[mlflow]\ndefault_permission = {DEFAULT_PERMISSION}\n"
            f"database_uri = {database_uri.replace('%', '%%')}\n"
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_SECONDS}\n")
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return path


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: entrypoint.py COMMAND [ARGS...]   (e.g. mlflow server --app-name basic-auth)")
    try:
        added = configure(dict(os.environ))
    except SetupError as error:
        sys.exit(f"error: {error}")
    os.environ.update(added)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
