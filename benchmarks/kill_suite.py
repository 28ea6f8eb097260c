"""kill -9 at random moments, then `start --resume`, until the run ends: the run must come out as
if nothing had happened (issue 14, item 10). Through the CLI only, on CPU with the demo config.

    python3 benchmarks/kill_suite.py --trials 20          # prints one JSON line per trial, then a summary

One uninterrupted reference run first. Then each trial starts the same run afresh and SIGKILLs the
daemon or its trainer (chosen at random) at a random moment: a random delay (loading, training),
or the instant the run reports `evaluating` or `saving` (mid-evaluation, mid-checkpoint). A
killed trainer is restarted by its daemon; a killed daemon takes its trainer with it and the
trial runs `start --resume`. Some trials are killed twice. A trial passes when
- every step's loss in metrics.jsonl equals the reference run's (a step logged twice, once before
  a kill and once after the resume, must have the same value both times), and no step is missing;
- the run ends `finished` with its adapter in final/;
- no process of the run is left once its daemon is gone (checked after every kill of the daemon);
- every checkpoint a resume loaded was complete (the `resumed` event's checkpoint verified at the
  moment it was used: its manifest checks out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen_daemon.launch import child_env  # noqa: E402

# The demo job, shorter: 12 steps with checkpoints, evaluations and an end of run to be killed in.
SETTINGS = ["train.max_steps=12", "train.grad_accum=2", "checkpoint.every_steps=3",
            "checkpoint.keep_last=2", "train.eval_every_steps=4", "train.inference_check_tokens=8", "eval.at_end=false",
            "lora.dropout=0.05"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "qwen_daemon", *args], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=900)
    if check and out.returncode:
        raise RuntimeError(f"qwen-daemon {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return out


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # the line a kill cut short
    return out


def daemon(run: Path) -> dict:
    try:
        return json.loads((run / "daemon.json").read_text())
    except (OSError, ValueError):
        return {}


def processes_of(run: Path) -> dict[str, list[int]]:
    """'daemon' / 'worker' -> pids whose command line names this run directory."""
    found: dict[str, list[int]] = {"daemon": [], "worker": []}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if str(run).encode() not in cmd or state == "Z":
            continue
        if b"qwen_daemon.supervisor" in cmd:
            found["daemon"].append(int(entry.name))
        elif b"qwen_daemon.worker" in cmd or b"torch.distributed.run" in cmd:
            found["worker"].append(int(entry.name))
    return found


def wait_for(predicate, timeout: float, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(poll)
    return None


def start(runs: Path, name: str, resume: bool = False) -> None:
    if resume:
        cli("start", "--resume", str(runs / name))
    else:
        cli("start", "--config", "configs/demo.yaml", *(a for s in SETTINGS for a in ("--set", s)),
            "--set", f"run.runs_root={runs}", "--set", f"run.name={name}")


def ended(run: Path) -> bool:
    return daemon(run).get("state") in ("finished", "stopped", "failed") and not processes_of(run)["daemon"]


def losses(run: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for m in read_jsonl(run / "metrics.jsonl"):
        if m.get("kind") == "train":
            out.setdefault(m["step"], []).append(m["loss"])
    return out


def verified_resumes(run: Path) -> list[str]:
    """Problems with the checkpoints resumes loaded: each `resumed` event names one, which must
    still verify against its manifest (where retention has not deleted it since)."""
    from qwen_daemon.train.checkpoint import verify_checkpoint

    problems = []
    for e in read_jsonl(run / "events.jsonl"):
        if e.get("kind") == "resumed" and e.get("checkpoint"):
            path = Path(e["checkpoint"])
            if path.exists():
                try:
                    verify_checkpoint(path)
                except Exception as error:  # noqa: BLE001 - reported
                    problems.append(f"resumed from a bad checkpoint {path.name}: {error}")
    return problems


def kill_once(run: Path, rng: random.Random, started: float, reference_s: float, target: str | None = None) -> dict:
    """One SIGKILL of `target` (the daemon or the worker; by default either) at a random moment
    of the run; returns what was killed and when."""
    moment = rng.choice(["delay", "delay", "evaluating", "saving"])
    target = target or rng.choice(["daemon", "worker"])
    if moment == "delay":
        delay = rng.uniform(0.0, 0.7 * reference_s)  # (the last 30% is the end of the run: rarely reached)
        wait_for(lambda: time.monotonic() - started > delay or ended(run), reference_s * 2, poll=0.05)
    else:  # the first, second or third of these from now on
        seen, nth = len(read_jsonl(run / "events.jsonl")), rng.randint(1, 3)
        wait_for(lambda: sum(e.get("kind") == moment for e in read_jsonl(run / "events.jsonl")[seen:]) >= nth
                 or ended(run), reference_s * 2, poll=0.005)
    pids = processes_of(run)[target]
    if not pids:
        return {"target": target, "moment": moment, "killed": False}
    events = read_jsonl(run / "events.jsonl")
    last = next((e.get("kind") for e in reversed(events)), None)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return {"target": target, "moment": moment, "killed": True, "last_event": last,
            "at_step": max((m["step"] for m in read_jsonl(run / "metrics.jsonl") if m.get("kind") == "train"),
                           default=0)}


def trial(runs: Path, name: str, rng: random.Random, reference: dict[int, float], reference_s: float,
          order: list[str] | None = None) -> dict:
    """`order`: what to kill, in turn (e.g. the daemon, then after the resume the worker); by
    default once or twice, either."""
    run = runs / name
    start(runs, name)
    kills, orphans, resumes = [], [], 0
    for target in order or [None] * rng.choice([1, 1, 2]):
        kill = kill_once(run, rng, time.monotonic(), reference_s, target)
        kills.append(kill)
        if not kill["killed"]:
            break
        if kill["target"] == "daemon":
            # Its trainers end with it (parent-death signal, then their own watch of its pid).
            left = wait_for(lambda: not any(processes_of(run).values()) or None, 30)
            if left is None:
                orphans.append(processes_of(run))
                for pids in processes_of(run).values():
                    for pid in pids:
                        os.kill(pid, signal.SIGKILL)
            if daemon(run).get("state") != "finished" or not (run / "final").exists():
                start(runs, name, resume=True)
                resumes += 1
    wait_for(lambda: ended(run), 900, poll=0.2)
    if daemon(run).get("state") != "finished":  # a daemon killed in its last moments, after the final adapter
        out = cli("start", "--resume", str(run), check=False)
        resumes += 1
        if "has finished" not in out.stdout:
            wait_for(lambda: ended(run), 900, poll=0.2)
    logged = losses(run)
    problems = []
    missing = sorted(set(reference) - set(logged))
    if missing:
        problems.append(f"steps missing: {missing}")
    for step, values in sorted(logged.items()):
        if any(not math.isclose(v, reference.get(step, math.nan), rel_tol=1e-6, abs_tol=1e-9) for v in values):
            problems.append(f"step {step}: losses {values} vs reference {reference.get(step)}")
    if daemon(run).get("state") != "finished" or not (run / "final" / "adapter_model.safetensors").exists():
        problems.append(f"ended {daemon(run).get('state')}, final/ {'present' if (run / 'final').exists() else 'absent'}")
    if orphans:
        problems.append(f"processes left after the daemon was killed: {orphans}")
    problems += verified_resumes(run)
    return {"trial": name, "kills": kills, "resumes": resumes,
            "restarts": sum(1 for e in read_jsonl(run / "events.jsonl") if e.get("kind") == "worker_restarted"),
            "steps_logged_twice": sum(1 for v in logged.values() if len(v) > 1), "ok": not problems,
            "problems": problems}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--order", help="kill these in turn in every trial, e.g. daemon,worker (default: at random)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill-suite-") as tmp:
        runs = Path(tmp)
        began = time.monotonic()
        start(runs, "reference")
        wait_for(lambda: ended(runs / "reference"), 900, poll=0.2)
        reference_s = time.monotonic() - began
        reference = {step: values[0] for step, values in losses(runs / "reference").items()}
        assert daemon(runs / "reference").get("state") == "finished", daemon(runs / "reference")
        print(json.dumps({"reference": {"steps": len(reference), "seconds": round(reference_s, 1)}}), flush=True)
        results = []
        for i in range(args.trials):
            result = trial(runs, f"trial-{i}", rng, reference, reference_s, args.order and args.order.split(","))
            results.append(result)
            print(json.dumps(result, ensure_ascii=False), flush=True)
        kills = [k for r in results for k in r["kills"] if k["killed"]]
        summary = {"trials": len(results), "passed": sum(r["ok"] for r in results), "kills": len(kills),
                   "daemon_kills": sum(k["target"] == "daemon" for k in kills),
                   "worker_kills": sum(k["target"] == "worker" for k in kills),
                   "killed_during": {m: sum((k["last_event"] or "-") == m for k in kills) for m in
                                     sorted({k["last_event"] or "-" for k in kills}, key=str)},
                   "resumes": sum(r["resumes"] for r in results), "restarts": sum(r["restarts"] for r in results),
                   "minutes": round((time.monotonic() - began) / 60, 1)}
        print(json.dumps({"summary": summary}), flush=True)
        if args.keep:
            shutil.copytree(tmp, f"{tmp}-kept")
    return 0 if summary["passed"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
