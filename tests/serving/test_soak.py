"""bench/soak.py, short: mixed good, bad and huge traffic with hot reloads and the payload log on.

The ten-minute run is a benchmark (its figures are in serving/README.md); this runs the same
script for a minute and a half on a small model, as a user would run it, and holds it to the same
verdict: no 5xx, no transport error, no failed reload, every answered prediction's record in the log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving_fixtures import build_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_short_soak_passes(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "model")
    out = tmp_path / "soak.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--model", str(model_dir),
                          "--minutes", "1.5", "--reload-every", "20", "--clients", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    result = json.loads(out.read_text()) if out.exists() else None
    assert run.returncode == 0, (result, run.stdout[-3000:], run.stderr[-3000:])
    assert result["passed"] and result["5xx"] == 0 and result["records_missing"] == 0
    assert result["reloads_done"] >= 3 and result["reloads_failed_metric"] == 0
    answered = {kind: statuses.get("200", 0) for kind, statuses in result["statuses"].items()}
    assert all(answered[kind] > 0 for kind in ("predict", "v2 json", "v2 binary", "image")), answered
    assert result["statuses"]["cross-site"] == {"403": result["statuses"]["cross-site"]["403"]}
    assert set(result["statuses"]["many huge images"]) <= {"413", "429"}
