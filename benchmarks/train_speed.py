"""Training speed on one GPU: our engine, the seeds' recipe (HF Trainer) and Unsloth, side by side.

    python3 benchmarks/train_speed.py --rounds 3 --out DIR     # every engine, interleaved rounds
    python3 benchmarks/train_speed.py --engine ours --batches 4,16   # one engine in this process

All train LoRA r=16 on the 7 projections of a 4-bit NF4 (double-quantised) model with bf16 compute
and every decoder layer recomputed (gradient checkpointing), on the same random tokens (seq 2048,
every token trained), clip 1.0, on `builtin:random-qwen3-4b` (Qwen3-4B's exact architecture,
random weights: speed and memory do not depend on the values):
- ours: the engine's own step (loop.optimizer_step: fused LoRA, liger kernels) with its default
  optimizer (torch AdamW) and LoRA dropout 0; `ours-offload` keeps the recomputed layers' inputs in
  host memory (Unsloth's setting), `ours-offload-8bit` also takes Unsloth's optimizer (paged 8-bit
  AdamW, whose state lies outside torch's count; run it alone: `--variants ours-offload-8bit`);
  `ours-auto` is the same micro-batch with the memory plan's
  choice of recomputed layers and offload (what train.grad_checkpointing: auto does);
- hf: the seeds' recipe: HF Trainer, peft's prepare_model_for_kbit_training, paged 8-bit AdamW,
  LoRA dropout 0.05 (micro-batch 4 only, as its memory allows little more);
- unsloth: FastLanguageModel (its fused LoRA kernels, use_gradient_checkpointing="unsloth", which
  offloads the checkpointed inputs), LoRA dropout 0, paged 8-bit AdamW, in a plain loop
  (../shared/tools/unsloth-bench's harness, with several micro-batches per process).
Each engine runs in its own process per round, the rounds interleave the engines, and the report
is the median over rounds. Tokens/s counts real tokens only; memory is torch's peak allocated over
the timed steps. MFU counts 6 x parameters + causal attention FLOPs per token against the GPU's
dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def samples_for(workload: str, cfg, tokenizer, n_random: int, seq: int) -> list[dict]:
    import torch

    if workload == "random":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 151643, (n_random, seq), generator=g)
        return [{"input_ids": row.tolist(), "prompt_len": 0} for row in ids]
    from qwen_daemon.train.data import prepare_data

    ds = prepare_data(cfg, tokenizer).splits["train"]
    return [{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]} for r in ds]


def ours(args) -> None:
    """Our engine: one model, each micro-batch with every layer recomputed, then with the plan."""
    import datasets
    import torch

    from qwen_daemon.train import loop, memory
    from qwen_daemon.train.checkpoint import TrainState
    from qwen_daemon.train.checkpointing import set_checkpointing
    from qwen_daemon.train.controls import Controls
    from qwen_daemon.train.model import flattened, load_model, load_tokenizer
    from qwen_daemon.train.sinks import Sinks
    from shared.config import load_config

    cfg = load_config(REPO / "configs" / "qwen3-4b-thinking.yaml",
                      [f"model.name_or_path={args.model}", f"data.max_seq_len={args.seq}", "lora.dropout=0.0"])
    device = torch.device("cuda", 0)
    tokenizer = load_tokenizer(args.model)
    model = load_model(cfg, device)
    optimizer = loop.make_optimizer(model, cfg)
    rows = (args.steps + args.warmup) * max(args.batches) + 1
    ds = datasets.Dataset.from_list([{**s, "num_tokens": len(s["input_ids"])}
                                     for s in samples_for("random", cfg, tokenizer, rows, args.seq)])
    r = loop.Run(cfg, Path(tempfile.mkdtemp()), device, model, optimizer, None, tokenizer, {"train": ds},
                 TrainState(), 10**6, Sinks(), Controls(), flat=flattened(cfg, device), autocast=False)
    layers = model.config.num_hidden_layers
    fitted = None
    for variant in args.variants:
        for batch in args.batches:
            plan = None
            if variant == "ours-offload-8bit" and cfg.train.optimizer != "adamw_8bit":  # (alone in a process:
                cfg.train.optimizer = "adamw_8bit"  # no torch AdamW state allocated before it)
                r.optimizer = loop.make_optimizer(model, cfg)
            if variant != "ours-auto":
                set_checkpointing(model, layers, offload=variant.startswith("ours-offload"))
            else:
                if fitted is None:
                    fitted, _ = memory.probe(lambda n: loop.probe_step(r, n), lambda k: set_checkpointing(model, k),
                                             layers, model.config.hidden_size * 2, args.seq, device)
                plan = memory.choose(fitted, memory.budget(device, cfg.train.memory_headroom), args.seq, batch,
                                     micro_batch_size=batch)
                set_checkpointing(model, plan.checkpointed, plan.offload)
            r.state = TrainState(micro_batch_size=batch, grad_accum=1)
            step_s, tokens = timed_steps(r, batch, args)
            emit(args, variant, batch, step_s, tokens, plan=plan.to_dict() if plan else None)


def timed_steps(r, batch: int, args) -> tuple[list[float], list[int]]:
    import torch

    from qwen_daemon.train import loop

    units = r.units(0)
    times, tokens = [], []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, n = loop.optimizer_step(r, units)
        torch.nn.utils.clip_grad_norm_(loop.trainable(r.model), 1.0)
        r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n)
    return times, tokens


def emit(args, engine: str, batch: int, step_s: list[float], tokens: list[int], **extra) -> None:
    import torch

    print(json.dumps({"engine": engine, "batch": batch, "seq": args.seq, "tokens_per_s": sum(tokens) / sum(step_s),
                      "step_s": [round(t, 3) for t in step_s], "mfu": mfu(sum(tokens) / sum(step_s), args.seq),
                      "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                      "gpu": torch.cuda.get_device_name(0), **extra}), flush=True)


def mfu(tokens_per_s: float, seq: int, peak_flops: float = 989e12) -> float:
    """Model FLOPs utilisation of Qwen3-4B: 6 x (linear + head parameters) per token plus causal
    attention (6 x layers x seq x query width), no recompute counted."""
    hidden, layers, heads, head_dim, kv, inter, vocab = 2560, 36, 32, 128, 8, 9728, 151936
    linear = layers * (2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * inter)
    per_token = 6 * (linear + hidden * vocab) + 6 * layers * seq * heads * head_dim
    return round(tokens_per_s * per_token / peak_flops, 3)


def unsloth(args) -> None:
    """Unsloth (imported first, so that its patches apply) on our random model's weights."""
    import unsloth as _unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    import bitsandbytes as bnb
    import torch

    model_dir = unsloth_model_dir(args.model)
    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=args.seq, load_in_4bit=True,
                                                 dtype=torch.bfloat16, local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, random_state=0, use_gradient_checkpointing="unsloth",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    FastLanguageModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW8bit(params, lr=2e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 151643, ((args.steps + args.warmup) * max(args.batches) + 1, args.seq), generator=g)
    for batch in args.batches:
        times, tokens = [], []
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ids = data[step * batch:(step + 1) * batch].cuda()
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                tokens.append(ids.numel())
        emit(args, "unsloth", batch, times, tokens, version=getattr(_unsloth, "__version__", None))


