"""Data-parallel training with ``torchrun``: gloo on the CPU, NCCL on GPUs.

Every rank draws the same batch order from the same seed and trains on its own
slice of each global batch; DDP averages the gradients, so N processes take the
same steps as one process with the same global batch. Only rank 0 logs to
MLflow and writes checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; a no-op without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def current() -> DistInfo:
    if not dist.is_available() or not dist.is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (identity in a single process), for epoch totals."""
    if current().active:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank (identity in a single process): one decision, taken once.

    ``value`` must pickle; it is meant for small things, a path or an error message.
    """
    if not current().active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(message: str | None) -> str | None:
    """The first rank's error message, on every rank, or None when all succeeded.

    A collective: every rank must call it, so one rank's failure stops all of them
    instead of leaving the others blocked in the next collective.
    """
    if not current().active:
        return message
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
