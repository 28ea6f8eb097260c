"""A run's checkpoints: what the loop hands checkpoint.py to save, and restoring a run from the
newest one. checkpoint.py knows the files and nothing of a Run; this module knows the Run: its
ranks (every rank's RNG state, gathered to rank 0), FSDP's shards (gathered into whole weights
and optimizer state), the disk watch, and the events.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor.experimental import implicit_replication

from qwen_daemon.train.batch_size import keep_global_batch
from qwen_daemon.train.checkpoint import (capture_rng_state, checkpoint_size, free_bytes, latest_valid_checkpoint,
                                          load_checkpoint, save_checkpoint)
from qwen_daemon.train.run import Run, trainable
from shared import runs

log = logging.getLogger(__name__)

DISK_LOW_CHECKPOINTS = 3  # warn when the disk has room for fewer checkpoints than this


def save(r: Run) -> Path | None:
    """A checkpoint of this step, written by rank 0 with every rank's RNG state (every rank calls
    this at the same boundaries)."""
    if r.saved_step == r.state.step:
        return None
    r.saved_step = r.state.step
    rng_states = r.ranks.gather_object(capture_rng_state())
    adapter, optimizer = (lora_state(r) if r.sharded else None), optimizer_state(r)
    if not r.is_main:
        return None
    r.sinks.event("saving", step=r.state.step)
    try:
        path = save_checkpoint(r.run_dir, r.state, r.model, r.optimizer, r.scheduler,
                               keep_last=r.cfg.checkpoint.keep_last, rank_rng_states=rng_states,
                               adapter_state=adapter, optimizer_state=optimizer, expected_bytes=checkpoint_estimate(r))
    except OSError as e:  # too little space, or the disk filled while writing: training goes on
        log.error("checkpoint of step %d not written: %s", r.state.step, e)
        r.sinks.event("checkpoint_skipped", step=r.state.step, error=str(e))
        return None
    r.sinks.event("checkpoint", step=r.state.step, path=str(path))
    (r.run_dir / runs.RESTART_BATCH).unlink(missing_ok=True)  # the checkpoint holds the batch size now
    warn_of_disk(r, path)
    return path


def restore(r: Run) -> bool:
    """Resume the run from its newest valid checkpoint; False when it has none yet."""
    path = latest_valid_checkpoint(r.run_dir)
    if path is None:
        # Killed before its first checkpoint: nothing was kept, so nothing is lost by starting over.
        log.warning("no checkpoint in %s yet: the run starts again at step 0 with its frozen config",
                    r.run_dir / "checkpoints")
        r.sinks.event("resumed", step=0, checkpoint=None, samples_seen=0, from_start=True)
        return False
    # Under FSDP the checkpoint's whole tensors are copied into sharded parameters: treated as
    # replicated, each rank keeps its shard (peft's loader alone fails on older torch/peft).
    with implicit_replication() if r.sharded else contextlib.nullcontext():
        r.state = load_checkpoint(path, r.model, r.optimizer, r.scheduler, rank=r.rank,
                                  load_optimizer_state=lambda state: load_optimizer_state(r, state))
    r.sinks.event("resumed", step=r.state.step, checkpoint=str(path), samples_seen=r.state.samples_seen)
    if r.state.processes != r.world_size:
        keep_global_batch(r)
    return True


def checkpoint_estimate(r: Run) -> int:
    """Bytes of a checkpoint before the first exists: the LoRA weights and AdamW's two moments."""
    return sum(p.numel() * (p.element_size() + 8) for p in trainable(r.model))


def warn_of_disk(r: Run, path: Path) -> None:
    """A `disk_low` event when the disk has room for fewer than DISK_LOW_CHECKPOINTS more
    checkpoints (once, until it has room again)."""
    free, size = free_bytes(path), checkpoint_size(path)
    low = free < DISK_LOW_CHECKPOINTS * size
    if low and not r.disk_low:
        log.warning("%.1f GiB free on the disk of %s: room for %d more checkpoints", free / 2**30, path.parent,
                    free // max(size, 1))
        r.sinks.event("disk_low", step=r.state.step, free_gib=round(free / 2**30, 2),
                      checkpoint_mib=round(size / 2**20, 1))
    r.disk_low = low


def lora_state(r: Run) -> dict[str, torch.Tensor]:
    """The whole LoRA weights on the CPU, by parameter name; under FSDP every rank must call
    this (each weight is gathered from its shards)."""
    return {name: (p.full_tensor() if r.sharded else p).detach().cpu()
            for name, p in r.model.named_parameters() if p.requires_grad}


def optimizer_state(r: Run) -> dict[str, Any] | None:
    """Under launch.strategy fsdp, the optimizer's whole state by parameter name, gathered from
    the shards to rank 0 (every rank calls this), so that it loads on any number of processes.
    None otherwise: the checkpoint takes optimizer.state_dict()."""
    if r.cfg.launch.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(r.model, r.optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if r.is_main else None


def load_optimizer_state(r: Run, state: dict[str, Any]) -> None:
    if r.cfg.launch.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(r.model, r.optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        r.optimizer.load_state_dict(state)
