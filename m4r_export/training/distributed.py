"""Helpers for ``torchrun``: process-group setup, per-epoch sharding, reductions.

``m4r train`` started by ``torchrun --nproc_per_node N`` finds ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
in its environment and joins a process group (gloo on CPU, nccl on CUDA). Without them it runs as a
single process and every helper here is a no-op.

Sharding follows ``torch.utils.data.DistributedSampler`` (shuffle=True, drop_last=False): every rank
draws the same permutation of the training rows from ``(seed, epoch)``, pads it by wrapping around
to a multiple of the world size, and takes every ``world_size``-th row starting at its rank. The
shards of one epoch are therefore disjoint (apart from the at most ``world_size - 1`` wrapped rows)
and cover every row, and all ranks run the same number of steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (no-op for a single process)."""
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled row order of ``epoch``; identical on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """Rows this rank trains on in ``epoch`` (DistributedSampler semantics, see the module docstring)."""
    perm = epoch_permutation(n, seed, epoch)
    if world_size == 1:
        return perm
    total = -(-n // world_size) * world_size
    if total > n:
        perm = np.concatenate([perm, perm[: total - n]])
    return perm[rank:total:world_size]


def all_reduce_dict(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """Sum each value over ranks (identity for one process); keys must match on every rank."""
    if not info.enabled:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True if ``flag`` is true on any rank (so every rank takes the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The largest ``value`` over ranks (identity for one process), so every rank uses the same one."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (list indexed by rank); ``[obj]`` for one process."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
