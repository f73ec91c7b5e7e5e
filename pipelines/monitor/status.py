"""Where the last drift verdict of a model is kept: read by the service, written by ``fluxo monitor``.

Light on purpose (no numpy): ``fluxo serve`` imports it to tell the server the path.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

STATUS_FILE = "drift.json"


def status_path(root: Path, name: str) -> Path:
    """Where the last verdict for ``name`` is kept; ``fluxo serve`` points the service at it (FLUXO_DRIFT_STATUS)."""
    return Path(root) / ".fluxo" / "monitor" / name / STATUS_FILE


def write_status(root: Path, name: str, summary: dict[str, Any]) -> Path:
    """The verdict as JSON, replaced atomically (the service reads it while it is rewritten)."""
    path = status_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".drift-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump({**summary, "checked_at": datetime.now().astimezone().isoformat(timespec="seconds")}, out, indent=2)
    os.replace(tmp, path)
    return path
