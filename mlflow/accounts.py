"""The MLflow server's service accounts, made (or brought up to date) by its admin; safe to run again.

The compose stack runs this once per ``docker compose up`` (service ``mlflow-accounts``), after
the server is healthy and before the worker and the prediction service start:

- ``worker`` (``MLFLOW_WORKER_USERNAME``): EDIT on every experiment (runs, metrics, artifacts) and
  MANAGE on every registered model (versions, tags, aliases: the gate moves ``champion`` and removes
  ``challenger``). Like any account it may create experiments and registered models.
- ``serving`` (``MLFLOW_SERVING_USERNAME``): READ on every experiment (a version's files are its run's
  artifacts) and every registered model. It follows the aliases; it cannot move one.

Each password is read from the file its ``..._PASSWORD_FILE`` names and set on every run, so a
rotation is: write the new password into the file, run this again, restart the account's users.
Grants are on the pattern ``*`` (every experiment, every registered model); the server's
``default_permission`` is NO_PERMISSIONS (mlflow/entrypoint.py), so any other account sees
nothing until an admin grants it something (deploy/README.md, "Accounts").

    python accounts.py                        ensure the accounts (as MLFLOW_AUTH_ADMIN_USERNAME)
    python accounts.py rotate-admin           set the admin's password to the file's; the old one on stdin
    python accounts.py add-user NAME LEVEL    a person's account, LEVEL (READ, EDIT or MANAGE) on every
                                              experiment and registered model; the password on stdin

Only the standard library: it runs in the MLflow image and in the tests alike.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from entrypoint import SetupError  # beside this file, in the image and in mlflow/
from entrypoint import read_secret as _read_secret

# Account → (variable prefix, grants). A grant is (resource type, permission) on every resource ('*').
ACCOUNTS: dict[str, tuple[tuple[str, str], ...]] = {
    "MLFLOW_WORKER": (("experiment", "EDIT"), ("registered_model", "MANAGE")),
    "MLFLOW_SERVING": (("experiment", "READ"), ("registered_model", "READ")),
}


class AccountError(SetupError):
    """What went wrong and what to do; printed as one line."""


def read_secret(variable: str) -> str:
    """The secret in the file ``$variable`` names (entrypoint.read_secret: one reader for both scripts)."""
    return _read_secret(variable, dict(os.environ))


def required(variable: str) -> str:
    value = os.environ.get(variable, "").strip()
    if not value:
        raise AccountError(f"{variable} is not set")
    return value


class Server:
    """The REST API of one MLflow server, as one account."""

    def __init__(self, url: str, username: str, password: str) -> None:
        self.url, self.username = url.rstrip("/"), username
        self._auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()

    def call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> tuple[int, dict]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Authorization": self._auth, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode(errors="replace")
        try:
            payload = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            payload = {"message": text.strip()}
        return status, payload if isinstance(payload, dict) else {"value": payload}

    def must(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
        status, payload = self.call(method, path, body, query)
        if status == 401:
            raise AccountError(f"{self.url} refused the account {self.username!r} (401: no such account, or a wrong "
                               "password)")
        if status >= 400:
            raise AccountError(f"{method} {path} as {self.username!r}: {status} {payload.get('message', payload)}")
        return payload


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AccountError(f"{url}/health did not answer within {timeout:.0f} s; is the MLflow server up?")
        time.sleep(1)


def ensure_user(admin: Server, username: str, password: str) -> str:
    status, payload = admin.call("GET", "/api/2.0/mlflow/users/get", query={"username": username})
    if status == 200:
        admin.must("PATCH", "/api/2.0/mlflow/users/update-password", {"username": username, "password": password})
        return "password set"
    if status != 404 and payload.get("error_code") != "RESOURCE_DOES_NOT_EXIST":
        raise AccountError(f"cannot look up the user {username!r}: {status} {payload.get('message', payload)}")
    admin.must("POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})
    return "created"


def grant(admin: Server, username: str, resource_type: str, permission: str) -> None:
    """``permission`` on every resource of the type; an earlier grant of another level is replaced."""
    body = {"username": username, "resource_type": resource_type, "resource_id": "*", "permission": permission}
    status, payload = admin.call("POST", "/api/3.0/mlflow/users/permissions/grant", body)
    if status == 200:
        return
    if payload.get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise AccountError(f"cannot grant {username!r} {permission} on {resource_type}: {status} "
                           f"{payload.get('message', payload)}")
    admin.must("POST", "/api/3.0/mlflow/users/permissions/revoke",
               {"username": username, "resource_type": resource_type, "resource_id": "*"})
    admin.must("POST", "/api/3.0/mlflow/users/permissions/grant", body)


def ensure_accounts() -> None:
    url = required("MLFLOW_TRACKING_URI")
    admin = Server(url, required("MLFLOW_AUTH_ADMIN_USERNAME"), read_secret("MLFLOW_AUTH_ADMIN_PASSWORD_FILE"))
    wait_healthy(url)
    status, _ = admin.call("GET", "/api/2.0/mlflow/users/get", query={"username": admin.username})
    if status == 401:
        raise AccountError(f"{url} refused the admin {admin.username!r} with the password in "
                           "MLFLOW_AUTH_ADMIN_PASSWORD_FILE: the server reads that file only when it first creates "
                           "the admin; to change the password, run `accounts.py rotate-admin` (deploy/README.md)")
    for prefix, grants in ACCOUNTS.items():
        username = required(f"{prefix}_USERNAME")
        if username == admin.username:
            raise AccountError(f"{prefix}_USERNAME={username!r} is the admin; give the service account its own name")
        done = ensure_user(admin, username, read_secret(f"{prefix}_PASSWORD_FILE"))
        for resource_type, permission in grants:
            grant(admin, username, resource_type, permission)
        print(f"{username}: {done}; " + ", ".join(f"{p} on every {t}" for t, p in grants), flush=True)


def rotate_admin() -> None:
    """The admin's password becomes the secret file's; the old one is read from stdin (never an argument)."""
    url = required("MLFLOW_TRACKING_URI")
    username, new = required("MLFLOW_AUTH_ADMIN_USERNAME"), read_secret("MLFLOW_AUTH_ADMIN_PASSWORD_FILE")
    old = sys.stdin.readline().rstrip("\r\n")
    if not old:
        raise AccountError("give the admin's current password on stdin (the file already holds the new one)")
    Server(url, username, old).must("PATCH", "/api/2.0/mlflow/users/update-password",
                                     {"username": username, "password": new, "current_password": old})
    print(f"{username}: password set from MLFLOW_AUTH_ADMIN_PASSWORD_FILE", flush=True)


def add_user(username: str, level: str) -> None:
    """A person's account with ``level`` on every experiment and registered model; the password from stdin.

    Again for an existing user: its password and grants are set anew. Narrower grants (one
    experiment, one model) go through MLflow's API or UI as the admin (deploy/README.md).
    """
    level = level.upper()
    if level not in ("READ", "EDIT", "MANAGE"):
        raise AccountError(f"level {level!r}: give READ, EDIT or MANAGE")
    password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 12:
        raise AccountError("give the new user's password on stdin, 12 characters or more")
    url = required("MLFLOW_TRACKING_URI")
    admin = Server(url, required("MLFLOW_AUTH_ADMIN_USERNAME"), read_secret("MLFLOW_AUTH_ADMIN_PASSWORD_FILE"))
    done = ensure_user(admin, username, password)
    for resource_type in ("experiment", "registered_model"):
        grant(admin, username, resource_type, level)
    print(f"{username}: {done}; {level} on every experiment and registered_model", flush=True)


def main(argv: list[str]) -> int:
    commands = {"ensure": (ensure_accounts, 0), "rotate-admin": (rotate_admin, 0), "add-user": (add_user, 2)}
    command = argv[0] if argv else "ensure"
    if command not in commands or len(argv[1:]) != commands[command][1]:
        print("usage: accounts.py [ensure | rotate-admin | add-user NAME READ|EDIT|MANAGE]", file=sys.stderr)
        return 2
    try:
        commands[command][0](*argv[1:])
    except SetupError as error:  # AccountError, or a secret file entrypoint.read_secret refused
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
