"""Each fuzz target of tests/fuzz/ runs briefly in ``make test`` and for minutes in ``make test-slow``.

A target runs as its own process: libFuzzer ends the process when it stops, crash or not. A
failure shows the input libFuzzer wrote (its bytes, and as text) with the traceback, so the
fix and its regression test (tests/fuzz/test_regressions.py) can start from it.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need

HERE = Path(__file__).resolve().parent
TARGETS = ["fuzz_json.py", "fuzz_v2.py", "fuzz_image.py"]
SHORT_S = 12
LONG_S = 60


def fuzz(script: str, seconds: int, work: Path) -> int:
    """Run one target for ``seconds`` with a fresh corpus in ``work``; the number of inputs it ran."""
    need(importlib.util.find_spec("atheris"), "atheris (the test extra: `make setup`)")
    corpus = work / "corpus"
    corpus.mkdir()
    command = [sys.executable, str(HERE / script), f"-max_total_time={seconds}", "-print_final_stats=1",
               f"-artifact_prefix={work}/", str(corpus)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, errors="replace",
                            timeout=seconds + 120)
    found = sorted(p for p in work.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "slow-unit-")))
    if result.returncode != 0 or found:
        shown = "\n".join(f"{p.name}: {p.read_bytes()[:2000]!r}" for p in found)
        pytest.fail(f"{script} found an input that breaks the property (exit {result.returncode}):\n{shown}\n"
                    f"{result.stdout[-4000:]}{_without_progress(result.stderr)[-4000:]}")  # atheris: traceback on stdout
    runs = re.search(r"stat::number_of_executed_units:\s*(\d+)", result.stderr)
    assert runs, result.stderr[-3000:]
    logging.getLogger(__name__).info("%s: %s inputs in %d s", script, runs.group(1), seconds)  # --log-cli-level=INFO
    return int(runs.group(1))


def _without_progress(log: str) -> str:
    """libFuzzer's log less what buries the traceback: progress lines, the modules traced, the input in hex."""
    noise = re.compile(r"#\d+\s+(NEW|REDUCE|pulse)|INFO: Instrumenting|0x[0-9a-f]{2},")
    return "\n".join(line for line in log.splitlines() if not noise.match(line))


# One target briefly in make test (14 s each); the others, and all three for minutes, in make test-slow.
@pytest.mark.parametrize("script", [pytest.param(script, marks=[] if script == "fuzz_image.py" else pytest.mark.slow)
                                    for script in TARGETS])
def test_fuzz_target_briefly(script: str, tmp_path: Path) -> None:
    runs = fuzz(script, SHORT_S, tmp_path)
    assert runs > 1000, f"{script} ran only {runs} inputs in {SHORT_S} s"


@pytest.mark.slow
@pytest.mark.parametrize("script", TARGETS)
def test_fuzz_target_for_minutes(script: str, tmp_path: Path) -> None:
    runs = fuzz(script, LONG_S, tmp_path)
    assert runs > 10000, f"{script} ran only {runs} inputs in {LONG_S} s"
