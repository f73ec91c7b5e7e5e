"""The model directory: the whole contract between export and serving, typed in one place.

A model directory holds::

    model.onnx      the graph: one float32 input ``input`` (batch first), one output ``logits``
    model.int8.onnx optional, also model.fp16.onnx: a lower-precision variant export's gate kept
    metadata.json   what the model is (ModelMetadata): written once, by the export step
    registry.json   where it sits in the model registry (RegistryEntry): written by the publisher
                    when it materialises a registered version; absent for a plain export
    checksums.json  sha256 of each file (serving/checksums.py): written last by export, and by
                    the publisher for its copy; absent in directories exported before it existed

``metadata.json`` is part of the artifact that is logged to MLflow and registered, so it
cannot know the version number the registry gives it later; that number travels in
``registry.json`` beside it. Export, the runtime, the publisher, batch prediction and
``fluxo serve`` all read the directory through :func:`read_model_dir`, so none of them
spells file names, tensor names or field names on its own. This module imports only
pydantic (and, via serving/checksums.py, the standard library's hashing): the training side
uses it without onnxruntime, the service without torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving import ServingError
from serving.checksums import (
    CHECKSUMS_FILE, copy_synced, digest, fsync_dir, read_checksums, write_checksums, write_synced,
)

MODEL_FILE = "model.onnx"
VARIANTS = ("fp32", "int8", "fp16")
"""Precisions a model directory may hold: fp32 is ``model.onnx``; the others ``model.<variant>.onnx``,
present only when export's gate kept them (pipelines/export/variants.py)."""
METADATA_FILE = "metadata.json"
REPORT_FILE = "report.html"
"""Optional: the model's report (pipelines/report/html.py), served at ``GET /report``."""
REGISTRY_FILE = "registry.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
LENGTHS_NAME = "lengths"
"""The second input of a variable-length RNN's graph: int64 (batch,), each sequence's valid steps."""
FORMAT_VERSION = 1
FIX = "re-run the export step (or `fluxo serve`) to rewrite the model directory"
# What two models must share to stand in for each other: the gate refuses a champion with
# another contract, and a server refuses such a challenger beside its champion.
CONTRACT_FIELDS = ("kind", "input_shape", "input_dtype", "labels", "image", "columns")


class Normalization(BaseModel):
    """The standardisation inside the graph: raw dataset values go in, the graph subtracts and divides
    (one number, or one per channel of a sequence whose channels are on different scales)."""

    mean: float | list[float]
    std: float | list[float]


class TableColumn(BaseModel):
    """One column of a table model's input, in the graph's input order.

    The graph takes one float32 per column: a number column's value (NaN for an empty
    cell), a category column's index in ``categories`` (NaN for an empty cell, or an unseen
    value under ``unseen_category: ignore``). Clients send the values themselves (a category
    as its text); serving/table_rows.py turns rows into that tensor.
    """

    model_config = ConfigDict(extra="ignore")

    name: str
    type: Literal["number", "category"]
    categories: list[str] | None = Field(None, description="A category column's vocabulary, in code order.")
    missing: int = Field(0, description="Empty cells the column had at ingest (the graph adds an indicator when > 0).")
    median: float | None = Field(None, description="Training median an empty cell takes (number columns).")
    center: float | None = Field(None, description="Subtracted after imputation (mean, or median for robust scaling).")
    scale: float | None = Field(None, description="Divided by after centring (standard deviation, or IQR).")


class TableInput(BaseModel):
    """A table model's input: its columns and what the service does with an empty or unseen value."""

    model_config = ConfigDict(extra="ignore")

    columns: list[TableColumn]
    missing: Literal["refuse", "impute"] = Field(
        "impute", description="A null value: imputed inside the graph (impute) or a 400 naming the column (refuse).")
    unseen_category: Literal["ignore", "refuse"] = Field(
        "ignore", description="A category value training never saw: encoded as none and counted, or a 400.")
    scaling: Literal["standard", "robust"] = Field("standard", description="How number columns are scaled.")

    def names(self) -> list[str]:
        return [column.name for column in self.columns]


class Preprocessing(BaseModel):
    """How a client's values become the graph's input."""

    model_config = ConfigDict(extra="ignore")

    normalize: Normalization | None = Field(None, description="Standardisation applied inside the graph.")
    in_graph: bool = Field(True, description="True: clients send raw values, normalisation is part of the graph.")
    image: dict[str, Any] | None = Field(
        None, description="Upload recipe for /predict/image (serving.images.ImageSpec); None: no uploads."
    )
    upload_background: Literal["light", "dark"] | None = Field(
        None, description="The background uploads are drawn on, as the training images were: an upload of the "
        "other polarity (white ink on black for a dark-on-light recipe) is flipped before the recipe; None: no "
        "check (models exported before it). Not part of the input contract: the tensors do not change.",
    )


