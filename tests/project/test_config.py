from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.settings import load_settings
from pipelines.errors import FluxoError

REPO = Path(__file__).resolve().parents[2]


def test_preset_overrides_defaults_and_set_overrides_preset() -> None:
    settings = load_settings(REPO / "configs" / "mnist1d-gru.yaml", ["train.epochs=3", "model.params.hidden=16"])
    assert settings.data.dataset == "mnist1d"
    assert settings.model.name == "gru"
    assert settings.train.epochs == 3
    assert settings.model.params == {"hidden": 16, "layers": 1}
    assert settings.train.patience == 10  # from the preset
    assert settings.data.val_fraction == 0.2  # the default, untouched


def test_every_preset_loads() -> None:
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert len(presets) >= 4
    for preset in presets:
        load_settings(preset)


def test_environment_is_overridden_by_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXO_TRAIN__EPOCHS", "7")
    assert load_settings().train.epochs == 7
    assert load_settings(None, ["train.epochs=2"]).train.epochs == 2


def test_unknown_key_is_named() -> None:
    with pytest.raises(FluxoError, match="train.epoch"):
        load_settings(None, ["train.epoch=3"])


def test_bad_value_names_field_and_file(tmp_path: Path) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text("train:\n  learning_rate: -1\n")
    with pytest.raises(FluxoError, match=r"bad.yaml.*train.learning_rate"):
        load_settings(preset)


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    preset = tmp_path / "broken.yaml"
    preset.write_text("train: [epochs: 3\n")
    with pytest.raises(FluxoError, match="broken.yaml.*not valid YAML"):
        load_settings(preset)


def test_missing_preset_and_malformed_override() -> None:
    with pytest.raises(FluxoError, match="no such file"):
        load_settings(Path("configs/nope.yaml"))
    with pytest.raises(FluxoError, match="key=value"):
        load_settings(None, ["train.epochs"])


def test_splits_must_leave_training_data() -> None:
    with pytest.raises(FluxoError, match="at least 10%"):
        load_settings(None, ["data.val_fraction=0.5", "data.test_fraction=0.45"])


def test_tracking_uri_defaults_to_sqlite_under_mlflow(tmp_path: Path) -> None:
    assert load_settings().resolved_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"


def test_a_mapping_override_replaces_the_preset_mapping() -> None:
    settings = load_settings(REPO / "configs" / "mnist1d-gru.yaml", ["model.name=cnn1d", "model.params={channels: 8}"])
    assert settings.model.params == {"channels": 8}
