"""Benchmark on one GPU: our engine against the seeds' recipe (HF Trainer + peft + bitsandbytes).

    python benchmarks/train_speed.py                 # all four runs, each in its own process
    python benchmarks/train_speed.py --engine ours --workload random --batch 96   # one run

Both train LoRA r=16 (all attention and MLP projections) on a 4-bit NF4 (double-quantised)
model with bf16 compute, gradient checkpointing and paged 8-bit AdamW, on the same tokens:
- `random`: fixed-length sequences of random token ids (seq 2048), every token trained;
- `bundled`: the bundled data set through the real pipeline (max_seq_len 2048). The recipe pads
  each batch to its longest sample (dynamic padding, better than the seeds' fixed 512); our
  engine packs samples into 2048-token rows.
Only real (non-padding) tokens count. The model is `builtin:random-qwen3-4b` (Qwen3-4B's exact
architecture, random weights: speed and memory do not depend on the values). Each run prints one
JSON line; the driver prints them all plus the ratios.
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


def run_ours(cfg, tokenizer, samples, batch: int, steps: int, warmup: int) -> dict:
    import datasets
    import torch

    from qwen_daemon.train import loop
    from qwen_daemon.train.checkpoint import TrainState
    from qwen_daemon.train.controls import Controls
    from qwen_daemon.train.model import load_model
    from qwen_daemon.train.sinks import Sinks

    class Events:
        def __init__(self):
            self.events = []

        def metrics(self, record):
            pass

        def event(self, kind, **data):
            self.events.append({"kind": kind, **data})

        def close(self):
            pass

    device = torch.device("cuda", 0)
    model = load_model(cfg, device)
    optimizer = loop.make_optimizer(model, cfg)
    ds = datasets.Dataset.from_list([{**s, "num_tokens": len(s["input_ids"])} for s in samples])
    events = Events()
    r = loop.Run(cfg, Path(tempfile.mkdtemp()), device, model, optimizer, None, tokenizer, {"train": ds},
                 TrainState(micro_batch_size=batch, grad_accum=1), steps + warmup, Sinks(events), Controls())
    units = r.units(0)
    times, tokens = [], []
    for step in range(warmup + steps):
        if r.state.samples_in_epoch >= len(ds):
            r.state.epoch, r.state.samples_in_epoch, units = r.state.epoch + 1, 0, r.units(r.state.epoch + 1)
        if step == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, n = loop.optimizer_step(r, units)
        torch.nn.utils.clip_grad_norm_(loop.trainable(model), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n)
    return {"tokens_per_s": sum(tokens) / sum(times), "real_tokens": sum(tokens), "seconds": sum(times),
            "micro_batch_size": r.state.micro_batch_size, "events": events.events}


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


def one(args) -> dict:
    import torch

    from shared.config import load_config
    from qwen_daemon.train.model import load_tokenizer

    cfg = load_config(REPO / "configs" / "qwen3-4b-thinking.yaml",
                      [f"model.name_or_path={args.model}", f"data.max_seq_len={args.seq}"])
    tokenizer = load_tokenizer(args.model)
    samples = samples_for(args.workload, cfg, tokenizer, (args.steps + args.warmup) * args.batch, args.seq)
    runner = run_ours if args.engine == "ours" else run_hf
    result = runner(cfg, tokenizer, samples, args.batch, args.steps, args.warmup)
    return {"engine": args.engine, "workload": args.workload, "batch": args.batch, "seq": args.seq,
            "gpu": torch.cuda.get_device_name(0), "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, **result}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", choices=["ours", "hf"])
    p.add_argument("--workload", choices=["random", "bundled"])
    p.add_argument("--model", default="builtin:random-qwen3-4b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    if args.engine:
        print(json.dumps(one(args)), flush=True)
        return
    results = {}
    for workload in ("random", "bundled"):
        for engine in ("hf", "ours"):
            cmd = [sys.executable, __file__, "--engine", engine, "--workload", workload, "--model", args.model,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None
            results[(engine, workload)] = json.loads(line) if line else {"error": out.stderr[-3000:]}
            print(json.dumps(results[(engine, workload)]), flush=True)
    for workload in ("random", "bundled"):
        hf, ours = results[("hf", workload)], results[("ours", workload)]
        if "error" not in hf and "error" not in ours:
            print(json.dumps({"workload": workload, "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
                              "memory_ratio": ours["peak_allocated_gib"] / hf["peak_allocated_gib"]}))


if __name__ == "__main__":
    main()
