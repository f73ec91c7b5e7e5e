"""What this project serves right now, and which model the commands about the live model act on.

``fluxo monitor`` and ``fluxo status`` are about the model being served, which need not be
the model of whatever dataset ``data/`` holds now: a digits model can be serving while an
MNIST-1D set has just been ingested. So each ``fluxo serve`` leaves a record of itself
(:func:`record_server`: its URL, process, model and payload log) under
``.fluxo/servers/`` for as long as it runs, and :func:`choose_live_model` picks, in order:
``--model``; the server at ``--url``; the one server of this project that is running; the
dataset ``--config``/``--set`` names; and only then ``data/``'s dataset, saying so. Every
choice carries the reason, which the commands print.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.errors import FluxoError

log = logging.getLogger(__name__)

SERVERS_DIR = Path(".fluxo") / "servers"


@dataclass(frozen=True)
class ServerRecord:
    """One running ``fluxo serve`` of this project, as it described itself when it started."""

    url: str
    pid: int
    model_name: str
    model: str | None  # the --model it was given (a models:/ URI or a directory); None: it follows the champion
    payload_log: str | None  # where it writes its payload log (a directory or an s3:// URL), None: off


@dataclass(frozen=True)
class LiveModel:
    """The model a command acts on, where its payload log is, and why this one."""

    name: str  # the registered model
    model: str | None  # models:/NAME/VERSION or a model directory; None: name's champion
    payload_log: str | None
    url: str | None  # the server it was read from, if any
    why: str


def _normal(url: str) -> str:
    return url.rstrip("/").replace("://localhost:", "://127.0.0.1:")


def record_server(root: Path, record: ServerRecord) -> Path:
    """Write ``record`` (staged and renamed: a reader sees all of it or nothing); returns its path."""
    folder = Path(root) / SERVERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.pid}.json"
    handle, staged = tempfile.mkstemp(prefix=".server.", suffix=".tmp", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(asdict(record), out)
    os.replace(staged, path)
    return path


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (a parent that has not reaped it) no longer serves.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def running_servers(root: Path) -> list[ServerRecord]:
    """The records of servers still running; a record left by one that died (SIGKILL) is removed."""
    folder = Path(root) / SERVERS_DIR
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = ServerRecord(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            continue
        if process_alive(record.pid):
            records.append(record)
        else:
            path.unlink(missing_ok=True)
    return records


def server_metadata(url: str) -> dict[str, Any]:
    """``GET /metadata`` of a running server; an unreachable one is the user's to fix (one line)."""
    import httpx

    try:
        answer = httpx.get(f"{url.rstrip('/')}/metadata", timeout=5)
        answer.raise_for_status()
        return answer.json()
    except (httpx.HTTPError, ValueError) as error:
        raise FluxoError(f"--url {url}: no fluxo server answers there ({error}); start one with `fluxo serve` "
                         "or give the URL it printed") from None


def _from_server(url: str, record: ServerRecord | None, why: str) -> LiveModel:
    info = server_metadata(url)
    name, version = info.get("model_name"), info.get("model_version")
    if not name:
        raise FluxoError(f"{url}/metadata names no model; is it a fluxo server?")
    from_registry = version is not None and (record is None or record.model is None
                                             or str(record.model).startswith("models:/"))
    model = f"models:/{name}/{version}" if from_registry else (record.model if record else None)
    return LiveModel(str(name), model, record.payload_log if record else None, url,
                     f"{why}: {name} v{version} at {url}")


def choose_live_model(root: Path, url: str | None, named: str | None, by_data: Callable[[], str],
                      url_may_be_down: bool = False) -> LiveModel:
    """The live model, by the order in the module docstring.

    ``named``: the registered model of the dataset a preset or ``--set`` names (None when
    they name none); it also picks among several running servers. ``by_data``: the model of
    ``data/``'s dataset, the last resort. ``url_may_be_down``: a ``url`` that does not answer
    is reported by the caller (``fluxo status``), and the model is chosen as if none was given.
    """
    servers = running_servers(root)
    if url:
        record = next((r for r in servers if _normal(r.url) == _normal(url)), None)
        try:
            return _from_server(url, record, "asked at --url")
        except FluxoError:
            if not url_may_be_down:
                raise
        servers = []
    candidates = [r for r in servers if named is None or r.model_name == named]
    if len(candidates) == 1:
        return _from_server(candidates[0].url, candidates[0], "served by this project")
    if len(candidates) > 1:
        listed = ", ".join(f"{r.model_name} at {r.url}" for r in candidates)
        raise FluxoError(f"{len(candidates)} servers of this project are running ({listed}); "
                         "choose one with --url, or a model with --model")
    if named is not None:
        return LiveModel(named, None, None, None, f"{named}, the dataset the preset or --set names "
                         "(no server of this project serves it now)")
    name = by_data()
    return LiveModel(name, None, None, None,
                     f"{name}, the dataset data/ holds (no server of this project is running; "
                     "--url, --model or --config chooses another)")
