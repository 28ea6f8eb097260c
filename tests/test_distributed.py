"""Training on two processes with torch.distributed (torchrun, gloo on CPU) and the tiny model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from shared.config import load_config
from test_daemon import child_env

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


def train_figures(run):
    return [figure for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "train"
            for figure in (m["loss"], m["grad_norm"])]


def run_script(run, processes, new_micro_batch, env=None, extra=(), torchrun=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if torchrun or (torchrun is None and processes > 1) else [sys.executable])
    result = subprocess.run([*launcher, SCRIPT, str(run), str(new_micro_batch), *extra], capture_output=True, text=True,
                            timeout=600, env={**child_env(), "OMP_NUM_THREADS": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((run / f"state-rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.slow  # the default suite keeps its time on 2 cores; run with -m slow
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


@pytest.mark.slow  # the default suite keeps its time on 2 cores; run with -m slow
def test_fsdp_ranks_train_like_one_process_and_their_checkpoint_resumes_on_one(run_dir):
    # FSDP2 on two ranks at micro-batch 2 x accumulation 2 (global batch 8), set to 1 x 4 after
    # step 3; checkpoint-3 is written from the shards.
    fsdp = ["launch.strategy=fsdp", "checkpoint.every_steps=3"]
    two = make_run(run_dir, "two", "train.micro_batch_size=2", "train.grad_accum=2", *fsdp)
    states = run_script(two, 2, new_micro_batch=1)
    sharded = torch.load(two / "lora-rank0.pt")
    # The reference: one process (the same torch AdamW, nothing to shard), global batch 8 all along.
    one = make_run(run_dir, "one", "train.micro_batch_size=4", "train.grad_accum=2", *fsdp)
    [reference] = run_script(one, 1, new_micro_batch=4)

    assert states[0] == states[1] == {"step": 5, "micro_batch_size": 1, "grad_accum": 4,
                                      "samples_seen": reference["samples_seen"]}
    single = torch.load(one / "lora-rank0.pt")
    assert sharded.keys() == torch.load(two / "lora-rank1.pt").keys() == single.keys()
    for name in sharded:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=2e-4, msg=name)
    # The same loss and gradient norm at every step (Adam would hide a wrongly scaled gradient).
    assert train_figures(two) == pytest.approx(train_figures(one), rel=1e-4)
    for rank in (0, 1):
        log = (two / f"rank{rank}.log").read_text()
        assert "sharded over 2 processes" in log and f"rank {rank}: set_batch_size applied at step 3" in log

    # The sharded run's checkpoint-3 (LoRA weights and AdamW state by parameter name) resumed on
    # one process ends where the two ranks did.
    import shutil

    shutil.rmtree(two / "checkpoints" / "checkpoint-5")
    [resumed] = run_script(two, 1, new_micro_batch=2, extra=["--resume"])
    assert resumed == {"step": 5, "micro_batch_size": 2, "grad_accum": 4, "samples_seen": reference["samples_seen"]}
    for name, weight in torch.load(two / "lora-rank0.pt").items():
        torch.testing.assert_close(weight, sharded[name], rtol=0, atol=2e-4, msg=name)


def test_the_daemon_trains_two_ranks_steers_them_and_restarts_them_after_one_is_killed(run_dir):
    import signal
    from pathlib import Path

    from test_daemon import TIMEOUT_MS, running, with_listen, worker_pid

    with_listen(run_dir, "launch.num_processes=2", "train.max_steps=60", "checkpoint.every_steps=4")
    with running(run_dir) as (proc, client):
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"].get("step") == 2)
        paused = client.call("pause")["result"]
        changed = client.call("set_batch_size", micro_batch_size=1)["result"]
        assert changed == {"step": paused["step"], "micro_batch_size": 1, "grad_accum": 4, "global_batch": 8,
                           "seq": changed["seq"]}  # (the last telemetry before the reply)
        assert changed["seq"] > paused["seq"]
        assert client.call("status")["result"]["processes"] == 2
        client.call("resume")
        client.wait_for(lambda m: m["topic"] == "event" and m["body"].get("kind") == "checkpoint")

        agent = worker_pid(client)  # torchrun's agent; its children are the ranks
        ranks = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
        assert len(ranks) == 2
        os.kill(int(ranks[1]), signal.SIGKILL)
        restarted = client.wait_for(lambda m: m["topic"] == "event" and m["body"].get("kind") == "worker_restarted")
        step = int(restarted["body"]["checkpoint"].rsplit("-", 1)[1])
        resumed = client.wait_for(lambda m: m["topic"] == "event" and m["body"].get("kind") == "resumed")
        assert resumed["body"]["step"] == step
        after = client.wait_for(lambda m: m["topic"] == "metrics" and m["body"].get("kind") == "train")
        assert after["body"]["step"] == step + 1 and after["body"]["processes"] == 2
        assert (after["body"]["micro_batch_size"], after["body"]["grad_accum"]) == (1, 4)  # from the checkpoint
        assert client.call("stop")["ok"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    assert json.loads((run_dir / "daemon.json").read_text())["state"] == "stopped"


def test_a_rank_slower_than_the_others_for_five_steps_is_reported():
    from types import SimpleNamespace

    from qwen_daemon.train.loop import watch_stragglers

    events = []
    r = SimpleNamespace(slow_steps={}, state=SimpleNamespace(step=0),
                        sinks=SimpleNamespace(event=lambda kind, **data: events.append((kind, data))))
    for step in range(1, 9):
        r.state.step = step
        watch_stragglers(r, [1.0, 1.3 if step != 2 else 1.0, 1.05])  # rank 1: 30% slower, once not
    assert events == [("straggler", {"step": 7, "rank": 1, "slower_pct": 27, "steps": 5})]


@pytest.mark.slow  # ~80 s; run with -m slow
def test_a_run_of_two_ranks_resumes_on_one_with_the_same_global_batch_and_data_position(run_dir):
    run = make_run(run_dir, "resumed", "train.micro_batch_size=2", "train.grad_accum=2", "train.max_steps=3")
    run_script(run, 2, new_micro_batch=2)  # 3 steps at 2 x 2 x 2 ranks; the last one is checkpointed
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 3", "max_steps: 6"))
    [resumed] = run_script(run, 1, new_micro_batch=8, extra=["--resume"])
    reference = make_run(run_dir, "reference", "train.micro_batch_size=4", "train.grad_accum=2", "train.max_steps=6")
    [straight] = run_script(reference, 1, new_micro_batch=4)
    assert resumed == {"step": 6, "micro_batch_size": 2, "grad_accum": 4, "samples_seen": straight["samples_seen"]}


def run_daemon_until_restarted(run_dir, *settings):
    """Start the daemon with two ranks; return the restart event, the first step after it, and
    the events before it, once the run has been stopped."""
    from test_daemon import TIMEOUT_MS, running, with_listen

    with_listen(run_dir, "launch.num_processes=2", "train.max_steps=60", "checkpoint.every_steps=2", *settings)
    with running(run_dir) as (proc, client):
        restarted = client.wait_for(lambda m: m["topic"] == "event" and m["body"].get("kind") == "worker_restarted")
        after = client.wait_for(lambda m: m["topic"] == "metrics" and m["body"].get("kind") == "train")
        events = [e for e in client.call("snapshot")["result"]["events"]]
        assert client.call("stop")["ok"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    return restarted["body"], after["body"], events


@pytest.mark.slow  # ~80 s each; run with -m slow
@pytest.mark.parametrize("strategy, accum", [("ddp", 1), ("fsdp", 2)])
def test_an_oom_that_cannot_be_agreed_in_place_restarts_every_rank_with_half_the_micro_batch(run_dir, monkeypatch,
                                                                                            strategy, accum):
    # DDP at accumulation 1: the only micro-batch is the one whose backward all-reduces; FSDP:
    # every forward gathers weights from all ranks. Either way rank 1's OOM at step 3 cannot be
    # agreed in place; the group restarts from checkpoint-2 at micro-batch 1.
    monkeypatch.setenv("QWEN_DAEMON_INJECT_OOM", "3@1")
    restarted, after, events = run_daemon_until_restarted(run_dir, f"launch.strategy={strategy}",
                                                          "train.micro_batch_size=2", f"train.grad_accum={accum}")
    assert restarted["checkpoint"].endswith("checkpoint-2")
    assert (after["step"], after["micro_batch_size"], after["grad_accum"]) == (3, 1, 2 * accum)
    recovered = [e for e in events if e.get("kind") == "oom_recovered"]
    assert recovered[-1]["restarted"] is True and recovered[-1]["micro_batch_size"] == 1
    assert not (run_dir / "restart_batch.json").exists()


@pytest.mark.slow  # ~80 s; run with -m slow
def test_a_rank_that_stops_answering_is_restarted_after_the_collective_timeout(run_dir, monkeypatch):
    monkeypatch.setenv("QWEN_DAEMON_INJECT_HANG", "3@1")
    restarted, after, events = run_daemon_until_restarted(run_dir, "launch.collective_timeout_s=10")
    assert restarted["checkpoint"].endswith("checkpoint-2") and after["step"] == 3
    assert any(e.get("kind") == "crash" for e in events)  # rank 0's all-reduce timed out
