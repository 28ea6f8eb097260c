"""The training loop: QLoRA on Qwen3, steerable at every optimizer step, resumable to the sample.

    train(cfg, run_dir) -> TrainState

reads top to bottom: set up (data, model, optimizer, schedule, maybe a checkpoint), then per
optimizer step: apply pending commands, take the step's micro-batches, forward/backward with
gradient accumulation (an OOM halves the micro-batch and redoes the same step), clip, step, log,
evaluate, checkpoint. Then save the final adapter and check it by generating answers.

Distributed: rank and world size come from torchrun's environment; every rank takes its own
slice of each step's units (batching.step_plan) and the loss is normalised by the label tokens
of the whole step on all ranks. The model is replicated (DDP over the LoRA weights) or sharded
(FSDP2, `launch.strategy: fsdp`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor.experimental import implicit_replication

from qwen_daemon.launch import BACKEND_ENV, RESTARTS_ENV
from qwen_daemon.train import fitting, fused
from qwen_daemon.train.batching import collate, epoch_units, step_plan
from qwen_daemon.train.checkpoint import (TrainState, capture_rng_state, checkpoint_size, free_bytes,
                                          latest_valid_checkpoint, load_checkpoint, save_checkpoint)
from qwen_daemon.train.checkpointing import decoder_layers
from qwen_daemon.train.controls import Command, Controls
from qwen_daemon.train.data import prepare_data
from qwen_daemon.train.guard import Guard
from qwen_daemon.train.model import compute_dtype, flattened, load_model, load_tokenizer
from qwen_daemon.train.sinks import JsonlSink, LogSink, Sinks, TensorBoardSink
from shared import batchsize, runs
from shared.config import Config

log = logging.getLogger(__name__)

STRAGGLER_RATIO, STRAGGLER_STEPS = 1.2, 5
INJECT_HANG_ENV = "QWEN_DAEMON_INJECT_HANG"  # "3@1": rank 1 stops answering at step 3 (tests)
INJECT_OOM_ENV = "QWEN_DAEMON_INJECT_OOM"  # "3,7x2": a real OutOfMemoryError at step 3, twice at step 7
DISK_LOW_CHECKPOINTS = 3  # warn when the disk has room for fewer checkpoints than this
INJECT_NAN_ENV = "QWEN_DAEMON_INJECT_NAN"  # "3,5x3": the loss (and so the gradients) NaN at step 3, steps 5-7
MODEL_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # (the last four: flattened)


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


class SynchronisedOOM(RuntimeError):
    """Out of memory where the ranks cannot agree in place; the daemon restarts them all."""


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
    world_size: int = 1
    rank: int = 0
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
    def is_main(self) -> bool:
        return self.rank == 0

    def units(self, epoch: int) -> list[list[int]]:
        d = self.cfg.data
        return epoch_units(self.splits["train"]["num_tokens"], epoch=epoch, seed=d.seed, max_seq_len=d.max_seq_len,
                           packing=d.packing)


def train(cfg: Config, run_dir: Path, controls: Controls | None = None, resume: bool = False,
          sinks: tuple = ()) -> TrainState:
    """Train as `cfg` says, writing everything into `run_dir`; returns where training ended.

    `sinks` are extra metrics/event sinks (the daemon's publisher, a test's recorder).
    """
    r = setup(cfg, run_dir, controls or Controls(), resume, sinks)
    try:
        return _train(r, resume)
    finally:
        r.sinks.close()  # flush metrics and events, also when training fails
        if r.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(r: Run, resume: bool) -> TrainState:
    t = r.cfg.train
    units = r.units(r.state.epoch)
    first_step = r.state.step
    r.sinks.event("train_start", step=r.state.step, total_steps=r.total_steps, resumed=resume,
                  micro_batch_size=r.state.micro_batch_size, grad_accum=r.state.grad_accum,
                  processes=r.world_size, strategy=r.cfg.launch.strategy)
    while r.state.step < r.total_steps:
        apply_commands(r)
        if r.stopping:
            break
        if r.state.samples_in_epoch >= sum(map(len, units)):  # epoch done: the next one, reshuffled
            r.state.epoch, r.state.samples_in_epoch = r.state.epoch + 1, 0
            units = r.units(r.state.epoch)
        started = time.perf_counter()
        loss, tokens = optimizer_step(r, units)
        r.scaler.unscale_(r.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable(r.model), t.max_grad_norm)
        grad_norm = (grad_norm.full_tensor() if r.sharded else grad_norm).item()
        verdict = r.guard.check(r.state.step + 1, loss, grad_norm, scaled=r.scaler.is_enabled())
        if not verdict.skip:  # a NaN or inf never reaches the weights or the optimizer's moments
            r.scaler.step(r.optimizer)  # skips the step if float16 gradients overflowed
        r.scaler.update()
        r.scheduler.step()
        r.optimizer.zero_grad(set_to_none=True)
        r.state.step += 1
        elapsed = time.perf_counter() - started
        if r.state.step == first_step + 1:
            fitting.check(r)
        busy = rank_figures(r, r.busy)
        watch_stragglers(r, busy)
        r.sinks.metrics({
            "kind": "train", "ts": time.time(), "step": r.state.step, "total_steps": r.total_steps,
            "epoch": r.state.epoch + r.state.samples_in_epoch / max(1, sum(map(len, units))),
            "loss": loss, "lr": r.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "tokens": tokens, "tokens_per_s": tokens / elapsed, "step_time": elapsed,
            "samples_seen": r.state.samples_seen, "micro_batch_size": r.state.micro_batch_size,
            "grad_accum": r.state.grad_accum, "processes": r.world_size, **gpu_memory(r.device),
            **({"rank_compute_s": busy} if r.world_size > 1 else {}), **({"skipped": True} if verdict.skip else {}),
        })
        on_anomaly(r, verdict)
        if r.state.step % t.eval_every_steps == 0 or r.state.step == r.total_steps:
            evaluate(r)
        every = r.cfg.eval.generate_every_steps
        if every and r.state.step % every == 0:
            score_sample(r)
        # Also on a new best validation loss, so that the best checkpoint exists to be kept.
        if r.state.step % r.cfg.checkpoint.every_steps == 0 or r.state.best_step == r.state.step:
            save(r)
    save(r)  # final (or on stop): always a checkpoint to resume from
    if r.stopping:
        r.sinks.event("stopped", step=r.state.step)
        return r.state
    # Every rank is here, done training, before rank 0 does the end-of-run work (the others go
    # while it does: a collective waiting through an evaluation would time out).
    barrier(r.world_size)
    finish(r)
    r.state.finished = True
    return r.state


# --- setup ----------------------------------------------------------------------------------------

def setup(cfg: Config, run_dir: Path, controls: Controls, resume: bool, extra_sinks: tuple = ()) -> Run:
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(rank)
    if "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():  # started by torchrun
        # A collective that waits longer than this fails the worker; the supervisor restarts them all.
        torch.distributed.init_process_group(backend=backend(cfg, device),
                                             timeout=timedelta(seconds=cfg.launch.collective_timeout_s))
    seed_everything(cfg.train.seed)  # the same LoRA initialisation on every rank
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    if rank != 0:
        barrier(world_size)  # rank 0 prepares the data (and fills the cache) first ...
    data = prepare_data(cfg, tokenizer)
    if rank == 0:
        barrier(world_size)  # ... then the others read it from the cache
    if rank == 0:
        (run_dir / runs.DATA_REPORT).write_text(json.dumps(data.report.to_dict(), ensure_ascii=False, indent=2),
                                                encoding="utf-8")
    splits = data.splits
    if len(splits["train"]) == 0:
        raise TrainingError(f"no training sample in {cfg.data.paths}; `qwen-daemon data check` shows why")
    if cfg.launch.strategy == "fsdp" and compute_dtype(cfg, device) == torch.float16:
        raise TrainingError("launch.strategy fsdp needs bfloat16 or float32 compute and this device computes in "
                            "float16 (model.compute_dtype); use launch.strategy ddp here")
    model = load_model(cfg, device)
    sharded = cfg.launch.strategy == "fsdp" and torch.distributed.is_initialized()
    if sharded:
        shard_fsdp(model)
    ddp = wrap_ddp(model, device) if world_size > 1 and not sharded else None
    optimizer = make_optimizer(model, cfg)
    state = initial_batch(cfg, world_size)
    sinks = Sinks(JsonlSink(run_dir), TensorBoardSink(run_dir), LogSink(), *extra_sinks) if rank == 0 else Sinks()
    r = Run(cfg, run_dir, device, model, optimizer, None, tokenizer, splits, state, 0, sinks, controls,
            world_size, rank, ddp=ddp, sharded=sharded, flat=flattened(cfg, device),
            autocast=not cfg.model.fused_lora, guard=Guard(cfg.train.on_anomaly))
    if os.environ.get(RESTARTS_ENV, "0") == "0":  # faults are injected into the first worker group only
        r.injected_oom = parse_injected_oom(os.environ.get(INJECT_OOM_ENV, ""), rank)
        r.injected_hang = parse_injected_oom(os.environ.get(INJECT_HANG_ENV, ""), rank)
        r.injected_nan = {step + k for step, times in parse_injected_oom(os.environ.get(INJECT_NAN_ENV, "")).items()
                          for k in range(times)}
    r.scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype(cfg, device) == torch.float16)
    r.total_steps = total_steps(r)
    r.scheduler = make_scheduler(optimizer, cfg, r.total_steps)
    path = latest_valid_checkpoint(run_dir) if resume else None
    if resume and path is None:
        # Killed before its first checkpoint: nothing was kept, so nothing is lost by starting over.
        log.warning("no checkpoint in %s yet: the run starts again at step 0 with its frozen config",
                    run_dir / "checkpoints")
        sinks.event("resumed", step=0, checkpoint=None, samples_seen=0, from_start=True)
        resume = False
    if resume:
        # Under FSDP the checkpoint's whole tensors are copied into sharded parameters: treated as
        # replicated, each rank keeps its shard (peft's loader alone fails on older torch/peft).
        with implicit_replication() if sharded else contextlib.nullcontext():
            r.state = load_checkpoint(path, model, optimizer, r.scheduler, rank=rank,
                                      load_optimizer_state=lambda state: load_optimizer_state(r, state))
        sinks.event("resumed", step=r.state.step, checkpoint=str(path), samples_seen=r.state.samples_seen)
        if r.state.processes != world_size:
            keep_global_batch(r)
    r.state.processes = world_size
    apply_restart_batch(r)
    fitting.at_setup(r, resume)
    return r


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


def backend(cfg: Config, device: torch.device) -> str:
    chosen = os.environ.get(BACKEND_ENV) or cfg.launch.backend
    return ("nccl" if device.type == "cuda" else "gloo") if chosen == "auto" else chosen


def barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


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


def apply_restart_batch(r: Run) -> None:
    """After a restart: the batch size in effect when the workers ended, where it differs from the
    checkpoint's (halved by an OOM that could not be agreed in place, or changed by a command
    after the checkpoint)."""
    path = r.run_dir / runs.RESTART_BATCH
    if not path.exists():
        return
    batch = json.loads(path.read_text(encoding="utf-8"))
    barrier(r.world_size)  # every rank has read it ...
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


def pick_device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


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


def total_steps(r: Run) -> int:
    """max_steps, or as many steps as `epochs` take at the configured global batch."""
    if r.cfg.train.max_steps:
        return r.cfg.train.max_steps
    per_step = r.state.micro_batch_size * r.state.grad_accum * r.world_size  # (the global batch)
    return math.ceil(r.cfg.train.epochs * math.ceil(len(r.units(0)) / per_step))


# --- one optimizer step -------------------------------------------------------------------------

def optimizer_step(r: Run, units: list[list[int]]) -> tuple[float, int]:
    """Forward and backward over the step's micro-batches; returns (mean token loss, real tokens).

    On an out-of-memory error: free memory, halve the micro-batch (doubling accumulation, so the
    global batch stays) and redo the same step with the same samples, on every rank. At
    micro-batch 1 give up with advice. With several ranks, an OOM in the last micro-batch ends the
    process instead and the daemon restarts all ranks with the halved micro-batch.
    """
    while True:
        batches, position = step_plan(units, r.state.samples_in_epoch, r.state.micro_batch_size,
                                      r.state.grad_accum, r.world_size, r.rank)
        try:
            loss, tokens = forward_backward(r, batches)
            break
        except torch.OutOfMemoryError as e:
            recover_from_oom(r, e)
        except SynchronisedOOM as e:
            leave_batch_for_restart(r, e)
            raise
    r.state.samples_seen += position - r.state.samples_in_epoch
    r.state.samples_in_epoch = position
    return loss, tokens


def forward_backward(r: Run, batches: list[list[int]]) -> tuple[float, int]:
    ds = r.splits["train"].select_columns(["input_ids", "prompt_len"])
    # An empty share (a rank at the end of an epoch) becomes sample 0 with weight 0: the rank
    # still runs the micro-batch, so that its collectives pair up with the other ranks'.
    weights = [1.0 if micro_batch else 0.0 for micro_batch in batches]
    collated = [collate_for(r, [[ds[i] for i in unit] for unit in micro_batch or [[0]]]) for micro_batch in batches]
    label_tokens = sum(c["num_label_tokens"] for c, w in zip(collated, weights) if w)
    if r.world_size > 1:  # normalise by the whole step's label tokens on all ranks
        n = torch.tensor(label_tokens, device=r.device)
        torch.distributed.all_reduce(n)
        label_tokens = int(n.item())
    total = torch.zeros((), device=r.device)
    failed: torch.OutOfMemoryError | None = None
    busy = 0.0  # this rank's own compute time, for the straggler watch
    for i, batch in enumerate(collated):
        last = i == len(collated) - 1
        if last and r.world_size > 1:
            # Before the micro-batch whose backward synchronises the ranks (DDP's all-reduce),
            # every rank learns whether any rank ran out of memory in the ones before; then all
            # recover the same way and redo the step. An OOM inside this last micro-batch cannot
            # be agreed (the others are in the all-reduce): see leave_batch_for_restart.
            flag = torch.tensor([failed is not None], device=r.device, dtype=torch.int32)
            torch.distributed.all_reduce(flag)
            if flag.item():
                raise failed or torch.OutOfMemoryError(f"out of memory on another rank at step {r.state.step + 1}")
        try:
            maybe_inject_oom(r, i)
            if failed is not None:
                continue  # on to the agreement without computing, so that no rank waits for us
            # Only the last micro-batch goes through DDP, whose backward reduces the gradients the
            # step accumulated. The others call the model itself: like DDP's no_sync(), but with no
            # collective at all (DDP's forward may rebuild its buckets, a broadcast), so that a rank
            # that skips them after an OOM leaves nobody waiting.
            model = r.ddp if last and r.ddp is not None else r.model
            if r.sharded:  # FSDP reduce-scatters the accumulated gradients after the last one
                r.model.set_requires_gradient_sync(last)
            began = time.perf_counter()
            loss = forward(r, batch, label_tokens, model)
            # The loss is normalised by the whole step's label tokens on all ranks; DDP averages
            # gradients over ranks, so scale by world_size to get their sum.
            loss = loss * weights[i]
            if r.state.step + 1 in r.injected_nan:
                loss = loss * math.nan
            if not last:  # (the last backward includes waiting for the other ranks)
                busy += time.perf_counter() - began
            r.scaler.scale(loss * r.world_size).backward()
            total += loss.detach()  # each micro-batch's share of the step's mean token loss
        except torch.OutOfMemoryError as e:
            if r.world_size == 1:
                raise
            if last or r.sharded:  # the others wait in a collective (DDP's all-reduce, FSDP's
                raise SynchronisedOOM(str(e)) from e  # gathers): no agreement possible
            failed = e
    if r.world_size > 1:
        torch.distributed.all_reduce(total)  # the step's loss over all ranks
    r.busy = busy
    tokens = sum(c["num_tokens"] for c, w in zip(collated, weights) if w)
    if r.world_size > 1:
        counted = torch.tensor(tokens, device=r.device)
        torch.distributed.all_reduce(counted)
        tokens = int(counted.item())
    return total.item(), tokens


def probe_step(r: Run, tokens: int, seed: int = 0) -> None:
    """Forward and backward of a synthetic micro-batch of `tokens` random tokens laid out as
    training lays out data (rows of data.max_seq_len, two samples of unequal length in each
    packed row: the varlen attention kernel that packed data takes, which needs more memory than
    the causal-rows path of equal lengths), then the gradients dropped: what the memory probe
    measures. Runs the model itself, never the DDP wrapper (no collective)."""
    seq = r.cfg.data.max_seq_len
    g = torch.Generator().manual_seed(seed)
    vocab = min(r.model.config.vocab_size, len(r.tokenizer))

    def sample(n: int) -> dict:
        return {"input_ids": torch.randint(0, vocab, (n,), generator=g).tolist(), "prompt_len": 0}

    lengths = [min(seq, tokens - start) for start in range(0, tokens, seq)]
    units = [[sample(n - n // 3), sample(n // 3)] if r.cfg.data.packing and n > 2 else [sample(n)] for n in lengths]
    forward(r, collate_for(r, units)).backward()
    r.model.zero_grad(set_to_none=True)


def collate_for(r: Run, units: list[list[dict]]) -> dict:
    """One micro-batch's tensors, laid out as this run trains (packing, varlen rows)."""
    return collate(units, packing=r.cfg.data.packing, pad_token_id=r.tokenizer.pad_token_id, flash_attention=r.flat)