class ModelMetadata(BaseModel):
    """``metadata.json``: the identity and input contract of one exported model."""

    model_config = ConfigDict(extra="ignore")

    format_version: int = Field(FORMAT_VERSION, description="Version of this layout.")
    model_name: str = Field("model", description="Registry name the model joins, e.g. fluxo-digits.")
    architecture: str | None = Field(None, description="Registry name of the network (models/).")
    task: Literal["multiclass", "binary", "regression"] = Field(
        "multiclass", description="multiclass/binary: the outputs are logits over labels (softmax); regression: "
        "one output per instance, the predicted value in the target's units (labels is [the target's name]).")
    run_id: str | None = Field(None, description="MLflow run the model was trained in.")
    dataset: str | None = Field(None, description="Dataset the run was trained on (its manifest name).")
    kind: Literal["image", "sequence", "table"] | None = Field(None, description="Input kind.")
    data_version: str | None = Field(None, description="DVC md5 of the training data.")
    input_name: str = Field(INPUT_NAME, description="Graph input name.")
    output_name: str = Field(OUTPUT_NAME, description="Graph output name.")
    input_shape: list[int] = Field(None, validate_default=True, description="One instance's shape (no batch axis).")
    input_dtype: str = Field("float32", description="Element type the service feeds.")
    labels: list[str] = Field(None, validate_default=True, description="Class names, in logit order.")
    preprocessing: Preprocessing = Field(default_factory=Preprocessing)
    test_metrics: dict[str, float] = Field(default_factory=dict, description="The run's test metrics.")
    onnx_opset: int | None = Field(None, description="ONNX opset of the graph.")
    variable_length: bool = Field(False, description="Sequences of varying length, served padded.")
    takes_lengths: bool = Field(
        False, description="The graph takes a second input, lengths (a recurrent model on variable-length data): "
        "instances may be shorter than input_shape's last dimension and each is read to its own end, as in training.",
    )
    served_test_accuracy: float | None = Field(None, description="Test accuracy of the graph as served.")
    parity: dict[str, Any] | None = Field(None, description="The ONNX-vs-PyTorch parity report.")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Each lower-precision variant export tried (int8, fp16) and the gate's "
        "decision: kept, reason, test accuracy, accuracy drop, latency at batch 1 and 32, speedup, provider.",
    )
    model_version: str | None = Field(
        None, description="Only in directories written before registry.json existed; read, never written."
    )
    table: TableInput | None = Field(
        None, description="A table model's columns (names, order, types, vocabularies, training statistics) and "
        "its policies for empty and unseen values; None for images and sequences.",
    )
    example_instance: list[Any] | dict[str, Any] | None = Field(
        None, description="One held-out test instance, raw values (a sequence to its own end): the request "
        "`fluxo serve` prints to paste. Absent for inputs too large to paste (and in older directories).",
    )

    @field_validator("input_shape", mode="before")
    @classmethod
    def _positive_dims(cls, value: Any) -> Any:
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
        ):
            raise ValueError(f"input_shape must be a non-empty list of positive integers, got {value!r}")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _string_labels(cls, value: Any) -> Any:
        if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
            raise ValueError(f"labels must be a non-empty list of strings, got {value!r}")
        return value

    @field_validator("input_dtype")
    @classmethod
    def _float32_only(cls, value: str) -> str:
        if value != "float32":
            raise ValueError(f"input_dtype {value!r} is not supported, the service feeds float32")
        return value

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return None if value is None else str(value)

    def input_contract(self) -> dict[str, Any]:
        """The :data:`CONTRACT_FIELDS`: what a client (and a challenger) must agree with."""
        columns = None if self.table is None else [
            {"name": c.name, "type": c.type, "categories": c.categories} for c in self.table.columns]
        values = {"kind": self.kind, "input_shape": list(self.input_shape), "input_dtype": self.input_dtype,
                  "labels": list(self.labels), "image": self.preprocessing.image, "columns": columns}
        return {field: values[field] for field in CONTRACT_FIELDS}


def variant_file(variant: str) -> str:
    """The file of ``variant`` in a model directory."""
    return MODEL_FILE if variant == "fp32" else f"model.{variant}.onnx"


def contract_mismatch(reference: Mapping[str, Any], other: Mapping[str, Any]) -> str | None:
    """Why ``other`` cannot stand in for ``reference`` (the first :data:`CONTRACT_FIELDS` that differs), or None.

    Both are mappings holding the fields, e.g. :meth:`ModelMetadata.input_contract` or the
    service's ``/metadata`` info (where ``image`` is the resolved upload recipe).
    """
    for key in CONTRACT_FIELDS:
        if reference.get(key) != other.get(key):
            return f"its {key} is {other.get(key)!r}, the champion's is {reference.get(key)!r}"
    return None


