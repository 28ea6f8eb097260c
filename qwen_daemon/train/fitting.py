"""The memory plan of a run: micro-batch, recomputed layers and offload, from the probe (memory.py).

`fit(r, reason)` runs at the start of training (and after a resume on another GPU or process
count) when any of train.micro_batch_size, train.grad_checkpointing or train.offload_activations
is auto; `replan(r)` re-chooses the recomputed layers after a batch-size command. The global batch
never changes: the micro-batch is a divisor of the per-process global batch and the accumulation
makes up the rest.
"""

from __future__ import annotations

import logging
import time

import torch

from qwen_daemon.train import memory
from qwen_daemon.train.checkpointing import decoder_layers, set_checkpointing
from shared import batchsize

log = logging.getLogger(__name__)


def is_auto(cfg, device: torch.device) -> bool:
    """Whether anything is left to the plan (offloading only on CUDA, where it exists)."""
    t = cfg.train
    return "auto" in (t.micro_batch_size, t.grad_checkpointing) or (
        t.offload_activations == "auto" and device.type == "cuda")


def at_setup(r, resumed: bool) -> None:
    """The plan at the start of training: fitted on a fresh start; after a resume on the GPU and
    process count it was fitted for, the checkpoint's micro-batch stays (a batch-size command or an
    OOM recovery may have changed it) and only the rest is chosen again; on other hardware all of it."""
    if not is_auto(r.cfg, r.device):
        if r.cfg.train.offload_activations is True:
            set_checkpointing(r.model, None if r.cfg.train.grad_checkpointing else 0, offload=True)
        return
    here = fingerprint(r.device, r.world_size)
    if not resumed:
        fit(r, "start")
    elif r.state.fitted_on in (None, here):
        fit(r, "resumed", refit_batch=r.state.fitted_on is None)
    else:
        fit(r, f"resumed on {here} (fitted on {r.state.fitted_on})")


def fingerprint(device: torch.device, world_size: int) -> str:
    """What a plan was fitted for: the GPU (name and memory) and the number of processes."""
    if device.type != "cuda":
        return f"{device.type} x{world_size}"
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} {props.total_memory / memory.GIB:.0f} GiB x{world_size}"


def fixed_choices(r, micro_batch_size: int | None) -> dict:
    t = r.cfg.train
    layers = len(decoder_layers(r.model))
    return {"micro_batch_size": micro_batch_size,
            "checkpointed": None if t.grad_checkpointing == "auto" else layers if t.grad_checkpointing else 0,
            "offload": None if t.offload_activations == "auto" else bool(t.offload_activations)}


def measure(r) -> tuple[memory.MemoryModel, float, dict]:
    """(model, budget, probe figures): the probe on this GPU, agreed over all ranks (the smallest
    budget, the largest peaks), or a test's stand-in."""
    layers = decoder_layers(r.model)
    standin = memory.standin_model(len(layers))
    if standin is not None:
        return standin[0], standin[1], {"standin": True}
    from qwen_daemon.train.loop import probe_step  # (loop imports this module)

    from qwen_daemon.train.model import compute_dtype

    hidden = r.model.config.hidden_size * torch.finfo(compute_dtype(r.cfg, r.device)).bits // 8
    trainable = sum(p.numel() for p in r.model.parameters() if p.requires_grad)
    # Optimizer state is allocated at the first step, after the probe: AdamW keeps two float32
    # moments per weight (sharded under FSDP), the 8-bit one two bytes in paged memory.
    state_bytes = 8 if r.cfg.train.optimizer == "adamw" or r.sharded else 2
    extra = trainable * state_bytes / (r.world_size if r.sharded else 1)
    started = time.perf_counter()
    model, figures = memory.probe(lambda tokens: probe_step(r, tokens),
                                  lambda k: set_checkpointing(r.model, k, False), len(layers), hidden,
                                  r.cfg.data.max_seq_len, r.device, extra_static=extra)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    budget = memory.budget(r.device, r.cfg.train.memory_headroom)
    if r.world_size > 1:
        t = torch.tensor([-budget, model.static, model.base, model.layer], device=r.device, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        budget = -t[0].item()
        model = memory.MemoryModel(t[1].item(), t[2].item(), t[3].item(), model.input, model.layers)
    return model, budget, figures


def gpu_scale(config) -> float:
    """A decoder layer's matmul work relative to Qwen3-4B's (the speed model is fitted to it)."""
    h, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    work = h * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) + 3 * h * inter
    return work / (2560 * 128 * (2 * 32 + 2 * 8) + 3 * 2560 * 9728)


