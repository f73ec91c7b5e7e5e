"""User datasets at ingest: image folders and sequence files, every problem the validation knows,
and the guarantee that a failed or interrupted ingest leaves data/ and data.dvc as they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.data import ingest as ingest_module
from pipelines.data import store
from pipelines.data.ingest import ingest
from pipelines.data.store import read_dataset
from pipelines.errors import FluxoError
from tests.conftest import make_settings


def _snapshot(project: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(project)): p.read_bytes() for p in (project / "data").rglob("*") if p.is_file()}
    files["data.dvc"] = (project / "data.dvc").read_bytes()
    return files


def _digit_image(seed: int, size: tuple[int, int], mode: str = "L") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(), mode)


def make_folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("cat", "dog", "fox")) -> Path:
    """PNG and JPEG, grayscale and RGB, mixed sizes: what a user's folder looks like."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = _digit_image(100 * c + i, (20 + i, 30 - i), "RGB" if i % 3 == 0 else "L")
            image.save(root / name / (f"{i:03d}.png" if i % 2 else f"{i:03d}.jpg"))
    return root


def test_image_folder_ingests_with_a_validation_summary(project: Path, settings_for, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pets")
    (folder / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "fox" / "notes.txt").write_text("not an image")
    report = ingest(project, settings_for(f"data.dataset={folder}", "data.image.size=[16,16]").data).report
    dataset = read_dataset(project / "data")
    assert dataset.labels == ["cat", "dog", "fox"]
    assert dataset.input_shape == (3, 16, 16)  # RGB present → 3 channels
    assert dataset.manifest["dtype"] == "uint8" and dataset.manifest["preprocessing"]["resize"] == "resize"
    assert report["samples_found"] == 36 + 1 and report["samples_kept"] == 36
    corrupt = report["checks"]["corrupt"]
    assert corrupt["count"] == 2 and any("broken.jpg" in e for e in corrupt["examples"])
    assert any("notes.txt" in e for e in corrupt["examples"])
    assert report["classes"] == {"cat": 12, "dog": 12, "fox": 12} and report["imbalance_ratio"] == 1.0
    saved = json.loads((project / "data" / "validation.json").read_text())
    assert saved == json.loads(json.dumps(report, sort_keys=True))


def test_corrupt_files_fail_when_the_policy_says_so(project: Path, settings_for, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pets")
    (folder / "cat" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(FluxoError, match=r"1 unreadable, corrupt or non-image files: .*truncated.png.*corrupt=skip"):
        ingest(project, settings_for(f"data.dataset={folder}", "data.validation.corrupt=fail").data)


def test_empty_class_fails_by_default_and_can_be_skipped(project: Path, settings_for, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pets")
    (folder / "owl").mkdir()
    with pytest.raises(FluxoError, match="have no usable sample: owl.*empty_class=skip"):
        ingest(project, settings_for(f"data.dataset={folder}").data)
    report = ingest(project, settings_for(f"data.dataset={folder}", "data.validation.empty_class=skip").data).report
    assert report["checks"]["empty_class"]["examples"] == ["owl"]
    assert read_dataset(project / "data").labels == ["cat", "dog", "fox"]


def test_a_failing_ingest_names_every_planted_problem(project: Path, settings_for, tmp_path: Path) -> None:
    """One run lists everything to fix: the empty classes that fail and the files skipped on the way."""
    ingest(project, settings_for().data)  # the previous dataset, which the failed ingest must leave alone
    before = _snapshot(project)
    folder = make_folder(tmp_path / "pets")
    (folder / "owl").mkdir()  # no files at all
    (folder / "yak").mkdir()  # only files that cannot be used
    (folder / "yak" / "broken.png").write_bytes(np.random.default_rng(0).bytes(300))
    (folder / "yak" / "notes.txt").write_text("not an image")
    (folder / "cat" / "copy.png").write_bytes((folder / "cat" / "001.png").read_bytes())
    with pytest.raises(FluxoError) as failure:
        ingest(project, make_settings(project, f"data.dataset={folder}").data)
    message = str(failure.value)
    assert "validation failed (empty_class)" in message
    assert "2 classes have no usable sample: owl, yak" in message and "data.validation.empty_class=skip" in message
    assert "skipped: 2 unreadable, corrupt or non-image files" in message and "data.validation.corrupt=skip" in message
    assert str(folder / "yak" / "broken.png") in message and str(folder / "yak" / "notes.txt") in message
    assert "skipped: 1 duplicate samples: cat/copy.png (same as cat/001.png)" in message
    assert len(message.splitlines()) == 4  # a header, then one line per problem
    assert failure.value.report["checks"]["corrupt"]["count"] == 2  # every check ran and was recorded
    assert _snapshot(project) == before
    assert not [p.name for p in project.iterdir() if p.name.startswith(".data.")]


def test_a_single_class_cannot_be_trained(project: Path, settings_for, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(FluxoError, match="only one class with samples \\(cat\\)"):
        ingest(project, settings_for(f"data.dataset={folder}").data)


def test_resize_policies_are_applied_and_recorded(project: Path, settings_for, tmp_path: Path) -> None:
    folder = tmp_path / "shapes"
    for c, name in enumerate(("a", "b")):
        (folder / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((10, 40), 200 + 20 * c + i, dtype=np.uint8), "L").save(folder / name / f"{i}.png")
    ingest(project, settings_for(f"data.dataset={folder}", "data.image.size=[20,20]", "data.image.resize=pad").data)
    padded = read_dataset(project / "data").splits["train"].x
    assert padded.shape[1:] == (1, 20, 20)
    assert (padded[:, 0, 0, :] == 0).all() and (padded[:, 0, 10, :] >= 200).all()  # letterboxed, not stretched
    ingest(project, settings_for(f"data.dataset={folder}", "data.image.size=[20,20]", "data.image.resize=crop").data)
    assert (read_dataset(project / "data").splits["train"].x >= 200).all()  # cropped: no padding
    assert read_dataset(project / "data").manifest["preprocessing"]["resize"] == "crop"


def test_duplicates_are_skipped_failed_or_kept_and_leakage_caught(project: Path, settings_for, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pets", per_class=20)
    for i in range(6):  # the same picture filed twice in the same class
        (folder / "cat" / f"copy-{i}.png").write_bytes((folder / "cat" / f"{2 * i + 1:03d}.png").read_bytes())
    report = ingest(project, settings_for(f"data.dataset={folder}").data).report
    assert report["checks"]["duplicates"]["count"] == 6 and report["samples_kept"] == 60
    assert "same as cat/" in report["checks"]["duplicates"]["examples"][0]
    with pytest.raises(FluxoError, match="6 duplicate samples"):
        ingest(project, settings_for(f"data.dataset={folder}", "data.validation.duplicates=fail").data)
    with pytest.raises(FluxoError, match="appear in two splits"):
        ingest(project, settings_for(f"data.dataset={folder}", "data.validation.duplicates=keep").data)
    kept = ingest(project, settings_for(
        f"data.dataset={folder}", "data.validation.duplicates=keep", "data.validation.leakage=report").data).report
    assert kept["samples_kept"] == 66 and kept["checks"]["leakage"]["count"] > 0


def test_imbalance_is_reported_and_can_fail(project: Path, settings_for, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "pets", per_class=12)
    for i in range(12, 40):
        _digit_image(900 + i, (24, 24)).save(folder / "dog" / f"extra-{i}.png")
    report = ingest(project, settings_for(f"data.dataset={folder}").data).report
    assert report["imbalance_ratio"] == pytest.approx(40 / 12, abs=1e-3)
    with pytest.raises(FluxoError, match="imbalance 3.3 .*'dog' 40 vs 'cat' 12.*train.balance=weighted"):
        ingest(project, settings_for(f"data.dataset={folder}", "data.validation.max_imbalance=3").data)


def test_same_folder_same_version(project: Path, settings_for, tmp_path: Path) -> None:
    from pipelines.data.ingest import version

    settings = settings_for(f"data.dataset={make_folder(tmp_path / 'pets')}")
    ingest(project, settings.data)
    first = version(project, settings.data).md5
    ingest(project, settings.data)
    assert version(project, settings.data).md5 == first


def _sequences_csv(path: Path, rows: int = 60) -> Path:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, 12)), columns=[f"t{i}" for i in range(12)])
    frame["label"] = np.where(np.arange(rows) % 2, "up", "down")
    frame.to_csv(path, index=False)
    return path


def test_sequence_csv_with_string_labels_and_variable_lengths(project: Path, settings_for, tmp_path: Path) -> None:
    path = _sequences_csv(tmp_path / "walk.csv")
    frame = pd.read_csv(path)
    frame.loc[::3, ["t9", "t10", "t11"]] = np.nan  # trailing empty cells: shorter sequences
    frame.to_csv(path, index=False)
    ingest(project, settings_for(f"data.dataset={path}").data)
    dataset = read_dataset(project / "data")
    assert dataset.kind == "sequence" and dataset.labels == ["down", "up"] and dataset.input_shape == (1, 12)
    lengths = np.concatenate([dataset.splits[s].lengths for s in ("train", "val", "test")])
    assert set(lengths.tolist()) == {9, 12}
    assert dataset.manifest["variable_length"] is True


def test_sequence_problems_name_the_rows_and_columns(project: Path, settings_for, tmp_path: Path) -> None:
    path = _sequences_csv(tmp_path / "walk.csv")
    frame = pd.read_csv(path)
    frame.loc[7, "t3"] = np.nan  # a hole in the middle is a real NaN, not padding
    frame.to_csv(path, index=False)
    with pytest.raises(FluxoError, match="NaN or Inf: row 7"):
        ingest(project, settings_for(f"data.dataset={path}").data)
    report = ingest(project, settings_for(f"data.dataset={path}", "data.validation.non_finite=skip").data).report
    assert report["checks"]["non_finite"]["examples"] == ["row 7"] and report["samples_kept"] == 59
    with pytest.raises(FluxoError, match="no label column 'target'; columns are t0, t1.*sequence.label_column=label"):
        ingest(project, settings_for(f"data.dataset={path}", "data.sequence.label_column=target").data)
    frame.loc[4, "label"] = None
    frame.to_csv(path, index=False)
    with pytest.raises(FluxoError, match="1 samples have no 'label' value: row 4; fill or remove"):
        ingest(project, settings_for(f"data.dataset={path}").data)
    (tmp_path / "bad.txt").write_text("x")
    with pytest.raises(FluxoError, match="unsupported file type '.txt'"):
        ingest(project, settings_for(f"data.dataset={tmp_path / 'bad.txt'}").data)


def test_every_problem_of_a_sequence_file_is_named_in_one_failure(project: Path, settings_for, tmp_path: Path) -> None:
    path = _sequences_csv(tmp_path / "walk.csv")
    frame = pd.read_csv(path)
    frame["label"] = np.where(np.arange(60) % 4, "up", "down")  # 45 up, 15 down
    frame.loc[[1, 2], "t5"] = np.nan  # holes in two "up" rows
    frame.loc[3, "label"] = None
    frame.to_csv(path, index=False)
    with pytest.raises(FluxoError) as failure:
        ingest(project, settings_for(f"data.dataset={path}", "data.validation.max_imbalance=2").data)
    message = str(failure.value)
    assert "validation failed (missing_label, non_finite, max_imbalance)" in message
    assert "2 samples contain NaN or Inf: row 1, row 2; fix the data, or set data.validation.non_finite=skip" in message
    assert "1 samples have no 'label' value: row 3" in message
    assert "class imbalance 2.8 ('up' 42 vs 'down' 15) exceeds data.validation.max_imbalance=2" in message
    assert not (project / "data").exists()


def test_npz_with_x_and_y_takes_the_targets_from_y(
    project: Path, settings_for, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32)
    np.savez(tmp_path / "xy.npz", x=x, y=np.arange(40) % 2)
    with caplog.at_level("INFO", logger="pipelines.data.sequence_file"):
        ingest(project, settings_for(f"data.dataset={tmp_path / 'xy.npz'}").data)
    assert "taking the targets from 'y'" in caplog.text
    dataset = read_dataset(project / "data")
    assert dataset.labels == ["0", "1"] and dataset.input_shape == (1, 16)
    assert sum(len(split.y) for split in dataset.splits.values()) == 40


def test_npz_without_the_label_array_names_the_arrays_and_the_setting(
    project: Path, settings_for, tmp_path: Path
) -> None:
    x = np.random.default_rng(3).normal(size=(40, 16)).astype(np.float32)
    np.savez(tmp_path / "target.npz", x=x, target=np.arange(40) % 2)
    with pytest.raises(FluxoError, match=r"target.npz: no label array 'label'; arrays are x, target; "
                       r"set data.sequence.label_column .*data.sequence.label_column=target"):
        ingest(project, settings_for(f"data.dataset={tmp_path / 'target.npz'}").data)
    np.savez(tmp_path / "both.npz", x=x, y=np.arange(40) % 2, target=np.arange(40) % 2)  # ambiguous: no guess
    with pytest.raises(FluxoError, match="arrays are x, y, target; set data.sequence.label_column"):
        ingest(project, settings_for(f"data.dataset={tmp_path / 'both.npz'}").data)
    ingest(project, settings_for(f"data.dataset={tmp_path / 'target.npz'}", "data.sequence.label_column=target").data)
    assert read_dataset(project / "data").labels == ["0", "1"]


def test_npz_and_parquet_sequences(project: Path, settings_for, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 2, 16)).astype(np.float32)
    lengths = rng.integers(4, 17, size=40)
    np.savez(tmp_path / "ecg.npz", x=x, label=np.arange(40) % 4, lengths=lengths)
    ingest(project, settings_for(f"data.dataset={tmp_path / 'ecg.npz'}").data)
    dataset = read_dataset(project / "data")
    assert dataset.input_shape == (2, 16) and len(dataset.labels) == 4 and dataset.manifest["variable_length"]

    frame = pd.DataFrame({"values": [rng.normal(size=int(n)).tolist() for n in lengths], "label": np.arange(40) % 2})
    frame.to_parquet(tmp_path / "walk.parquet")
    ingest(project, settings_for(f"data.dataset={tmp_path / 'walk.parquet'}").data)
    dataset = read_dataset(project / "data")
    assert dataset.input_shape == (1, int(lengths.max())) and dataset.labels == ["0", "1"]

    regression = pd.DataFrame(rng.normal(size=(40, 8)), columns=[f"t{i}" for i in range(8)]).assign(label=rng.normal(size=40))
    regression.to_csv(tmp_path / "price.csv", index=False)
    ingest(project, settings_for(f"data.dataset={tmp_path / 'price.csv'}").data)
    assert read_dataset(project / "data").task == "regression"


@pytest.mark.parametrize("failure", ["validation", "dvc", "interrupt"])
def test_failed_or_interrupted_ingest_leaves_data_and_dvc_file_untouched(
    project: Path, settings_for, tmp_path: Path, monkeypatch, failure: str
) -> None:
    from pipelines.data.ingest import version

    settings = settings_for()
    ingest(project, settings.data)
    version(project, settings.data)
    before = _snapshot(project)
    folder = make_folder(tmp_path / "pets")
    changed = settings_for(f"data.dataset={folder}")
    if failure == "validation":
        (folder / "owl").mkdir()  # empty class → fail
        expected: type[BaseException] = FluxoError
    elif failure == "dvc":
        def broken_dvc(*args, **kwargs):
            (project / "data.dvc").write_text("half-written")
            raise FluxoError("remote unreachable")

        monkeypatch.setattr(ingest_module, "version_data", broken_dvc)
        expected = FluxoError
    else:
        real = store._write_split
        calls = {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(store, "_write_split", interrupted)
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        ingest(project, changed.data)
    assert _snapshot(project) == before
    leftovers = [p.name for p in project.iterdir() if p.name.startswith(".data.")]
    assert not leftovers, leftovers


def _trend_csv(path: Path, rows: int = 200) -> Path:
    """Sequences a model can learn: "up" rises, "down" falls, under noise; every other row is two steps shorter."""
    rng = np.random.default_rng(0)
    rising = np.arange(rows) % 2 == 1
    trend = np.where(rising, 1.0, -1.0)[:, None] * np.linspace(-1.5, 1.5, 12)[None, :]
    frame = pd.DataFrame(trend + rng.normal(scale=0.5, size=(rows, 12)), columns=[f"t{i}" for i in range(12)])
    frame["label"] = np.where(rising, "up", "down")
    frame.loc[::2, ["t10", "t11"]] = np.nan
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("model", ["gru", "cnn1d"])
def test_variable_length_sequences_train(project: Path, settings_for, tmp_path: Path, model: str) -> None:
    from pipelines.data.versioning import DataVersion
    from pipelines.train.run import train_and_evaluate
    from pipelines.train.tracker import NullTracker

    path = _trend_csv(tmp_path / "trend.csv")
    settings = settings_for(f"data.dataset={path}", f"model.name={model}", "model.params={}", "train.epochs=5")
    ingest(project, settings.data)
    dataset = read_dataset(project / "data")
    assert set(dataset.splits["test"].lengths.tolist()) == {10, 12}  # both lengths reach the test split
    _, metrics, _, _ = train_and_evaluate(project, settings, DataVersion("x", 0, 0, project / "data.dvc", 0), NullTracker())
    # Chance is 0.5 (a learning rate of 1e-9 scores exactly that); both models reach 1.0 on seeds 0-4 in five epochs.
    assert metrics["test_accuracy"] >= 0.9, metrics
