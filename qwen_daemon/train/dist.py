"""The ranks of a run: this process's place among torchrun's processes, and the few collectives
training needs, each a no-op at world size 1, so that the loop reads the same on one process and
on several instead of branching on the world size.

Rank and world size come from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a process
started without torchrun is rank 0 of 1 and never touches torch.distributed. Every rank must call
a collective at the same point, or the others wait in it until launch.collective_timeout_s.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from qwen_daemon.launch import BACKEND_ENV


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # for the collectives' tensors

    @classmethod
    def start(cls, cfg) -> Ranks:
        """This process's rank and device; under torchrun, the process group too."""
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        device = pick_device(rank)
        if "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():  # started by torchrun
            # A collective that waits longer than this fails the worker; the supervisor restarts them all.
            torch.distributed.init_process_group(backend=backend(cfg, device),
                                                 timeout=timedelta(seconds=cfg.launch.collective_timeout_s))
        return cls(rank, world_size, device)

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, sends telemetry and takes commands."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (filling a cache, say), then the other ranks."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks (in float64: exact for counts of tokens)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        """`value` from every rank, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        mine = torch.tensor([value], device=self.device, dtype=torch.float64)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, mine)
        return [t.item() for t in gathered]

    def gather_object(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (picklable), in rank order, on rank 0; None on the others."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, gathered, dst=0)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable) on every rank."""
        if self.world_size == 1:
            return obj
        shared = [obj]
        torch.distributed.broadcast_object_list(shared, src=0)
        return shared[0]


def pick_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def backend(cfg, device: torch.device) -> str:
    chosen = os.environ.get(BACKEND_ENV) or cfg.launch.backend
    return ("nccl" if device.type == "cuda" else "gloo") if chosen == "auto" else chosen
