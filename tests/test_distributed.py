"""Training on two processes with torch.distributed (torchrun, gloo on CPU) and the tiny model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from shared.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "ddp_train.py")


def make_run(run_dir, name, *settings):
    cfg = load_config(run_dir / "config.yaml", [f"run.name={name}", "train.max_steps=5", "lora.dropout=0.0",
                                                "train.eval_every_steps=100", "checkpoint.every_steps=100",
                                                "train.inference_check_tokens=0", *settings])
    run = run_dir.parent / name
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    return run


def run_script(run, processes, new_micro_batch, env=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, SCRIPT, str(run), str(new_micro_batch)], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((run / f"state-rank{r}.json").read_text()) for r in range(processes)]


def test_two_ranks_train_like_one_process_through_an_oom_a_pause_and_a_batch_size_change(run_dir):
    # Two ranks at micro-batch 2 x accumulation 2 (global batch 8); rank 1 runs out of memory at
    # step 2, so every rank goes to 1 x 4 and redoes the step; after step 3 a command sets the
    # micro-batch back to 2 and a pause and a resume follow at the same boundary.
    two = make_run(run_dir, "two", "train.micro_batch_size=2", "train.grad_accum=2")
    states = run_script(two, 2, new_micro_batch=2, env={"QWEN_DAEMON_INJECT_OOM": "2@1"})
    # The reference: one process, global batch 8 all along.
    one = make_run(run_dir, "one", "train.micro_batch_size=4", "train.grad_accum=2")
    [reference] = run_script(one, 1, new_micro_batch=4)

    assert states[0] == states[1] == {"step": 5, "micro_batch_size": 2, "grad_accum": 2,
                                      "samples_seen": reference["samples_seen"]}
    rank0, rank1 = (torch.load(two / f"lora-rank{r}.pt") for r in (0, 1))
    single = torch.load(one / "lora-rank0.pt")
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=2e-4, msg=name)

    events = [json.loads(line) for line in (two / "events.jsonl").read_text().splitlines()]
    oom = [e for e in events if e["kind"] == "oom_recovered"]
    assert [(e["step"], e["micro_batch_size"], e["grad_accum"]) for e in oom] == [(2, 1, 4)]
    for rank in (0, 1):
        log = (two / f"rank{rank}.log").read_text()
        for command in ("set_batch_size", "pause", "resume"):
            assert f"rank {rank}: {command} applied at step 3" in log
    steps = [m["step"] for m in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]  # written once, by rank 0