def unsloth_model_dir(model: str) -> str:
    """Our builtin model's weights (linked) with the unsloth harness's word-level tokenizer, which
    Unsloth's tokenizer checks accept."""
    from qwen_daemon.train.builtin import resolve_model_path

    source, target = Path(resolve_model_path(model)), Path(tempfile.gettempdir()) / "unsloth-random-qwen3-4b"
    target.mkdir(exist_ok=True)
    for f in source.iterdir():
        if f.suffix in (".safetensors", ".json") and not f.name.startswith(("tokenizer", "special_tokens")) \
                and not (target / f.name).exists():
            (target / f.name).symlink_to(f)
    if not (target / "tokenizer.json").exists():
        sys.path.insert(0, str(REPO / ".unsloth-bench"))
        from bench_unsloth import build_tokenizer

        build_tokenizer(str(target))
    return str(target)


def run_hf(cfg, tokenizer, samples, batch: int, steps: int, warmup: int) -> dict:
    """The seeds' recipe: HF Trainer, peft's prepare_model_for_kbit_training, paged_adamw_8bit."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from qwen_daemon.train.builtin import resolve_model_path

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model.name_or_path), quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map={"": 0}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=cfg.lora.target_modules))
    real_tokens: list[int] = []
    model.register_forward_pre_hook(lambda m, a, kw: real_tokens.append(int(kw["attention_mask"].sum())),
                                    with_kwargs=True)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            if state.global_step == warmup:
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    rows = [{"input_ids": s["input_ids"], "attention_mask": [1] * len(s["input_ids"]),
             "labels": [-100] * s["prompt_len"] + s["input_ids"][s["prompt_len"]:]} for s in samples]
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=1, max_steps=warmup + steps, learning_rate=2e-4,
                             bf16=True, gradient_checkpointing=True, optim="paged_adamw_8bit", logging_steps=1000,
                             save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[Clock()])
    trainer.train()
    timed_tokens = sum(real_tokens[warmup:warmup + steps])
    return {"tokens_per_s": timed_tokens / sum(times[warmup:]), "real_tokens": timed_tokens,
            "seconds": sum(times[warmup:]), "micro_batch_size": batch}


def hf(args) -> None:
    import torch

    from qwen_daemon.train.model import load_tokenizer
    from shared.config import load_config

    cfg = load_config(REPO / "configs" / "qwen3-4b-thinking.yaml",
                      [f"model.name_or_path={args.model}", f"data.max_seq_len={args.seq}"])
    tokenizer = load_tokenizer(args.model)
    for batch in args.batches:
        samples = samples_for("random", cfg, tokenizer, (args.steps + args.warmup) * batch, args.seq)
        result = run_hf(cfg, tokenizer, samples, batch, args.steps, args.warmup)
        per_step = result["real_tokens"] / args.steps
        emit(args, "hf", batch, [result["seconds"] / args.steps] * args.steps, [int(per_step)] * args.steps)
        del result
        torch.cuda.empty_cache()


def drive(args) -> None:
    """Every engine in its own process, round after round; then medians and ratios."""
    import statistics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for round_no in range(args.rounds):
        for engine in args.engines:
            batches = [b for b in args.batches if engine != "hf" or b <= 4]
            cmd = [sys.executable, __file__, "--engine", engine, "--model", args.model, "--seq", str(args.seq),
                   "--batches", ",".join(map(str, batches)), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--variants", ",".join(args.variants)]
            env = dict(os.environ)
            if engine == "unsloth" and args.unsloth_site:
                # Unsloth's wheels first (its datasets and trl), ours after them, then the repo
                env["PYTHONPATH"] = os.pathsep.join(p for p in [args.unsloth_site, env.get("PYTHONPATH"), str(REPO)] if p)
            started = time.time()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                lines = records(done.stdout)
                error = None if done.returncode == 0 else done.stderr[-2000:]
            except subprocess.TimeoutExpired as e:
                lines, error = records((e.stdout or b"").decode()), f"timeout after {args.timeout} s"
            for line in lines:
                results.append({**line, "round": round_no})
            record = {"round": round_no, "engine": engine, "seconds": round(time.time() - started), "results": lines,
                      **({"error": error} if error else {})}
            print(json.dumps(record), flush=True)
            with open(out / "speed.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
    table = {}
    for r in results:
        table.setdefault((r["engine"], r["batch"]), []).append(r)
    summary = {}
    for (engine, batch), rs in sorted(table.items()):
        tps = [r["tokens_per_s"] for r in rs]
        summary[f"{engine}@{batch}"] = {"runs": len(rs), "tokens_per_s": [round(t) for t in tps],
                                        "median": round(statistics.median(tps)),
                                        "mfu": mfu(statistics.median(tps), args.seq),
                                        "peak_allocated_gib": statistics.median(r["peak_allocated_gib"] for r in rs),
                                        **({"plan": rs[-1]["plan"]} if rs[-1].get("plan") else {})}
    hf4 = summary.get("hf@4", {}).get("median")
    for key, row in summary.items():
        batch = key.split("@")[1]
        uns = summary.get(f"unsloth@{batch}", {}).get("median")
        if hf4:
            row["vs_hf_mb4"] = round(row["median"] / hf4, 2)
        if uns:
            row["vs_unsloth"] = round(row["median"] / uns, 2)
    print(json.dumps({"summary": summary}, indent=1), flush=True)
    (out / "speed-summary.json").write_text(json.dumps(summary, indent=1))


def records(stdout: str) -> list[dict]:
    """The result lines of an engine's output (libraries print other lines, some of them dicts)."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith('{"engine"')]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["ours", "hf", "unsloth"])
    p.add_argument("--engines", default="ours,hf,unsloth")
    p.add_argument("--model", default="builtin:random-qwen3-4b")
    p.add_argument("--batches", default="4,16")
    p.add_argument("--variants", default="ours,ours-offload,ours-auto", help="of our engine")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=int, default=240, help="seconds per engine process")
    p.add_argument("--unsloth-site", default=os.environ.get("UNSLOTH_SITE"),
                   help="where Unsloth's wheels are installed (.unsloth-bench/run.sh's /tmp/usite)")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.engines = args.engines.split(",")
    args.variants = args.variants.split(",")
    if args.engine:
        {"ours": ours, "hf": hf, "unsloth": unsloth}[args.engine](args)
    else:
        drive(args)


if __name__ == "__main__":
    main()
