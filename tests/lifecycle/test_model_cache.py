"""The served-model cache (pipelines/registry/store.py): checksums recorded at export, checked at each use.

A copy torn by a crash or altered since must be told apart from a whole one, discarded and
fetched again, not fail every start; copies made before checksums existed must still load.
Real model directories (tests/serving_fixtures.py), sealed as export seals them; the local
export is the source, so no MLflow store is needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines.context import RunContext
from pipelines.registry.store import materialize_version
from pipelines.settings import FluxoSettings
from serving import ServingError
from serving.checksums import CHECKSUMS_FILE, damage, read_checksums, seal
from serving.runtime import OnnxModel
from tests.serving_fixtures import build_model_dir

NAME, VERSION = "fluxo", "3"


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """A model directory as export leaves it: its files, then checksums.json over them."""
    model_dir = build_model_dir(tmp_path / "export" / "run1")
    (model_dir / "report.html").write_text("<html>report</html>")
    seal(model_dir)
    return model_dir


@pytest.fixture
def ctx(tmp_path: Path) -> RunContext:
    return RunContext(tmp_path / "project", FluxoSettings(), "", "")


def test_export_records_every_file_and_the_copy_records_its_own(exported: Path, ctx: RunContext) -> None:
    recorded = read_checksums(exported)
    assert sorted(recorded) == ["metadata.json", "model.onnx", "report.html"]
    served = materialize_version(ctx, NAME, VERSION, local=exported)
    copy = read_checksums(served.path)
    assert {k: v for k, v in copy.items() if k != "registry.json"} == recorded
    assert "registry.json" in copy and damage(served.path, copy) is None
    assert not list(served.path.parent.glob(".*")), "no staging folder left behind"


@pytest.mark.parametrize("torn", ["model.onnx", "registry.json", CHECKSUMS_FILE])
def test_a_torn_cache_copy_is_detected_and_replaced(exported: Path, ctx: RunContext, torn: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    served = materialize_version(ctx, NAME, VERSION, local=exported)
    whole = (served.path / torn).read_bytes()
    (served.path / torn).write_bytes(whole[: len(whole) // 2])  # what a crash mid-copy leaves
    with caplog.at_level(logging.WARNING, logger="pipelines.registry.store"):
        again = materialize_version(ctx, NAME, VERSION, local=exported)
    assert f"{served.path} is damaged" in caplog.text and "fetching fluxo v3 again" in caplog.text
    assert (again.path / torn).read_bytes() == whole
    assert damage(again.path, read_checksums(again.path)) is None
    OnnxModel(again.path)  # and it serves
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.registry.store"):
        materialize_version(ctx, NAME, VERSION, local=exported)
    assert "damaged" not in caplog.text, "a whole copy is used as it is"


def test_a_same_size_change_is_caught_too(exported: Path, ctx: RunContext) -> None:
    served = materialize_version(ctx, NAME, VERSION, local=exported)
    onnx_file = served.path / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit: same size, same mtime granularity, other bytes
    onnx_file.write_bytes(bytes(data))
    assert damage(served.path, read_checksums(served.path)) == "model.onnx does not match its recorded sha256"
    again = materialize_version(ctx, NAME, VERSION, local=exported)
    assert (again.path / "model.onnx").read_bytes() == (exported / "model.onnx").read_bytes()


def test_a_damaged_export_is_refused_naming_the_file(exported: Path, ctx: RunContext) -> None:
    (exported / "model.onnx").write_bytes((exported / "model.onnx").read_bytes()[:100])
    with pytest.raises(ServingError, match=r"model\.onnx: its bytes do not match the sha256 recorded"):
        materialize_version(ctx, NAME, VERSION, local=exported)


def test_directories_from_before_checksums_still_load(tmp_path: Path, ctx: RunContext,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    old_export = build_model_dir(tmp_path / "export" / "old")  # no checksums.json
    served = materialize_version(ctx, NAME, VERSION, local=old_export)
    assert damage(served.path, read_checksums(served.path)) is None  # hashed at copy time
    (served.path / CHECKSUMS_FILE).unlink()  # a copy made by an older fluxo
    with caplog.at_level(logging.INFO, logger="pipelines.registry.store"):
        again = materialize_version(ctx, NAME, VERSION, local=old_export)
    assert again.path == served.path and "predates checksums; recording them once" in caplog.text
    assert sorted(read_checksums(again.path)) == ["metadata.json", "model.onnx", "registry.json"]
    assert json.loads((again.path / "registry.json").read_text())["model_version"] == VERSION
