"""One-process lab on a GPU: where a step's time goes and what each engine change buys.

    python3 benchmarks/engine_lab.py --out DIR [--only timing,memory,long]

Loads `builtin:random-qwen3-4b` once (4-bit NF4, LoRA r=16 on all 7 projections, paged 8-bit
AdamW, liger) and runs, switching the engine's options in place:
- timing: the loop's own step (loop.optimizer_step + clip + optimizer step) on random tokens at
  seq 2048: peft's layers vs the fused ones, dropout, recompute all / some / no layers, offload,
  masked SDPA vs varlen on packed rows; a torch profile of the old and the new step;
- memory: the memory probe (memory.probe) and the measured peak of a real forward + backward at
  2k..128k tokens and micro-batch 1..32, against the prediction;
- long: one training step at 131,072 tokens under an 80 GB cap.
Every result is a JSON line on stdout and in DIR/lab.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--only", default="check,timing,memory,long", help="also: attn, host")
    p.add_argument("--model", default="builtin:random-qwen3-4b")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the timing parts (no memory figures)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(args.model, out, args.device)
    for part in args.only.split(","):
        getattr(lab, part)()


class Lab:
    def __init__(self, model_name: str, out: Path, device: str = "cuda"):
        import datasets  # noqa: F401 - fail early
        import torch

        from qwen_daemon.train import loop
        from qwen_daemon.train.model import load_model, load_tokenizer
        from shared.config import load_config

        self.out = out
        self.torch = torch
        self.cuda = device == "cuda"
        self.loop = loop
        self.device = torch.device(device, 0) if device == "cuda" else torch.device(device)
        self.cfg = load_config(REPO / "configs" / "qwen3-4b-thinking.yaml", [
            f"model.name_or_path={model_name}", "data.max_seq_len=2048", "lora.dropout=0.05",
            "train.micro_batch_size=4", "train.grad_accum=1", "model.attn_implementation=sdpa"])
        started = time.time()
        self.tokenizer = load_tokenizer(model_name)
        self.model = load_model(self.cfg, self.device)
        self.optimizer = loop.make_optimizer(self.model, self.cfg)
        self.autocast = False
        self.emit({"kind": "setup", "load_s": round(time.time() - started, 1), "torch": torch.__version__,
                   **({"gpu": torch.cuda.get_device_name(0), "allocated_gib": torch.cuda.memory_allocated() / GIB}
                      if self.cuda else {}), **versions()})

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self, reserved: bool = False) -> float:
        if not self.cuda:
            return 0.0
        cuda = self.torch.cuda
        return (cuda.max_memory_reserved() if reserved else cuda.max_memory_allocated()) / GIB

    def emit(self, record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        with open(self.out / "lab.jsonl", "a") as f:
            f.write(line + "\n")

    # --- switches -------------------------------------------------------------------------------

    def configure(self, *, fused_on: bool = True, dropout: float = 0.0, checkpointed: int | None = None,
                  offload: bool = False, attn: str = "sdpa", autocast: bool | None = None,
                  optimizer: str = "adamw", rms_norm: str = "kernel", qkv: bool = True,
                  recompute: str = "function") -> None:
        from qwen_daemon.train import attention, checkpointing, fused
        from qwen_daemon.train.checkpointing import set_checkpointing
        from qwen_daemon.train.model import own_rms_norm

        if rms_norm in ("kernel", "torch"):  # (kernel: what load_model does)
            own_rms_norm(self.model, kernel=rms_norm == "kernel")
        else:  # liger's, as its Qwen3 patch binds it to every norm (a private helper: a lab only)
            from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module

            for module in self.model.modules():
                if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                    _patch_rms_norm_module(module)

        fused.unfuse(self.model)
        fused.FUSE_QKV = qkv
        if fused_on:
            fused.fuse(self.model)
        checkpointing.ONE_FUNCTION = recompute == "function"
        for m in self.model.modules():
            if isinstance(m, self.torch.nn.Dropout):
                m.p = dropout
        set_checkpointing(self.model, checkpointed, offload)
        self.autocast = (not fused_on) if autocast is None else autocast
        if optimizer != self.cfg.train.optimizer:
            self.cfg.train.optimizer = optimizer
            self.optimizer = self.loop.make_optimizer(self.model, self.cfg)
        if attn == attention.NAME:
            attention.register()
        self.model.get_base_model().config._attn_implementation = attn

    def run_for(self, seq: int, rows: int, packed: bool, attn: str):
        import datasets

        from qwen_daemon.train.checkpoint import TrainState
        from qwen_daemon.train.controls import Controls
        from qwen_daemon.train.sinks import Sinks

        torch = self.torch
        g = torch.Generator().manual_seed(0)
        if packed:  # samples of 64..1024 tokens, packed into rows of seq
            samples = []
            while sum(len(s["input_ids"]) for s in samples) < rows * seq * 0.98:
                n = int(torch.randint(64, min(seq, 1024) + 1, (1,), generator=g))
                samples.append({"input_ids": torch.randint(0, 151643, (n,), generator=g).tolist(), "prompt_len": 0})
        else:
            ids = torch.randint(0, 151643, (rows, seq), generator=g)
            samples = [{"input_ids": row.tolist(), "prompt_len": 0} for row in ids]
        ds = datasets.Dataset.from_list([{**s, "num_tokens": len(s["input_ids"])} for s in samples])
        cfg = self.cfg.model_copy(deep=True)
        cfg.data.max_seq_len = seq
        r = self.loop.Run(cfg, Path(tempfile.mkdtemp()), self.device, self.model, self.optimizer, None,
                          self.tokenizer, {"train": ds}, TrainState(micro_batch_size=1, grad_accum=1), 10**6,
                          Sinks(), Controls(), flat=attn == "sdpa_varlen", autocast=self.autocast)
        return r

    # --- parts ----------------------------------------------------------------------------------

    def check(self) -> None:
        """The new paths against the old on the GPU: loss and LoRA gradients of one micro-batch."""
        self.compare("control-same-twice", dict(), dict())
        self.compare("fused-vs-peft", dict(fused_on=False, autocast=True), dict())
        self.compare("autocast-off", dict(autocast=True), dict())
        self.compare("offload", dict(), dict(offload=True))
        self.compare("recompute-function-vs-torch", dict(recompute="torch"), dict())
        self.compare("qkv-vs-three", dict(qkv=False), dict())
        self.compare("norm-kernel-vs-torch", dict(rms_norm="torch"), dict())
        self.compare("mask-vs-unpacked", dict(), dict(), packed=(False, True))
        self.compare("varlen-vs-unpacked", dict(), dict(attn="sdpa_varlen"), packed=(False, True))

    def compare(self, name: str, old: dict, new: dict, packed=(False, False)) -> None:
        try:
            results = []
            for switches, pack in zip((old, new), packed):
                self.configure(**switches)
                r = self.run_for(1024, 3, packed=True, attn=switches.get("attn", "sdpa"))
                r.cfg.data.packing = pack or switches.get("attn") == "sdpa_varlen"
                units = r.units(0)
                self.torch.manual_seed(0)
                self.model.zero_grad(set_to_none=True)
                loss, _ = self.loop.forward_backward(r, [units])
                results.append((loss, {n: p.grad.float().clone() for n, p in self.model.named_parameters()
                                       if p.requires_grad and p.grad is not None}, len(units)))
            self.model.zero_grad(set_to_none=True)
            (l0, g0, u0), (l1, g1, u1) = results
            rel = sorted(((g1[n] - g0[n]).norm() / g0[n].norm()).item() for n in g0 if g0[n].norm() > 0)
            rec = {"kind": "check", "name": name, "loss_old": l0, "loss_new": l1, "units": [u0, u1],
                   "grads": len(rel), "rel_grad_diff_median": rel[len(rel) // 2], "rel_grad_diff_max": rel[-1]}
        except Exception as e:  # noqa: BLE001
            rec = {"kind": "check", "name": name, "error": f"{type(e).__name__}: {e}"[:500],
                   "traceback": traceback.format_exc()[-1500:]}
        self.emit(rec)

    def timed(self, name: str, seq: int = 2048, mbs: int = 4, steps: int = 3, warmup: int = 1, packed: bool = False,
              profile: bool = False, **switches) -> dict | None:
        torch = self.torch
        attn = switches.get("attn", "sdpa")
        try:
            self.configure(**switches)
            r = self.run_for(seq, mbs * (steps + warmup) + 1, packed, attn)
            r.state.micro_batch_size = mbs
            units = r.units(0)
            times, tokens = [], []
            prof = None
            for step in range(warmup + steps):
                if step == warmup:
                    self.sync()
                    self.reset_peak()
                    if profile:
                        from torch.profiler import ProfilerActivity, profile as torch_profile
                        prof = torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.cuda)
                        prof.__enter__()
                started = time.perf_counter()
                _, n = self.loop.optimizer_step(r, units)
                torch.nn.utils.clip_grad_norm_(self.loop.trainable(self.model), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.sync()
                if step >= warmup:
                    times.append(time.perf_counter() - started)
                    tokens.append(n)
            if prof is not None:
                prof.__exit__(None, None, None)
                self.write_profile(name, prof, sum(times))
            rec = {"kind": "timed", "name": name, "seq": seq, "mbs": mbs, **switches,
                   "tokens_per_s": round(sum(tokens) / sum(times)), "step_s": [round(t, 3) for t in times],
                   "peak_gib": round(self.peak(), 2), "reserved_gib": round(self.peak(reserved=True), 2)}
        except Exception as e:  # noqa: BLE001 - a lab: record and go on
            rec = {"kind": "timed", "name": name, "error": f"{type(e).__name__}: {e}"[:500],
                   "traceback": traceback.format_exc()[-1500:]}
            self.model.zero_grad(set_to_none=True)
            if self.cuda:
                torch.cuda.empty_cache()
        self.emit(rec)
        return rec

    def write_profile(self, name: str, prof, wall: float) -> None:
        events = prof.key_averages()
        sort = "self_cuda_time_total"
        try:
            table = events.table(sort_by=sort, row_limit=30, max_name_column_width=70)
        except Exception:  # noqa: BLE001 - newer torch names it device
            sort = "self_device_time_total"
            table = events.table(sort_by=sort, row_limit=30, max_name_column_width=70)
        gpu = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events
                  if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)) / 1e6
        cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
        (self.out / f"profile-{name}.txt").write_text(f"wall {wall:.3f} s\n{table}\n\nby CPU time\n{cpu_table}")
        self.emit({"kind": "profile", "name": name, "wall_s": round(wall, 3), "gpu_kernel_s": round(gpu, 3)})

    def timing(self) -> None:
        t = self.timed
        t("peft-8bit", fused_on=False, dropout=0.05, optimizer="adamw_8bit")
        t("fused", profile=True)
        t("fused-autocast", autocast=True)
        t("fused-8bit", optimizer="adamw_8bit")
        for mbs in (2, 8):
            t(f"fused-mb{mbs}", mbs=mbs)
        t("fused-mb16", mbs=16, steps=2)
        t("fused-k0", checkpointed=0)
        t("fused-k18", checkpointed=18)
        t("fused-mb16-k18", mbs=16, steps=2, checkpointed=18)
        t("fused-mb8-k0", mbs=8, steps=2, checkpointed=0)
        t("fused-offload", offload=True)
        t("fused-mb16-offload", mbs=16, steps=2, offload=True)
        t("packed-varlen", packed=True, attn="sdpa_varlen")

    def attn(self) -> None:
        """SDPA per row against sdpa_varlen on one flattened row (what attn_implementation: auto
        picks on a GPU), one sample per row, every layer recomputed, inputs kept or offloaded;
        two interleaved rounds, then a profile of each at micro-batch 4, offloaded."""
        for round_ in range(2):
            for mbs in (4, 16):
                for offload in (False, True):
                    for attn in ("sdpa", "sdpa_varlen"):
                        self.timed(f"attn-{attn}-mb{mbs}{'-offload' * offload}-r{round_}", mbs=mbs,
                                   steps=3 if mbs == 4 else 2, offload=offload, attn=attn)
        for attn in ("sdpa", "sdpa_varlen"):
            self.timed(f"profile-{attn}-offload", offload=True, attn=attn, profile=True)

    def host(self) -> None:
        """The host's share of the step: liger's RMSNorm (a Triton launch from Python) against
        torch's fused F.rms_norm, inputs offloaded, the 4B job's attention; two interleaved rounds,
        then a profile."""
        for round_ in range(2):
            for mbs in (4, 16):
                for norm in ("liger", "torch"):
                    self.timed(f"norm-{norm}-mb{mbs}-r{round_}", mbs=mbs, steps=3 if mbs == 4 else 2,
                               offload=True, attn="sdpa_varlen", rms_norm=norm)
        self.timed("profile-torch-norm-offload", offload=True, attn="sdpa_varlen", rms_norm="torch", profile=True)

    def step(self) -> None:
        """The third session's changes: each checkpointed layer as one function (`Recomputed`)
        against torch's checkpoint, q/k/v in one function against three; every layer recomputed,
        inputs kept and offloaded; two interleaved rounds, then profiles at micro-batch 4 and 16."""
        variants = {"old": dict(recompute="torch", qkv=False), "function": dict(qkv=False),
                    "qkv": dict(recompute="torch"), "new": dict()}
        for round_ in range(2):
            for mbs in (4, 16):
                for offload in (False, True):
                    for name, switches in variants.items():
                        self.timed(f"step-{name}-mb{mbs}{'-offload' * offload}-r{round_}", mbs=mbs,
                                   steps=3 if mbs == 4 else 2, offload=offload, attn="sdpa_varlen", **switches)
        for mbs in (4, 16):
            self.timed(f"profile-new-offload-mb{mbs}", mbs=mbs, steps=2, offload=True, attn="sdpa_varlen",
                       profile=True)

    def norm_step(self) -> None:
        """Our RMSNorm kernel against torch's F.rms_norm in the step, every layer recomputed,
        inputs offloaded (Unsloth's setting) and kept; two interleaved rounds."""
        for round_ in range(2):
            for mbs in (4, 16):
                for offload in (True, False):
                    for norm in ("torch", "kernel"):
                        self.timed(f"norm-{norm}-mb{mbs}{'-offload' * offload}-r{round_}", mbs=mbs,
                                   steps=3 if mbs == 4 else 2, offload=offload, attn="sdpa_varlen", rms_norm=norm)

    def norms(self) -> None:
        """torch's F.rms_norm against liger's kernel on the 4B model's four norms (hidden 2560; q and
        k heads of 128) at micro-batch 4 and 16: GPU time (CUDA events) and host time per call,
        forward + backward of the input (the norms' weights are frozen)."""
        import torch.nn.functional as F
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        from qwen_daemon.train.rmsnorm import RMSNorm

        torch = self.torch
        for tokens in (8192, 32768):
            for rows_per_token, width in ((1, 2560), (32, 128), (8, 128)):
                x = torch.randn(tokens * rows_per_token, width, device=self.device, dtype=torch.bfloat16,
                                requires_grad=True)
                w = torch.ones(width, device=self.device, dtype=torch.bfloat16)
                grad = torch.randn_like(x)
                impls = {"torch": lambda: F.rms_norm(x, (width,), w, 1e-6),
                         "liger": lambda: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
                         "kernel": lambda: RMSNorm.apply(x, w, 1e-6)}
                ref = F.rms_norm(x.detach().float(), (width,), w.float(), 1e-6)
                error = ((RMSNorm.apply(x, w, 1e-6).float() - ref).abs().max() / ref.abs().max()).item()
                self.emit({"kind": "norm-check", "rows": tuple(x.shape), "rel_max_error": error})
                for name, fn in impls.items():
                    for _ in range(3):
                        fn().backward(grad)
                    self.sync()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    n = 50
                    host = time.perf_counter()
                    start.record()
                    for _ in range(n):
                        fn().backward(grad)
                    end.record()
                    host = time.perf_counter() - host
                    self.sync()
                    self.emit({"kind": "norm", "impl": name, "rows": tuple(x.shape), "gpu_us": round(
                        start.elapsed_time(end) * 1000 / n, 1), "host_us": round(host * 1e6 / n, 1)})

    def memory(self) -> None:
        """The probe's model against measured peaks of real forward + backward passes."""
        from qwen_daemon.train import attention, memory
        from qwen_daemon.train.checkpointing import set_checkpointing

        torch = self.torch
        attn = "sdpa_varlen" if attention.varlen_available() else "sdpa"
        self.configure(attn=attn)
        hidden = self.model.config.hidden_size
        layers = self.model.config.num_hidden_layers

        def run_at(seq):
            r = self.run_for(seq, 1, packed=False, attn=attn)
            if attn == "sdpa":
                r.cfg.data.packing = False  # one sample per row: no mask
            return r

        r2k = run_at(2048)
        started = time.time()
        # AdamW's state, unless an earlier part's steps allocated it already
        extra = 0 if self.optimizer.state else 8 * sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        model, figures = memory.probe(lambda n: self.loop.probe_step(r2k, n),
                                      lambda k: set_checkpointing(self.model, k, False), layers, hidden * 2, 2048,
                                      self.device, extra_static=extra)
        self.emit({"kind": "probe", "attn": attn, "seconds": round(time.time() - started, 1), **figures})
        grid = [(2048, 1, 36, False), (2048, 4, 36, False), (2048, 16, 36, False), (2048, 32, 36, False),
                (2048, 4, 0, False), (2048, 16, 18, False), (2048, 16, 36, True), (2048, 32, 18, True),
                (8192, 1, 36, False), (8192, 4, 36, False), (32768, 1, 36, False), (32768, 1, 36, True),
                (65536, 1, 36, True), (65536, 1, 36, False), (2048, 8, 0, False)]
        for seq, mbs, k, off in grid:
            try:
                r = run_at(seq)
                set_checkpointing(self.model, k, off)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                self.loop.probe_step(r, seq * mbs, seed=1)
                torch.cuda.synchronize()
                measured = torch.cuda.max_memory_allocated()
                predicted = model.peak(seq * mbs, k, off)
                self.emit({"kind": "memory", "seq": seq, "mbs": mbs, "checkpointed": k, "offload": off,
                           "measured_gib": round(measured / GIB, 2), "predicted_gib": round(predicted / GIB, 2),
                           "error_pct": round(100 * (predicted / measured - 1), 1),
                           "seconds": round(time.perf_counter() - started, 1)})
            except Exception as e:  # noqa: BLE001
                self.emit({"kind": "memory", "seq": seq, "mbs": mbs, "checkpointed": k, "offload": off,
                           "error": f"{type(e).__name__}: {e}"[:300]})
                self.model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        self.model_fit = model

    def long(self) -> None:
        """131,072 tokens, one sample, under an 80 GB cap: a real training step."""
        from qwen_daemon.train import attention

        torch = self.torch
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 80e9 / total))
        torch.cuda.empty_cache()
        attn = "sdpa_varlen" if attention.varlen_available() else "sdpa"
        rec = self.timed("long-131072-offload", seq=131072, mbs=1, steps=1, warmup=0, offload=True, attn=attn)
        if rec and "error" not in rec and hasattr(self, "model_fit"):
            rec2 = {"kind": "long-predicted", "predicted_gib": round(self.model_fit.peak(131072, 36, True) / GIB, 2),
                    "measured_gib": rec["peak_gib"], "cap_gib": round(80e9 / GIB, 1)}
            self.emit(rec2)


def versions() -> dict:
    out = {}
    for name in ("transformers", "peft", "bitsandbytes", "liger_kernel", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


if __name__ == "__main__":
    main()