def forward(r: Run, batch: dict, label_tokens: int | None = None, model=None) -> torch.Tensor:
    """The loss of one collated micro-batch: its summed token losses over `label_tokens` (the
    step's on every rank; by default the batch's own, i.e. its mean token loss). Training,
    evaluation and the memory probe all go through here; `model`: the DDP wrapper, where used."""
    with autocast(r):
        return (model or r.model)(**model_inputs(batch, r.device), use_cache=False,
                                  num_items_in_batch=max(1, batch["num_label_tokens"] if label_tokens is None
                                                         else label_tokens)).loss


def autocast(r: Run):
    dtype = compute_dtype(r.cfg, r.device)
    return torch.autocast(r.device.type, dtype=dtype, enabled=r.autocast and dtype != torch.float32)


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items() if k in MODEL_INPUTS}


def rank_figures(r: Run, value: float) -> list[float]:
    """`value` from every rank, in rank order (a tiny all_gather once per step)."""
    if r.world_size == 1:
        return [value]
    mine = torch.tensor([value], device=r.device, dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(r.world_size)]
    torch.distributed.all_gather(gathered, mine)
    return [t.item() for t in gathered]


def watch_stragglers(r: Run, compute_s: list[float]) -> None:
    """A `straggler` event when a rank's compute time is more than 20% above the median of the
    other ranks' for STRAGGLER_STEPS steps in a row (once per such stretch)."""
    if len(compute_s) < 2:
        return
    for rank, own in enumerate(compute_s):
        others = statistics.median(t for k, t in enumerate(compute_s) if k != rank)
        slow = others > 0 and own > STRAGGLER_RATIO * others
        r.slow_steps[rank] = r.slow_steps.get(rank, 0) + 1 if slow else 0
        if r.slow_steps[rank] == STRAGGLER_STEPS:
            r.sinks.event("straggler", step=r.state.step, rank=rank, slower_pct=round(100 * (own / others - 1)),
                          steps=STRAGGLER_STEPS)


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


