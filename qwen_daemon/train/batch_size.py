"""The run's batch size as it changes: at the start, on a resume with another number of processes,
after an out-of-memory error, and across a restart of the workers. The arithmetic (halving,
rescaling, a command's change) is shared/batchsize.py's; this module applies it to a Run and
tells the run's sinks.

A restart goes back to the newest checkpoint, which may hold an older batch size than the one in
effect: `remember_batch` leaves the current one in the run directory (runs.RESTART_BATCH) and
`apply_restart_batch` takes it up again; the next checkpoint holds it and removes the file.
"""

from __future__ import annotations

import gc
import json
import logging

import torch

from qwen_daemon.train.checkpoint import TrainState
from qwen_daemon.train.run import Run, TrainingError
from shared import batchsize, runs
from shared.config import Config

log = logging.getLogger(__name__)


def initial_batch(cfg: Config, world_size: int) -> TrainState:
    """Micro-batch and accumulation at the start: as configured, or from train.global_batch_size
    (the micro-batch 1 until the memory plan chooses it, when it is auto)."""
    t = cfg.train
    if t.global_batch_size is None:
        return TrainState(micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum)
    per_rank, rest = divmod(t.global_batch_size, world_size)
    mbs = 1 if t.micro_batch_size == "auto" else t.micro_batch_size
    if rest or per_rank % mbs:
        raise TrainingError(f"train.global_batch_size {t.global_batch_size} is not a multiple of {world_size} "
                            f"process(es) x micro-batch {mbs}; change one of them")
    return TrainState(micro_batch_size=mbs, grad_accum=per_rank // mbs)


def keep_global_batch(r: Run) -> None:
    """Resumed with another number of processes: the same global batch, with the accumulation
    (or, failing that, the micro-batch) recomputed; the data position is global, so no sample is
    skipped or repeated either way."""
    s = r.state
    global_batch = s.micro_batch_size * s.grad_accum * s.processes
    kept = batchsize.rescaled(s.micro_batch_size, s.grad_accum, s.processes, r.world_size)
    if kept is None:
        log.warning("resumed on %d processes (trained on %d): the global batch %d does not divide; it becomes %d",
                    r.world_size, s.processes, global_batch, s.micro_batch_size * s.grad_accum * r.world_size)
        return
    s.micro_batch_size, s.grad_accum = kept
    log.info("resumed on %d processes (trained on %d): micro-batch %d x accumulation %d keeps the global batch %d",
             r.world_size, s.processes, s.micro_batch_size, s.grad_accum, global_batch)


def remember_batch(r: Run, reason: str) -> None:
    """The batch size now, for workers restarted from an older checkpoint (apply_restart_batch):
    a command or an OOM recovery since that checkpoint must not be undone by a restart."""
    if r.is_main:
        runs.write_restart_batch(r.run_dir, r.state.micro_batch_size, r.state.grad_accum, r.world_size, reason)


def apply_restart_batch(r: Run) -> None:
    """After a restart: the batch size in effect when the workers ended, where it differs from the
    checkpoint's (halved by an OOM that could not be agreed in place, or changed by a command
    after the checkpoint)."""
    path = r.run_dir / runs.RESTART_BATCH
    if not path.exists():
        return
    batch = json.loads(path.read_text(encoding="utf-8"))
    r.ranks.barrier()  # every rank has read it ...
    if r.is_main:
        path.unlink()  # ... before it goes
    s = r.state
    if batch.get("processes") != r.world_size or (batch["micro_batch_size"], batch["grad_accum"]) == (
            s.micro_batch_size, s.grad_accum):
        return
    s.micro_batch_size, s.grad_accum = batch["micro_batch_size"], batch["grad_accum"]
    kind = "oom_recovered" if batch.get("reason") == "oom" else "batch_restored"
    r.sinks.event(kind, step=s.step + 1, micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum,
                  restarted=True)


def recover_from_oom(r: Run, error: Exception) -> None:
    """Out of memory in this step, agreed by every rank: free memory and halve the micro-batch
    (doubling the accumulation, so the global batch stays); the loop redoes the step."""
    r.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if r.device.type == "cuda":
        torch.cuda.empty_cache()
    old_mbs, old_accum = r.state.micro_batch_size, r.state.grad_accum
    smaller = batchsize.halved(old_mbs, old_accum)
    if smaller is None:
        r.sinks.event("oom_fatal", step=r.state.step + 1, micro_batch_size=old_mbs)
        raise TrainingError(
            f"out of memory at step {r.state.step + 1} with micro-batch 1 ({error}). Lower data.max_seq_len, "
            "keep train.grad_checkpointing on, train fewer LoRA targets (lora.target_modules), or use a larger GPU"
        ) from None
    new_mbs, new_accum = smaller
    r.state.micro_batch_size, r.state.grad_accum = smaller
    remember_batch(r, "oom")
    log.warning("out of memory at step %d: micro-batch %d -> %d, accumulation %d -> %d; redoing the step",
                r.state.step + 1, old_mbs, new_mbs, old_accum, new_accum)
    r.sinks.event("oom_recovered", step=r.state.step + 1, micro_batch_size=new_mbs, grad_accum=new_accum,
                  previous_micro_batch_size=old_mbs, previous_grad_accum=old_accum)


def leave_batch_for_restart(r: Run, error: Exception) -> None:
    """This rank ran out of memory in the micro-batch whose backward synchronises the ranks (or,
    under FSDP, in any micro-batch); the others wait in a collective. Leave the halved batch size
    for the restart and let the exception end this process: torchrun's agent then ends the other
    ranks and the daemon restarts them all from the newest checkpoint."""
    s = r.state
    smaller = batchsize.halved(s.micro_batch_size, s.grad_accum)
    if smaller is None:
        raise TrainingError(f"out of memory on rank {r.rank} at step {s.step + 1} with micro-batch 1 ({error}); "
                            "lower data.max_seq_len or use a larger GPU") from None
    new_mbs, accum = smaller
    runs.write_restart_batch(r.run_dir, new_mbs, accum, r.world_size, reason="oom")
    log.error("rank %d: out of memory in the synchronising micro-batch of step %d; all ranks restart from the "
              "newest checkpoint with micro-batch %d x accumulation %d", r.rank, s.step + 1, new_mbs, accum)
