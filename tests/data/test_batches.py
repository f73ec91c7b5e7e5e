"""Batches for training: resident or streamed from memory-mapped shards, class balancing, k-fold splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data.sources import RawDataset
from pipelines.data.split import stratified_split
from pipelines.data.store import Split, read_dataset, write_dataset
from pipelines.errors import FluxoError
from pipelines.train.batches import ResidentBatches, StreamingBatches, batches_for

CPU = torch.device("cpu")


def _sharded(tmp_path: Path, n: int = 1000, shard_size: int = 128) -> Split:
    x = np.arange(n, dtype=np.uint8).repeat(4).reshape(n, 1, 2, 2)  # sample i holds the value i % 256
    y = np.arange(n) % 5
    raw = RawDataset("counting", "image", x, y.astype(np.int64), [str(c) for c in range(5)])
    everything = np.arange(n)
    write_dataset(raw, {"train": everything, "val": everything[:10], "test": everything[:10]}, tmp_path / "data",
                  {"seed": 0}, shard_size=shard_size)
    return read_dataset(tmp_path / "data").splits["train"]


def test_streaming_visits_every_sample_once_per_epoch_in_a_new_order(tmp_path: Path) -> None:
    split = _sharded(tmp_path)
    assert len(split.shards) == 8 and isinstance(split.shards[0], np.memmap)
    stream = StreamingBatches(split, batch_size=64, device=CPU, seed=0, block=50, window=3)
    orders = []
    for _ in range(2):
        seen_x, seen_y = [], []
        for batch in stream.epoch():
            assert batch.x.dtype == torch.float32 and len(batch.y) <= 64
            seen_x.append(batch.x[:, 0, 0, 0])
            seen_y.append(batch.y)
        x, y = torch.cat(seen_x), torch.cat(seen_y)
        assert len(x) == 1000
        # every sample exactly once, and each sample still paired with its own label
        assert sorted(x.tolist()) == sorted((np.arange(1000) % 256).astype(float).tolist())
        orders.append(y)
    assert not torch.equal(orders[0], orders[1])
    in_order = torch.cat([b.y for b in stream.chunks(100)])
    assert torch.equal(in_order, torch.as_tensor(np.arange(1000) % 5))


def test_resident_and_streamed_data_give_the_same_evaluation_batches(tmp_path: Path) -> None:
    split = _sharded(tmp_path)
    resident = torch.cat([b.x for b in ResidentBatches(split, 64, CPU).chunks(100)])
    streamed = torch.cat([b.x for b in StreamingBatches(split, 64, CPU, block=70).chunks(100)])
    assert torch.equal(resident, streamed)


def test_batches_for_streams_above_the_resident_limit(tmp_path: Path) -> None:
    split = _sharded(tmp_path)
    assert isinstance(batches_for(split, 32, CPU, 0, resident_limit_mb=1), ResidentBatches)
    assert isinstance(batches_for(split, 32, CPU, 0, resident_limit_mb=0), StreamingBatches)
    with pytest.raises(FluxoError, match="train.balance=weighted needs the data resident"):
        batches_for(split, 32, CPU, 0, resident_limit_mb=0, balance="weighted")


@pytest.mark.parametrize("balance", ["weighted", "oversample"])
def test_class_balancing_evens_out_a_skewed_split(balance: str) -> None:
    y = np.array([0] * 900 + [1] * 90 + [2] * 10)
    split = Split([np.zeros((1000, 1, 2), dtype=np.float32)], y)
    batches = ResidentBatches(split, 100, CPU, seed=0, balance=balance)
    counts = np.bincount(torch.cat([b.y for b in batches.epoch()]).numpy(), minlength=3)
    if balance == "oversample":
        assert counts.tolist() == [900, 900, 900]
    else:
        assert counts.sum() == 1000 and counts.min() > 250


def test_k_fold_validation_partitions_train_plus_val() -> None:
    y = np.arange(500) % 5
    candidates = np.arange(500)
    folds = [stratified_split(y, candidates, 0.2, 0.2, seed=0, folds=4, fold=k) for k in range(4)]
    test = folds[0]["test"]
    assert all(np.array_equal(f["test"], test) for f in folds)  # the test split never moves
    vals = np.concatenate([f["val"] for f in folds])
    assert sorted(vals.tolist()) == sorted(set(candidates) - set(test.tolist()))
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and len(f["val"]) == 100
        assert np.bincount(y[f["val"]]).tolist() == [20] * 5


def test_split_too_small_for_stratification_is_explained() -> None:
    y = np.array([0] * 30 + [1])
    with pytest.raises(FluxoError, match="class index 1 has 1 samples"):
        stratified_split(y, np.arange(31), 0.2, 0.2, seed=0)
