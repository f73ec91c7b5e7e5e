"""Where training batches come from: tensors resident on the device, or shards streamed from disk.

Resident data keeps its stored dtype on the device (uint8 images take a quarter of
float32's memory) and is cast per batch. Streaming reads contiguous blocks of the
memory-mapped shards in shuffled order, shuffles within a window of blocks, and
prefetches on a background thread, so an epoch over a dataset larger than RAM
touches each byte once and never holds more than a few blocks.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipelines.data.store import Split
from pipelines.errors import FluxoError


@dataclass
class Batch:
    x: torch.Tensor  # float32 on the training device
    y: torch.Tensor
    lengths: torch.Tensor | None = None


def _targets(y: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(y, dtype=torch.long if np.issubdtype(y.dtype, np.integer) else torch.float32)


def epoch_order(
    y: torch.Tensor, generator: torch.Generator, balance: str = "none"
) -> torch.Tensor:
    """Sample indices for one epoch: a permutation, or class-balanced draws.

    ``weighted`` draws n samples with probability inversely proportional to their
    class frequency; ``oversample`` repeats each class up to the largest one's count.
    """
    n = len(y)
    if balance == "none":
        return torch.randperm(n, generator=generator)
    counts = torch.bincount(y.cpu())
    if balance == "weighted":
        weights = (1.0 / counts.clamp(min=1).double())[y.cpu()]
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    target = int(counts.max())
    parts = []
    for label in torch.nonzero(counts).flatten():
        members = torch.nonzero(y.cpu() == label).flatten()
        repeats = -(-target // len(members))
        drawn = torch.cat([members[torch.randperm(len(members), generator=generator)] for _ in range(repeats)])
        parts.append(drawn[:target])
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=generator)]


class ResidentBatches:
    """The whole split on the training device."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        balance: str = "none",
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.shard = shard
        self.x = torch.from_numpy(np.array(split.x)).to(device)  # a copy: memory maps are read-only
        self.y = _targets(split.y).to(device)
        self.lengths = None if split.lengths is None else torch.as_tensor(split.lengths).to(device)
        self.batch_size = batch_size
        self.balance = balance
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.y)

    def rng_state(self) -> torch.Tensor:
        """The state the next epoch's order is drawn from; saved so a resumed epoch replays it."""
        return self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def _batch(self, index: torch.Tensor | slice) -> Batch:
        lengths = None if self.lengths is None else self.lengths[index]
        return Batch(self.x[index].float(), self.y[index], lengths)

    def epoch(self) -> Iterator[Batch]:
        order = epoch_order(self.y, self.generator, self.balance).to(self.x.device)
        rank, world = self.shard
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if world > 1:
                if len(batch) < world:
                    break  # every rank must take part in every step, or the gradient all-reduce hangs
                batch = batch[rank::world]  # this rank's slice of the global batch
            yield self._batch(batch)

    def chunks(self, size: int = 1024) -> Iterator[Batch]:
        for start in range(0, len(self.y), size):
            yield self._batch(slice(start, start + size))


class StreamingBatches:
    """Memory-mapped shards read block by block in shuffled order, prefetched on a thread."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        block: int = 4096,
        window: int = 8,
        prefetch: int = 4,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.shard = shard
        self.split = split
        self.batch_size = batch_size
        self.device = device
        self.block = block
        self.window = window
        self.prefetch = prefetch
        self.rng = np.random.default_rng(seed)
        self.offsets = np.cumsum([0] + [len(s) for s in split.shards])

    def __len__(self) -> int:
        return len(self.split)

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def _blocks(self, shuffle: bool) -> list[tuple[int, int, int]]:
        blocks = [
            (number, start, min(start + self.block, len(shard)))
            for number, shard in enumerate(self.split.shards)
            for start in range(0, len(shard), self.block)
        ]
        if shuffle:
            self.rng.shuffle(blocks)
        return blocks

    def _read(self, blocks: list[tuple[int, int, int]], shuffle: bool) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Host-side: a window of blocks at a time, shuffled within the window."""
        for first in range(0, len(blocks), self.window):
            group = blocks[first : first + self.window]
            x = np.concatenate([np.asarray(self.split.shards[n][a:b]) for n, a, b in group])
            rows = np.concatenate([np.arange(a, b) + self.offsets[n] for n, a, b in group])
            if shuffle:
                permutation = self.rng.permutation(len(rows))
                x, rows = x[permutation], rows[permutation]
            lengths = None if self.split.lengths is None else self.split.lengths[rows]
            yield x, self.split.y[rows], lengths

    def _iterate(self, shuffle: bool, size: int) -> Iterator[Batch]:
        source = self._read(self._blocks(shuffle), shuffle)
        pending: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()

        def produce() -> None:
            try:
                for item in source:
                    pending.put(item)
            except BaseException as error:  # surfaced in the consumer
                pending.put(error)
            pending.put(done)

        worker = threading.Thread(target=produce, name="fluxo-prefetch", daemon=True)
        worker.start()
        while (item := pending.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            x, y, lengths = item
            x_device = torch.from_numpy(x).to(self.device, non_blocking=True)
            y_device = _targets(y).to(self.device)
            l_device = None if lengths is None else torch.as_tensor(lengths).to(self.device)
            rank, world = self.shard if shuffle else (0, 1)  # evaluation reads everything on every rank
            for start in range(0, len(y), size):
                if world > 1 and min(size, len(y) - start) < world:
                    break
                window = slice(start + rank, start + size, world) if world > 1 else slice(start, start + size)
                yield Batch(x_device[window].float(), y_device[window], None if l_device is None else l_device[window])
        worker.join()

    def epoch(self) -> Iterator[Batch]:
        return self._iterate(shuffle=True, size=self.batch_size)

    def chunks(self, size: int = 1024) -> Iterator[Batch]:
        return self._iterate(shuffle=False, size=size)


def batches_for(
    split: Split,
    batch_size: int,
    device: torch.device,
    seed: int,
    resident_limit_mb: int,
    balance: str = "none",
    shard: tuple[int, int] = (0, 1),
) -> ResidentBatches | StreamingBatches:
    """Resident when the split fits the limit, else streamed; class balancing needs resident data.

    ``shard`` = (rank, world) gives each data-parallel rank its slice of every training batch.
    """
    if split.nbytes <= resident_limit_mb * 2**20:
        return ResidentBatches(split, batch_size, device, seed, balance, shard)
    if balance != "none":
        raise FluxoError(
            f"train.balance={balance} needs the data resident, but the split is {split.nbytes / 2**20:.0f} MB "
            f"(train.resident_limit_mb={resident_limit_mb}); raise the limit or use train.balance=none"
        )
    return StreamingBatches(split, batch_size, device, seed, shard=shard)
