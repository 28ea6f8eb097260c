"""Benchmark: the training loop on 1..N processes (torchrun), DDP or FSDP, on synthetic data.

    python benchmarks/multi_gpu.py --runs 1:ddp,2:ddp,2:fsdp        # on a machine with 2 GPUs
    python benchmarks/multi_gpu.py --runs 1:ddp,1:fsdp --model builtin:tiny-qwen3 --steps 4   # CPU check

Each run is `train()` under `torch.distributed.run --nproc-per-node=P` (FSDP also on one process,
so that its own cost shows), with the real config of the 4B job (`configs/qwen3-4b-thinking.yaml`:
4-bit NF4, LoRA r=16 on every projection, seq 2048 packed, micro-batch 4 x accumulation 4 per
process) on `builtin:random-qwen3-4b` (Qwen3-4B's exact architecture, random weights) and
synthetic Chinese Q&A records (benchmarks/prepare_data.py). Only real tokens count; the first
`--warmup` steps are left out. Prints one JSON line per run, then the scaling efficiency
tokens/s(P) / (P x tokens/s(1)) of each strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(run: Path) -> None:
    """One rank (under torchrun): train, then leave this rank's peak memory next to the metrics."""
    import torch

    from qwen_daemon.train.loop import train
    from shared.config import load_config

    train(load_config(run / "config.yaml"), run)
    rank = int(os.environ.get("RANK", 0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    (run / f"peak-rank{rank}.json").write_text(json.dumps({"peak_gib": peak}))


def measure(root: Path, data: Path, processes: int, strategy: str, args) -> dict:
    from qwen_daemon.launch import child_env
    from shared.config import load_config

    run = root / f"{processes}-{strategy}"
    run.mkdir()
    cfg = load_config(REPO / "configs" / "qwen3-4b-thinking.yaml", [
        f"model.name_or_path={args.model}", "model.tokenizer=builtin:qwen3-tokenizer", f"data.paths=[{data}]",
        f"data.terms={REPO / 'data' / 'crypto_terms.tsv'}", f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch}", f"train.grad_accum={args.grad_accum}",
        "train.global_batch_size=null", "train.grad_checkpointing=true", "train.offload_activations=false",
        "train.eval_every_steps=100000", "checkpoint.every_steps=100000", "train.inference_check_tokens=0",
        f"launch.strategy={strategy}", f"launch.num_processes={processes}", f"run.runs_root={root}"])
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    __file__, "--worker", str(run)], check=True, env=child_env())
    steps = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if m["kind"] == "train"][args.warmup:]
    return {"processes": processes, "strategy": strategy, "steps": len(steps),
            "global_batch": steps[-1]["micro_batch_size"] * steps[-1]["grad_accum"] * processes,
            "tokens_per_s": round(sum(m["tokens"] for m in steps) / sum(m["step_time"] for m in steps)),
            "step_time_s": round(sum(m["step_time"] for m in steps) / len(steps), 3),
            "peak_gib_per_rank": [json.loads((run / f"peak-rank{r}.json").read_text())["peak_gib"]
                                  for r in range(processes)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="1:ddp,2:ddp,2:fsdp", help="PROCESSES:STRATEGY,...")
    p.add_argument("--model", default="builtin:random-qwen3-4b")
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    from benchmarks.prepare_data import synthetic_record

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "records.jsonl"
        rng = random.Random(0)
        data.write_text("".join(json.dumps(synthetic_record(i, rng), ensure_ascii=False) + "\n"
                                for i in range(args.records)), encoding="utf-8")
        results = []
        for spec in args.runs.split(","):
            processes, strategy = spec.split(":")
            results.append(measure(root, data, int(processes), strategy, args))
            print(json.dumps(results[-1]), flush=True)
    single = {r["strategy"]: r["tokens_per_s"] for r in results if r["processes"] == 1}
    for r in results:
        if r["processes"] > 1 and r["strategy"] in single:
            efficiency = r["tokens_per_s"] / (r["processes"] * single[r["strategy"]])
            print(json.dumps({"strategy": r["strategy"], "processes": r["processes"],
                              "scaling_efficiency": round(efficiency, 3)}))


if __name__ == "__main__":
    main()
