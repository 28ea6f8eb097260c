"""The state of one training run (`Run`), shared by the loop and its helpers, and the pieces that
setup builds it from: seeds, optimizer, schedule, the model wrapped for launch.strategy.

Helper modules (commands, saving, batch_size, end, evaluate) take a Run; the loop owns the flow.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen_daemon.train import fused
from qwen_daemon.train.batching import epoch_units
from qwen_daemon.train.checkpoint import TrainState
from qwen_daemon.train.checkpointing import decoder_layers
from qwen_daemon.train.controls import Controls
from qwen_daemon.train.dist import Ranks
from qwen_daemon.train.guard import Guard
from qwen_daemon.train.sinks import Sinks
from shared.config import Config

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class Run:
    """Everything the loop's helpers share; the loop itself owns the flow."""

    cfg: Config
    run_dir: Path
    device: torch.device
    model: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    splits: dict[str, Any]
    state: TrainState
    total_steps: int
    sinks: Sinks
    controls: Controls
    ranks: Ranks = field(default_factory=Ranks)
    paused: bool = False
    stopping: bool = False
    injected_oom: dict[int, int] = field(default_factory=dict)
    injected_hang: dict[int, int] = field(default_factory=dict)
    injected_nan: set[int] = field(default_factory=set)
    guard: Guard = field(default_factory=Guard)
    disk_low: bool = False  # the disk_low warning was given (and the disk is still low)
    saved_step: int | None = None
    ddp: Any = None  # the DistributedDataParallel wrapper (forward and backward) when world_size > 1
    sharded: bool = False  # the model is sharded with FSDP2 (launch.strategy fsdp under torchrun)
    flat: bool = False  # a micro-batch is one row with its samples' boundaries (varlen attention)
    # Autocast only where something computes in float32 that should not: peft's own LoRA layers.
    # The fused ones cast what they use, the weights are loaded in the compute dtype, and
    # autocast costs a dispatch in every op.
    autocast: bool = True
    plan: Any = None  # the memory plan in effect (memory.Plan), when one was fitted
    memory_model: Any = None  # what the probe measured (memory.MemoryModel), on a GPU
    memory_budget: float | None = None  # bytes the plan may use at its peak
    busy: float = 0.0  # this rank's compute seconds in the last step
    slow_steps: dict[int, int] = field(default_factory=dict)  # rank -> steps in a row it was slow
    # Loss scaling, active only for float16 compute (GPUs without bf16); a no-op otherwise.
    scaler: Any = field(default_factory=lambda: torch.amp.GradScaler("cpu", enabled=False))

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    def units(self, epoch: int) -> list[list[int]]:
        d = self.cfg.data
        return epoch_units(self.splits["train"]["num_tokens"], epoch=epoch, seed=d.seed, max_seq_len=d.max_seq_len,
                           packing=d.packing)


def total_steps(r: Run) -> int:
    """max_steps, or as many steps as `epochs` take at the configured global batch."""
    if r.cfg.train.max_steps:
        return r.cfg.train.max_steps
    per_step = r.state.micro_batch_size * r.state.grad_accum * r.world_size  # (the global batch)
    return math.ceil(r.cfg.train.epochs * math.ceil(len(r.units(0)) / per_step))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, cfg: Config):
    """train.optimizer: torch's AdamW (fused on CUDA, one multi-tensor kernel per step), or
    bitsandbytes' paged 8-bit AdamW (paging needs CUDA: plain 8-bit AdamW on CPU). Under
    launch.strategy fsdp always torch's AdamW, which updates the sharded parameters (each rank
    holds 1/N of its state)."""
    params = trainable(model)
    if cfg.train.optimizer == "adamw" or cfg.launch.strategy == "fsdp":
        fused = params[0].device.type == "cuda" and cfg.launch.strategy != "fsdp"
        return torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=0.0, fused=fused or None)
    import bitsandbytes as bnb

    adamw = bnb.optim.PagedAdamW8bit if params[0].device.type == "cuda" else bnb.optim.AdamW8bit
    return adamw(params, lr=cfg.train.learning_rate, weight_decay=0.0)


def make_scheduler(optimizer, cfg: Config, total: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, round(cfg.train.warmup_ratio * total), total)


def wrap_ddp(model, device: torch.device):
    """DDP over the LoRA weights only: the frozen 4-bit base is the same on every rank (loaded from
    the same files, or built from the same seed), so it is neither broadcast nor reduced."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, p in model.named_parameters() if not p.requires_grad]
    ignored += [name for name, _ in model.named_buffers()]  # rotary tables: computed, the same everywhere
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard_fsdp(model) -> None:
    """FSDP2 (fully_shard): each decoder layer is a unit whose parameters (4-bit base, norms,
    LoRA) are gathered just before it runs and freed after; the rest (embeddings, final norm,
    head) belong to the root. Gradients are reduce-scattered, so each rank keeps and updates
    only its shard of the LoRA weights and of the optimizer state."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise TrainingError(f"launch.strategy fsdp: {type(model.get_base_model()).__name__} names no decoder layer "
                            "class (_no_split_modules) to shard by; use launch.strategy ddp")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    # FSDP swaps the parameters' storage around each forward: no cached casts of LoRA weights.
    fused.CACHE_CASTS = False
    log.info("FSDP: %d %s units and the root sharded over %d processes", len(layers), type(layers[0]).__name__,
             torch.distributed.get_world_size())
