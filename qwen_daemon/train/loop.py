"""The training loop: QLoRA on Qwen3, steerable at every optimizer step, resumable to the sample.

    train(cfg, run_dir) -> TrainState

reads top to bottom: set up (data, model, optimizer, schedule, maybe a checkpoint), then per
optimizer step: apply pending commands, take the step's micro-batches, forward/backward with
gradient accumulation (an OOM halves the micro-batch and redoes the same step), clip, step, log,
evaluate, checkpoint. Then save the final adapter and check it by generating answers.

What the loop calls lives beside it: run.py (the Run and its pieces), dist.py (ranks and
collectives, no-ops on one process), batch_size.py, commands.py, saving.py, evaluate.py, end.py.

Distributed: rank and world size come from torchrun's environment; every rank takes its own
slice of each step's units (batching.step_plan) and the loss is normalised by the label tokens
of the whole step on all ranks. The model is replicated (DDP over the LoRA weights) or sharded
(FSDP2, `launch.strategy: fsdp`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch

from qwen_daemon.launch import RESTARTS_ENV
from qwen_daemon.train import fitting
from qwen_daemon.train.batch_size import apply_restart_batch, initial_batch, leave_batch_for_restart, recover_from_oom
from qwen_daemon.train.batching import collate, step_plan
from qwen_daemon.train.checkpoint import TrainState
from qwen_daemon.train.commands import apply_commands
from qwen_daemon.train.controls import Controls
from qwen_daemon.train.data import prepare_data
from qwen_daemon.train.dist import Ranks
from qwen_daemon.train.end import finish
from qwen_daemon.train.evaluate import eval_loss, score_sample
from qwen_daemon.train.guard import Guard
from qwen_daemon.train.model import compute_dtype, flattened, load_model, load_tokenizer
from qwen_daemon.train.run import (Run, TrainingError, make_optimizer, make_scheduler, seed_everything, shard_fsdp,
                                   total_steps, trainable, wrap_ddp)
from qwen_daemon.train.saving import restore, save
from qwen_daemon.train.sinks import JsonlSink, LogSink, Sinks, TensorBoardSink
from shared import runs
from shared.config import Config

log = logging.getLogger(__name__)

STRAGGLER_RATIO, STRAGGLER_STEPS = 1.2, 5
INJECT_HANG_ENV = "QWEN_DAEMON_INJECT_HANG"  # "3@1": rank 1 stops answering at step 3 (tests)
INJECT_OOM_ENV = "QWEN_DAEMON_INJECT_OOM"  # "3,7x2": a real OutOfMemoryError at step 3, twice at step 7
INJECT_NAN_ENV = "QWEN_DAEMON_INJECT_NAN"  # "3,5x3": the loss (and so the gradients) NaN at step 3, steps 5-7
MODEL_INPUTS = ("input_ids", "labels", "position_ids", "attention_mask",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # (the last four: flattened)


class SynchronisedOOM(RuntimeError):
    """Out of memory where the ranks cannot agree in place; the daemon restarts them all."""


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
        r.ranks.close()


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
        busy = r.ranks.gather(r.busy)  # every rank's compute seconds (a tiny all_gather)
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
            eval_loss(r)
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
    r.ranks.barrier()
    finish(r)
    r.state.finished = True
    return r.state


def setup(cfg: Config, run_dir: Path, controls: Controls, resume: bool, extra_sinks: tuple = ()) -> Run:
    """The run train() steps: ranks, data, the model wrapped for launch.strategy, optimizer and
    schedule, the newest checkpoint when resuming, and the memory plan."""
    ranks = Ranks.start(cfg)
    seed_everything(cfg.train.seed)  # the same LoRA initialisation on every rank
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    with ranks.main_first():  # rank 0 prepares the data (and fills the cache), the others read the cache
        data = prepare_data(cfg, tokenizer)
    if ranks.is_main:
        (run_dir / runs.DATA_REPORT).write_text(json.dumps(data.report.to_dict(), ensure_ascii=False, indent=2),
                                                encoding="utf-8")
    splits = data.splits
    if len(splits["train"]) == 0:
        raise TrainingError(f"no training sample in {cfg.data.paths}; `qwen-daemon data check` shows why")
    if cfg.launch.strategy == "fsdp" and compute_dtype(cfg, ranks.device) == torch.float16:
        raise TrainingError("launch.strategy fsdp needs bfloat16 or float32 compute and this device computes in "
                            "float16 (model.compute_dtype); use launch.strategy ddp here")
    model = load_model(cfg, ranks.device)
    sharded = cfg.launch.strategy == "fsdp" and torch.distributed.is_initialized()
    if sharded:
        shard_fsdp(model)
    ddp = wrap_ddp(model, ranks.device) if ranks.world_size > 1 and not sharded else None
    optimizer = make_optimizer(model, cfg)
    state = initial_batch(cfg, ranks.world_size)
    sinks = Sinks(JsonlSink(run_dir), TensorBoardSink(run_dir), LogSink(), *extra_sinks) if ranks.is_main else Sinks()
    r = Run(cfg, run_dir, ranks.device, model, optimizer, None, tokenizer, splits, state, 0, sinks, controls, ranks,
            ddp=ddp, sharded=sharded, flat=flattened(cfg, ranks.device), autocast=not cfg.model.fused_lora,
            guard=Guard(cfg.train.on_anomaly))
    inject_faults(r)
    r.scaler = torch.amp.GradScaler(ranks.device.type, enabled=compute_dtype(cfg, ranks.device) == torch.float16)
    r.total_steps = total_steps(r)
    r.scheduler = make_scheduler(optimizer, cfg, r.total_steps)
    resumed = resume and restore(r)
    r.state.processes = ranks.world_size
    apply_restart_batch(r)
    fitting.at_setup(r, resumed)
    return r


# --- one optimizer step ---------------------------------------------------------------------------

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
    counted = [c for c, w in zip(collated, weights) if w]
    # The loss is normalised by the whole step's label tokens on all ranks.
    label_tokens, tokens = map(int, r.ranks.sum(sum(c["num_label_tokens"] for c in counted),
                                                sum(c["num_tokens"] for c in counted)))
    total = torch.zeros((), device=r.device)
    failed: torch.OutOfMemoryError | None = None
    busy = 0.0  # this rank's own compute time, for the straggler watch
    for i, batch in enumerate(collated):
        last = i == len(collated) - 1
        if last:
            # Before the micro-batch whose backward synchronises the ranks (DDP's all-reduce),
            # every rank learns whether any rank ran out of memory in the ones before; then all
            # recover the same way and redo the step. An OOM inside this last micro-batch cannot
            # be agreed (the others are in the all-reduce): see leave_batch_for_restart.
            [anyone_failed] = r.ranks.sum(failed is not None)
            if anyone_failed:
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
                raise  # nobody to agree with: optimizer_step recovers at once
            if last or r.sharded:  # the others wait in a collective (DDP's all-reduce, FSDP's
                raise SynchronisedOOM(str(e)) from e  # gathers): no agreement possible
            failed = e
    r.busy = busy
    [loss] = r.ranks.sum(total.item())  # the step's loss over all ranks
    return loss, tokens


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


# --- telemetry and the guard ----------------------------------------------------------------------

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


def gpu_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"gpu_allocated": torch.cuda.memory_allocated(device) / 2**30,
            "gpu_reserved": torch.cuda.memory_reserved(device) / 2**30,
            "gpu_peak": torch.cuda.max_memory_allocated(device) / 2**30}


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


# --- fault injection (tests) ----------------------------------------------------------------------

def inject_faults(r: Run) -> None:
    """The faults that INJECT_*_ENV ask for, into the first worker group only."""
    if os.environ.get(RESTARTS_ENV, "0") != "0":
        return
    r.injected_oom = parse_injected_oom(os.environ.get(INJECT_OOM_ENV, ""), r.rank)
    r.injected_hang = parse_injected_oom(os.environ.get(INJECT_HANG_ENV, ""), r.rank)
    r.injected_nan = {step + k for step, times in parse_injected_oom(os.environ.get(INJECT_NAN_ENV, "")).items()
                      for k in range(times)}


def maybe_inject_oom(r: Run, micro_batch: int) -> None:
    step = r.state.step + 1
    if micro_batch == 0 and r.injected_hang.get(step, 0) > 0:
        log.warning("rank %d stops answering at step %d (%s)", r.rank, step, INJECT_HANG_ENV)
        time.sleep(10**6)
    if micro_batch == 0 and r.injected_oom.get(step, 0) > 0:
        r.injected_oom[step] -= 1
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_OOM_ENV} at step {step})")


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