def remember_batch(r: Run, reason: str) -> None:
    """The batch size now, for workers restarted from an older checkpoint (apply_restart_batch):
    a command or an OOM recovery since that checkpoint must not be undone by a restart."""
    if r.is_main:
        runs.write_restart_batch(r.run_dir, r.state.micro_batch_size, r.state.grad_accum, r.world_size, reason)


def recover_from_oom(r: Run, error: Exception) -> None:
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


def parse_injected_oom(spec: str, rank: int = 0) -> dict[int, int]:
    """'3,7x2' -> {3: 1, 7: 2}: fault injection for tests (QWEN_DAEMON_INJECT_OOM); '3@1' only on
    rank 1 (every rank without '@')."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part, _, on_rank = part.partition("@")
        if on_rank and int(on_rank) != rank:
            continue
        step, _, times = part.partition("x")
        out[int(step)] = int(times or 1)
    return out


def on_anomaly(r: Run, verdict) -> None:
    """Record what the guard found; after ANOMALY_PATIENCE non-finite steps in a row, do what
    train.on_anomaly says (the pause waits in the next apply_commands, as a user's pause would)."""
    for event in verdict.events:
        r.sinks.event(**event)
        if event["kind"] == "anomaly":
            log.warning("step %d: %s not finite (loss %s, grad_norm %s): not applied",
                        event["step"], " and ".join(event["what"]), event["loss"], event["grad_norm"])
    if not verdict.act or r.cfg.train.on_anomaly == "skip":
        return
    if r.cfg.train.on_anomaly == "pause":
        r.paused = True
        r.sinks.event("auto_paused", step=r.state.step, reason="anomaly")
    else:
        r.stopping = True


def maybe_inject_oom(r: Run, micro_batch: int) -> None:
    step = r.state.step + 1
    if micro_batch == 0 and r.injected_hang.get(step, 0) > 0:
        log.warning("rank %d stops answering at step %d (%s)", r.rank, step, INJECT_HANG_ENV)
        time.sleep(10**6)
    if micro_batch == 0 and r.injected_oom.get(step, 0) > 0:
        r.injected_oom[step] -= 1
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_OOM_ENV} at step {step})")