class RegistryEntry(BaseModel):
    """``registry.json``: the registry version a materialised model directory is."""

    model_config = ConfigDict(extra="ignore")

    model_name: str
    model_version: str
    alias: str | None = None

    @field_validator("model_version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value)


class ModelDir(BaseModel):
    """A model directory as read: its path, what the model is, and which registry version (if any)."""

    path: Path
    metadata: ModelMetadata
    registry: RegistryEntry | None = None

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def version(self) -> str | None:
        """The registry version; None for a plain export that was never registered."""
        return self.registry.model_version if self.registry else self.metadata.model_version

    def as_dict(self) -> dict[str, Any]:
        """The metadata as the service reads it: every field, with the registry's version folded in."""
        data = self.metadata.model_dump(mode="json")
        data["model_version"] = self.version
        if self.registry is not None:
            data["model_name"] = self.registry.model_name
        return data


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ServingError(f"{path}: no such file; a model directory needs {MODEL_FILE} and {METADATA_FILE}; {FIX}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ServingError(f"{path}: not valid JSON ({error}); {FIX}") from error
    if not isinstance(data, dict):
        raise ServingError(f"{path}: expected a JSON object, got {type(data).__name__}; {FIX}")
    return data


def _problems(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        field = ".".join(str(p) for p in item["loc"])
        parts.append(message if message.startswith(field) else f"{field}: {message}")
    return "; ".join(parts)


def read_metadata(model_dir: Path | str) -> ModelMetadata:
    """Read and check ``metadata.json``; a broken file names itself, the field and the fix."""
    path = Path(model_dir) / METADATA_FILE
    try:
        return ModelMetadata.model_validate(_read_json(path))
    except ValidationError as error:
        raise ServingError(f"{path}: {_problems(error)}; {FIX}") from None


def read_registry(model_dir: Path | str) -> RegistryEntry | None:
    """``registry.json`` when the directory is a materialised registry version, else None."""
    path = Path(model_dir) / REGISTRY_FILE
    if not path.is_file():
        return None
    try:
        return RegistryEntry.model_validate(_read_json(path))
    except ValidationError as error:
        raise ServingError(f"{path}: {_problems(error)}; {FIX}") from None


def is_model_dir(path: Path | str) -> bool:
    """True when ``path`` holds both files a model directory needs."""
    path = Path(path)
    return (path / MODEL_FILE).is_file() and (path / METADATA_FILE).is_file()


def read_model_dir(path: Path | str) -> ModelDir:
    """The model directory at ``path``, checked: both files present, metadata (and registry entry) valid."""
    path = Path(path)
    if not path.is_dir():
        raise ServingError(f"model directory {path}: no such directory; {FIX}")
    metadata = read_metadata(path)
    if not (path / MODEL_FILE).is_file():
        raise ServingError(f"{path / MODEL_FILE}: no such file; a model directory needs {MODEL_FILE} and {METADATA_FILE}; {FIX}")
    return ModelDir(path=path, metadata=metadata, registry=read_registry(path))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_metadata(staging: Path, metadata: ModelMetadata) -> None:
    """The one writer of ``metadata.json`` (the export step, into its staging directory)."""
    _write_json(Path(staging) / METADATA_FILE, metadata.model_dump(mode="json", exclude={"model_version"}))


def replace_dir(staging: Path, target: Path) -> Path:
    """Move a complete ``staging`` directory to ``target``, so readers see the old or the new, never half.

    ``rename`` cannot replace a non-empty directory, so the old one is first renamed aside
    (one atomic step each) and removed after the new one is in place.
    """
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)  # the rename itself survives a crash
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def staging_dir(target: Path) -> Path:
    """A fresh directory beside ``target`` (same file system, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))


def materialize(source: Path | str, target: Path | str, entry: RegistryEntry) -> ModelDir:
    """Copy a model directory (a local export or a downloaded artifact) to ``target`` as registry ``entry``.

    The copy is staged, every file fsynced, and renamed into place; ``metadata.json`` is copied
    byte for byte and the registry version goes into ``registry.json`` beside it. Each file is
    hashed as it is copied: when the source records checksums (an export since they exist) a
    file that differs is a ServingError naming it, and the copy records its own (serving/checksums.py),
    so the model cache tells a copy torn by a crash from a whole one at its next use.
    """
    source, target = Path(source), Path(target)
    read_model_dir(source)
    recorded = read_checksums(source) or {}
    names = [name for name in (MODEL_FILE, METADATA_FILE, REPORT_FILE, *(variant_file(v) for v in VARIANTS[1:]))
             if (source / name).is_file()]  # the optional files travel too
    staging = staging_dir(target)
    try:
        digests = {name: copy_synced(source / name, staging / name) for name in names}
        for name, value in digests.items():
            if recorded.get(name, value) != value:
                raise ServingError(f"{source / name}: its bytes do not match the sha256 recorded in "
                                   f"{source / CHECKSUMS_FILE}: the model directory is damaged; {FIX}")
        write_synced(staging / REGISTRY_FILE, json.dumps(entry.model_dump(mode="json"), indent=2) + "\n")
        digests[REGISTRY_FILE] = digest(staging / REGISTRY_FILE)
        write_checksums(staging, digests)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_model_dir(target)


__all__ = [
    "CONTRACT_FIELDS", "FIX", "INPUT_NAME", "LENGTHS_NAME", "METADATA_FILE", "MODEL_FILE", "OUTPUT_NAME", "REGISTRY_FILE",
    "REPORT_FILE",
    "ModelDir", "ModelMetadata", "Preprocessing", "Normalization", "RegistryEntry",
    "contract_mismatch", "is_model_dir", "materialize", "read_metadata", "read_model_dir", "read_registry",
    "replace_dir", "staging_dir", "write_metadata",
]
