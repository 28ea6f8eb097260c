"""How much GPU memory a step takes, measured, and the fastest plan that fits.

A short probe on the real model before training (`probe`) measures the peak allocated memory of
forward + backward at two token counts with every decoder layer recomputed, and once with a few
layers kept whole. With varlen attention every activation grows linearly with the tokens of a
micro-batch T. The peak is at the start of the backward, when every kept activation is alive and
the last layer's backward (after its recompute, if it is checkpointed) is running:

    peak(T, k) = static + T * (base + k * input + max(L - k, 1) * layer)

with k of the L decoder layers checkpointed. A checkpointed layer keeps its input hidden state
(`input` bytes per token; with offloading only the few in flight between host and GPU stay); a
whole layer keeps all `layer` bytes per token of its activations, which is also what the layer
whose backward runs at the peak holds. `static` is the weights, the LoRA weights, gradients and
optimizer state; `base` what the loss and the backward's temporaries add per token.

`choose` takes the plan with the highest expected throughput among those predicted to fit a
budget (the GPU's memory less a headroom): the micro-batch (a divisor of the per-process global
batch, so the global batch stays), the number of checkpointed layers and the offload. Expected
throughput counts the recompute and the host's fixed work per micro-batch (`speed`). The OOM
recovery in the loop stays the net under it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from shared import batchsize

GIB = 1 << 30
PROBE_TOKENS = 8192  # the first probe's tokens at most (the second has twice as many)
PROBE_WHOLE_LAYERS = 4  # layers kept whole in the third probe
OFFLOAD_RESIDENT = 3  # offloaded layer inputs still on the GPU at the peak (in flight, prefetched)
STANDIN_ENV = "QWEN_DAEMON_MEMORY_STANDIN"  # tests: "budget_gib,static_gib,base_kib,layer_kib"

# Step time model (see `speed`), fitted to the engine lab's step times on one H200 with Qwen3-4B
# at seq 2048 (docs/benchmarks.md): the host's time per micro-batch and decoder layer, the GPU's per
# token and decoder layer, what recomputing every layer adds to each, and how the two overlap.
HOST_S_PER_LAYER = 0.0081
GPU_S_PER_TOKEN_LAYER = 1.136e-6
HOST_RECOMPUTE = 0.5
GPU_RECOMPUTE = 0.34
OVERLAP_POWER = 3


class MemoryPlanError(RuntimeError):
    """Not even the smallest plan fits; the message says what to change."""


@dataclass(frozen=True)
class MemoryModel:
    static: float  # bytes
    base: float  # bytes per token
    layer: float  # bytes per token of a whole layer's activations
    input: float  # bytes per token of a checkpointed layer's input hidden state
    layers: int

    def peak(self, tokens: int, checkpointed: int, offload: bool = False) -> float:
        inputs = min(checkpointed, OFFLOAD_RESIDENT) if offload else checkpointed
        return self.static + tokens * (self.base + inputs * self.input
                                       + max(self.layers - checkpointed, 1) * self.layer)

    @classmethod
    def from_probes(cls, t1: int, p1: float, t2: int, p2: float, p_whole: float, whole: int, layers: int,
                    input_bytes: float, extra_static: float = 0.0) -> MemoryModel:
        """From peaks p1 at t1 and p2 at t2 tokens (every layer checkpointed, inputs on the GPU)
        and p_whole at t1 with `whole` (>= 2) layers kept whole; `extra_static` is memory the
        probes did not see (optimizer state allocated at the first step)."""
        slope = (p2 - p1) / (t2 - t1)
        # Keeping m layers whole instead of recomputing them adds (m - 1) layers' activations and
        # removes m inputs: the layer at the peak holds its activations either way.
        layer = ((p_whole - p1) / t1 + whole * input_bytes) / (whole - 1)
        base = slope - layers * input_bytes - layer
        return cls(static=p1 - slope * t1 + extra_static, base=max(0.0, base), layer=max(0.0, layer),
                   input=input_bytes, layers=layers)

    def to_dict(self) -> dict:
        return {"static_gib": round(self.static / GIB, 3), "base_kib": round(self.base / 1024, 1),
                "layer_kib": round(self.layer / 1024, 1), "input_kib": round(self.input / 1024, 1),
                "layers": self.layers}


@dataclass(frozen=True)
class Plan:
    micro_batch_size: int
    grad_accum: int
    checkpointed: int  # decoder layers recomputed in the backward
    offload: bool  # their inputs in host memory
    predicted_peak: float | None = None  # bytes
    budget: float | None = None  # bytes

    def describe(self, layers: int) -> str:
        recompute = ("every layer recomputed" if self.checkpointed == layers else
                     "no layer recomputed" if self.checkpointed == 0 else
                     f"{self.checkpointed} of {layers} layers recomputed")
        text = f"micro-batch {self.micro_batch_size} x accumulation {self.grad_accum}, {recompute}"
        if self.offload:
            text += ", their inputs in host memory"
        if self.predicted_peak is not None and self.budget is not None:
            text += f"; predicted peak {self.predicted_peak / GIB:.1f} GiB of a {self.budget / GIB:.1f} GiB budget"
        return text

    def to_dict(self) -> dict:
        return {k: (round(v / GIB, 2) if k in ("predicted_peak", "budget") and v is not None else v)
                for k, v in asdict(self).items()}


def speed(tokens: int, checkpointed: int, layers: int, gpu_scale: float = 1.0) -> float:
    """Expected tokens/s of a micro-batch of `tokens` with `checkpointed` of `layers` recomputed:
    the host launches the work of each layer (a fixed time per micro-batch) while the GPU runs it
    (a time per token); the step takes about the longer of the two, more where they are close
    (a smooth maximum). `gpu_scale` scales the GPU's time per token for layers of another size
    than Qwen3-4B's."""
    share = checkpointed / layers
    host = layers * HOST_S_PER_LAYER * (1 + HOST_RECOMPUTE * share)
    gpu = layers * tokens * GPU_S_PER_TOKEN_LAYER * gpu_scale * (1 + GPU_RECOMPUTE * share)
    return tokens / (host ** OVERLAP_POWER + gpu ** OVERLAP_POWER) ** (1 / OVERLAP_POWER)