def gpu_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_allocated": torch.cuda.memory_allocated(device) / 2**30,
            "gpu_reserved": torch.cuda.memory_reserved(device) / 2**30,
            "gpu_peak": torch.cuda.max_memory_allocated(device) / 2**30}


# --- evaluation and checkpoints -----------------------------------------------------------------

def evaluate(r: Run) -> float | None:
    """Mean token loss on the validation split (no dropout, no gradients)."""
    ds = r.splits["validation"].select_columns(["input_ids", "prompt_len"])
    if len(ds) == 0:
        return None
    r.sinks.event("evaluating", step=r.state.step)
    units = epoch_units(r.splits["validation"]["num_tokens"], epoch=0, seed=r.cfg.data.seed, max_seq_len=r.cfg.data.max_seq_len,
                        packing=r.cfg.data.packing)
    r.model.eval()
    loss_sum, label_tokens = 0.0, 0
    mbs, per_round = r.state.micro_batch_size, r.state.micro_batch_size * r.world_size
    with torch.no_grad():
        # The same number of forwards on every rank (FSDP gathers weights in each): a rank with
        # nothing left runs the first unit again and does not count it.
        for start in range(r.rank * mbs, math.ceil(len(units) / per_round) * per_round, per_round):
            share = units[start:start + mbs]
            batch = collate_for(r, [[ds[i] for i in unit] for unit in share or units[:1]])
            loss = forward(r, batch)
            if share:
                loss_sum += loss.item() * batch["num_label_tokens"]
                label_tokens += batch["num_label_tokens"]
    r.model.train()
    if r.world_size > 1:
        t = torch.tensor([loss_sum, label_tokens], device=r.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        loss_sum, label_tokens = t.tolist()
    eval_loss = loss_sum / max(1, label_tokens)
    r.state.eval_loss = eval_loss
    if r.state.best_eval_loss is None or eval_loss < r.state.best_eval_loss:
        r.state.best_eval_loss, r.state.best_step = eval_loss, r.state.step
    r.sinks.metrics({"kind": "eval", "ts": time.time(), "step": r.state.step, "eval_loss": eval_loss})
    return eval_loss


def score_sample(r: Run) -> None:
    """`eval.generate_every_steps`: the model being trained answers a fixed validation sample;
    its mean scores go out as an `eval` metrics record (term recall, ROUGE-L ... next to the loss)."""
    from qwen_daemon.train.evaluate import sample_scores

    r.sinks.event("evaluating", step=r.state.step, what="sample")
    scores = sample_scores(r)
    if scores is not None:
        r.sinks.metrics({"kind": "eval", "ts": time.time(), "step": r.state.step, **scores})


def save(r: Run) -> Path | None:
    """A checkpoint of this step, written by rank 0 with every rank's RNG state (every rank calls
    this at the same boundaries)."""
    if r.saved_step == r.state.step:
        return None
    r.saved_step = r.state.step
    rng_states = None
    if r.world_size > 1:
        rng_states = [None] * r.world_size if r.is_main else None
        torch.distributed.gather_object(capture_rng_state(), rng_states, dst=0)
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
    if r.is_main:  # the checkpoint holds the batch size now (remember_batch)
        (r.run_dir / runs.RESTART_BATCH).unlink(missing_ok=True)
    warn_of_disk(r, path)
    return path


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


# --- commands at the step boundary --------------------------------------------------------------

def apply_commands(r: Run) -> None:
    """Apply what arrived since the last step; while paused, wait here for more.

    With several ranks, rank 0 takes the commands and broadcasts them (a tiny collective), so
    every rank applies the same commands at the same step; only rank 0 answers them. While
    paused the broadcast repeats every second, far inside the collective timeout."""
    while True:
        commands = r.controls.take() if r.is_main else []
        if r.world_size > 1:
            shared = [[(c.name, c.args) for c in commands]]
            torch.distributed.broadcast_object_list(shared, src=0)
            commands = commands or [Command(name, args) for name, args in shared[0]]
        for command in commands:
            # The event before the reply: whoever has the reply has everything the command did
            # (the daemon's figures too, should the worker die right after).
            try:
                result = apply(r, command)
            except (ValueError, TrainingError) as e:
                r.sinks.event("command_failed", step=r.state.step, command=command.name, error=str(e))
                command.future.set_exception(e)
            else:
                r.sinks.event("command_applied", step=r.state.step, command=command.name, **result)
                log.info("rank %d: %s applied at step %d", r.rank, command.name, r.state.step)
                command.future.set_result({"step": r.state.step, **result})
        if not r.paused or r.stopping:
            return
        if r.is_main:
            r.controls.wait(timeout=1.0 if r.world_size > 1 else None)


def apply(r: Run, command: Command) -> dict[str, Any]:
    """Apply one command (its arguments complete: Controls filled in the defaults); the result
    goes into the command_applied event and the reply. `paused` in it is the run's state, which
    the daemon follows."""
    return HANDLERS[command.name](r, **command.args)


def pause_run(r: Run, release_memory: bool) -> dict[str, Any]:
    r.paused = True
    if release_memory and r.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"paused": True}