def fit(r, reason: str, refit_batch: bool = True) -> None:
    """Choose and apply the plan (the micro-batch too if it is auto and `refit_batch`); an event
    says what was chosen and why."""
    s, cfg = r.state, r.cfg
    per_rank = s.micro_batch_size * s.grad_accum
    keep_mbs = None if cfg.train.micro_batch_size == "auto" and refit_batch else s.micro_batch_size
    if r.device.type != "cuda" and memory.standin_model(1) is None:
        # No GPU: no memory to fit. The largest micro-batch of at most PROBE_TOKENS tokens.
        mbs = keep_mbs or max(d for d in batchsize.divisors(per_rank)
                              if d == 1 or d * cfg.data.max_seq_len <= memory.PROBE_TOKENS)
        fixed = fixed_choices(r, mbs)
        plan = memory.Plan(mbs, per_rank // mbs, len(decoder_layers(r.model)) if fixed["checkpointed"] is None
                           else fixed["checkpointed"], False)
        apply(r, plan, reason, None, {})
        return
    model, budget, figures = measure(r)
    r.memory_model, r.memory_budget = model, budget
    host = memory.host_memory_available()
    choices = fixed_choices(r, keep_mbs)
    try:
        plan = memory.choose(model, budget, cfg.data.max_seq_len, per_rank, gpu_scale=gpu_scale(r.model.config),
                             host_bytes=None if host is None else host / 2 / r.world_size, **choices)
    except memory.MemoryPlanError as e:
        # Never refuse what might fit: the smallest plan, a warning, and the OOM recovery as the net.
        mbs = choices["micro_batch_size"] or 1
        k = choices["checkpointed"] if choices["checkpointed"] is not None else model.layers
        off = choices["offload"] if choices["offload"] is not None else k > 0
        plan = memory.Plan(mbs, per_rank // mbs, k, off, model.peak(mbs * cfg.data.max_seq_len, k, off), budget)
        log.warning("%s; trying %s anyway", e, plan.describe(model.layers))
    apply(r, plan, reason, model, figures)


def apply(r, plan: memory.Plan, reason: str, model: memory.MemoryModel | None, figures: dict) -> None:
    s = r.state
    s.micro_batch_size, s.grad_accum = plan.micro_batch_size, plan.grad_accum
    s.checkpointed_layers, s.offload = plan.checkpointed, plan.offload
    s.fitted_on = fingerprint(r.device, r.world_size)
    set_checkpointing(r.model, plan.checkpointed, plan.offload)
    r.plan = plan
    layers = len(decoder_layers(r.model))
    log.info("memory plan (%s): %s", reason, plan.describe(layers))
    r.sinks.event("memory_plan", step=s.step, reason=reason, layers=layers, fitted_on=s.fitted_on,
                  **plan.to_dict(), **({"model": model.to_dict()} if model else {}), probe=figures)


def replan(r) -> dict:
    """After a batch-size command: the recomputed layers (and offload) again for the new micro-batch,
    where they are auto and a memory model exists. Returns what changed."""
    model = getattr(r, "memory_model", None)
    if model is None or (r.cfg.train.grad_checkpointing != "auto" and r.cfg.train.offload_activations != "auto"):
        return {}
    s = r.state
    choices = fixed_choices(r, s.micro_batch_size)
    try:
        plan = memory.choose(model, r.memory_budget, r.cfg.data.max_seq_len, s.micro_batch_size * s.grad_accum,
                             gpu_scale=gpu_scale(r.model.config), **choices)
    except memory.MemoryPlanError:
        k = choices["checkpointed"] if choices["checkpointed"] is not None else model.layers
        plan = memory.Plan(s.micro_batch_size, s.grad_accum, k, choices["offload"] is not False,
                           model.peak(s.micro_batch_size * r.cfg.data.max_seq_len, k, True), r.memory_budget)
    s.checkpointed_layers, s.offload = plan.checkpointed, plan.offload
    set_checkpointing(r.model, plan.checkpointed, plan.offload)
    r.plan = plan
    return {"checkpointed": plan.checkpointed, "offload": plan.offload,
            "predicted_peak": plan.to_dict()["predicted_peak"]}


def check(r) -> None:
    """After the first step of a fitted run: the measured peak against the prediction."""
    plan = getattr(r, "plan", None)
    if plan is None or plan.predicted_peak is None or r.device.type != "cuda":
        return
    measured = torch.cuda.max_memory_allocated(r.device)
    error = 100 * (plan.predicted_peak / measured - 1)
    log.info("memory: peak %.2f GiB, predicted %.2f GiB (%+.1f%%)", measured / memory.GIB,
             plan.predicted_peak / memory.GIB, error)
    r.sinks.event("memory_checked", step=r.state.step, measured_gib=round(measured / memory.GIB, 2),
                  predicted_gib=round(plan.predicted_peak / memory.GIB, 2), error_pct=round(error, 1))