def choose(model: MemoryModel, budget: float, seq_len: int, per_rank_batch: int, *,
           micro_batch_size: int | None = None, checkpointed: int | None = None,
           offload: bool | None = None, host_bytes: float | None = None, gpu_scale: float = 1.0) -> Plan:
    """The fastest plan predicted to fit `budget` bytes. `micro_batch_size`, `checkpointed` and
    `offload` fix what the config fixes (None = auto); `host_bytes` bounds what offloading may
    keep in host memory. Raises MemoryPlanError when nothing fits."""
    sizes = [micro_batch_size] if micro_batch_size else batchsize.divisors(per_rank_batch)
    counts = [checkpointed] if checkpointed is not None else range(model.layers + 1)
    offloads = [offload] if offload is not None else [False, True]
    best, best_speed = None, -1.0
    for mbs in sizes:
        tokens = mbs * seq_len
        for k in counts:
            for off in offloads:
                if off and (k == 0 or (host_bytes is not None and k * tokens * model.input > host_bytes)):
                    continue
                peak = model.peak(tokens, k, off)
                # Offloading only when it buys something: among equally fast plans, none.
                value = speed(tokens, k, model.layers, gpu_scale) * (1 - 1e-6 * off)
                if peak <= budget and value > best_speed:
                    best, best_speed = Plan(mbs, per_rank_batch // mbs, k, off, peak, budget), value
    if best is None:
        smallest = min(sizes)
        k = max(counts)
        need = model.peak(smallest * seq_len, k, bool(max(offloads)))
        raise MemoryPlanError(
            f"even micro-batch {smallest} at {seq_len} tokens with {k} of {model.layers} layers recomputed "
            f"{'and their inputs offloaded ' if max(offloads) else ''}needs about {need / GIB:.1f} GiB, more than "
            f"the {budget / GIB:.1f} GiB budget. Lower data.max_seq_len or train.memory_headroom, set "
            "train.grad_checkpointing / train.offload_activations to auto, or use a larger GPU")
    return best


def standin_model(layers: int) -> tuple[MemoryModel, float] | None:
    """(model, budget) from QWEN_DAEMON_MEMORY_STANDIN, for tests on machines without a GPU."""
    spec = os.environ.get(STANDIN_ENV)
    if not spec:
        return None
    budget, static, base, layer = (float(x) for x in spec.split(","))
    return MemoryModel(static * GIB, base * 1024, layer * 1024, 5 * 1024, layers), budget * GIB


def budget(device, headroom: float) -> float:
    """Bytes this process may allocate at its peak: what it holds plus what is free (within
    torch's per-process memory fraction, if one is set), less `headroom` of the GPU's memory."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    mine = torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    available = min(free + mine, fraction * total)
    return available - headroom * total


def host_memory_available() -> float | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def probe(step, set_checkpointed, layers: int, input_bytes: float, seq_len: int, device,
          extra_static: float = 0.0) -> tuple[MemoryModel, dict]:
    """Measure the memory model on this GPU: `step(tokens)` runs forward + backward of a
    micro-batch of that many tokens (and drops the gradients), `set_checkpointed(k)` recomputes
    the first k layers. Returns the model and the probes' figures. An out-of-memory probe is
    retried with half the tokens."""
    import torch

    def peak(tokens: int, checkpointed: int) -> float:
        set_checkpointed(checkpointed)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(tokens)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device))

    whole = min(PROBE_WHOLE_LAYERS, layers)
    if whole < 2:
        raise MemoryPlanError(f"the memory probe needs a model of at least 2 decoder layers, this one has {layers}")
    t1 = min(seq_len, PROBE_TOKENS)
    while True:
        try:
            peak(min(256, t1), layers)  # warm-up: kernels compiled, workspaces allocated
            p1, p2 = peak(t1, layers), peak(2 * t1, layers)
            p_whole = peak(t1, layers - whole)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            if t1 <= 256:
                raise MemoryPlanError("out of memory while measuring a micro-batch of 256 tokens; free the GPU or "
                                      "use a larger one") from None
            t1 //= 2
    set_checkpointed(layers)
    model = MemoryModel.from_probes(t1, p1, 2 * t1, p2, p_whole, whole, layers, input_bytes, extra_static)
    figures = {"tokens": [t1, 2 * t1], "peaks_gib": [round(p1 / GIB, 3), round(p2 / GIB, 3)],
               "whole_layers": whole, "whole_peak_gib": round(p_whole / GIB, 3), **model.to_dict()}
    return model, figures