def resume_run(r: Run) -> dict[str, Any]:
    r.paused = False
    return {"paused": False}


def checkpoint_now(r: Run) -> dict[str, Any]:
    save(r)
    path = r.run_dir / "checkpoints" / f"checkpoint-{r.state.step}"
    if r.is_main and not path.is_dir():
        raise TrainingError(f"the checkpoint of step {r.state.step} was not written (the checkpoint_skipped event "
                            "says why); it is tried again at the next checkpoint boundary")
    return {"path": str(path)}


def stop_run(r: Run) -> dict[str, Any]:
    r.stopping = True
    return {"stopping": True}


def set_micro_batch_size(r: Run, micro_batch_size: int, keep_global_batch: bool) -> dict[str, Any]:
    s = r.state
    s.micro_batch_size, s.grad_accum = batchsize.change(s.micro_batch_size, s.grad_accum, micro_batch_size,
                                                    keep_global_batch)
    remember_batch(r, "command")
    return {"micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum,
            "global_batch": s.micro_batch_size * s.grad_accum * r.world_size, **fitting.replan(r)}


# One handler per command of shared.protocol.COMMANDS that is not read-only.
HANDLERS = {"pause": pause_run, "resume": resume_run, "checkpoint": checkpoint_now, "stop": stop_run,
            "set_batch_size": set_micro_batch_size}


# --- the end: final adapter and an inference check ------------------------------------------------

def finish(r: Run) -> None:
    adapter = lora_state(r) if r.sharded else None  # (a collective under FSDP)
    if not r.is_main:
        return
    final = r.run_dir / "final"
    r.model.save_pretrained(final, state_dict=adapter)
    r.tokenizer.save_pretrained(final)
    r.sinks.event("final_saved", step=r.state.step, path=str(final))
    questions = [row for row in r.splits["test"].select(range(min(3, len(r.splits["test"]))))]
    # Free the trained model before loading base + adapter afresh (the seeds' evaluation ran out
    # of memory by keeping both).
    r.model = r.optimizer = None
    gc.collect()
    if r.device.type == "cuda":
        torch.cuda.empty_cache()
    if r.cfg.train.inference_check_tokens:
        answers = inference_check(r.cfg, final, questions, r.device, r.cfg.train.inference_check_tokens)
        with open(r.run_dir / runs.INFERENCE, "w", encoding="utf-8") as f:
            for a in answers:
                f.write(json.dumps(a, ensure_ascii=False) + "\n")
        r.sinks.event("inference_check", step=r.state.step, answers=answers)
    if r.cfg.eval.at_end:
        from qwen_daemon.train.evaluate import evaluate_run

        r.sinks.event("evaluating", step=r.state.step, what="eval")
        summary = evaluate_run(r.run_dir, "final", device=r.device, cfg=r.cfg)
        r.sinks.event("eval_done", step=r.state.step, split=summary["split"], records=summary["records"],
                      file=summary["file"], loss=summary["loss"], overall=summary.get("overall"))


def inference_check(cfg: Config, adapter_dir: Path, questions: list[dict], device: torch.device,
                    max_new_tokens: int = 256) -> list[dict[str, str]]:
    """Load the base model and the saved adapter afresh and answer held-out questions with the
    thinking template (the generation prompt opens <think>)."""
    from transformers import AutoTokenizer

    from qwen_daemon.train.evaluate import generate, load_adapted

    model = load_adapted(cfg, adapter_dir, device)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    texts = generate(model, tokenizer, [q["prompt"] for q in questions], cfg, device, max_new_tokens=max_new_tokens)
    del model
    return [{"question": q["prompt"][-1]["content"], "reference": q["answer"], "generated": text}
            for q, text in zip(questions, texts)]

