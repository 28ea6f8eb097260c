"""The daemon on every visible GPU, steered and hurt the way a user (or bad luck) would, through
the CLI only; prints what happened as JSON lines (issue 7's run; also works on one GPU or CPU).

    python3 benchmarks/daemon_faults.py                      # configs/demo.yaml, num_processes auto
    python3 benchmarks/daemon_faults.py --set model.name_or_path=builtin:random-qwen3-4b ...

1. `start` with an OOM injected into the last rank at --oom-step (QWEN_DAEMON_INJECT_OOM);
2. from step 3: `ctl pause`, the `gpu` sample from `ctl snapshot` (every GPU's NVML figures,
   every rank's torch memory), `ctl set-batch-size 2`, `ctl checkpoint`, `ctl resume`; the step at
   which each was applied on every rank comes from the workers' log lines;
3. after the OOM's recovery, SIGKILL to the last rank; the daemon restarts the group from the
   newest checkpoint; then `ctl stop`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, env=None) -> dict:
    out = subprocess.run([sys.executable, "-m", "qwen_daemon", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900)
    if out.returncode:
        raise SystemExit(f"qwen-daemon {' '.join(args)} failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout) if "--json" in args else {"stdout": out.stdout}


def events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait(what: str, predicate, timeout: float = 900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def rank_pids(run: Path) -> dict[int, int]:
    """rank -> pid of the workers of this run (from /proc: their command line and RANK)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"qwen_daemon.worker" not in cmd or str(run).encode() not in cmd:
                continue
            env = dict(v.split(b"=", 1) for v in (entry / "environ").read_bytes().split(b"\0") if b"=" in v)
            found[int(env.get(b"RANK", b"0"))] = int(entry.name)
        except (OSError, ValueError):
            continue
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--oom-step", type=int, default=30, help="after the commands (they follow step 3)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    run = root / "faults"
    settings = ["run.name=faults", f"run.runs_root={root}", "train.max_steps=100000", "checkpoint.every_steps=5",
                "train.eval_every_steps=1000", "train.inference_check_tokens=0", *args.set]
    from qwen_daemon.launch import child_env, processes
    from shared.config import load_config

    env = child_env()

    n = processes(load_config(REPO / args.config, settings))
    last = n - 1
    env["QWEN_DAEMON_INJECT_OOM"] = f"{args.oom_step}@{last}"
    cli("start", "--config", args.config, *[f"--set={s}" for s in settings], env=env)
    ctl = ["--run", str(run), "--json"]
    try:
        wait("step 3", lambda: cli("ctl", "status", *ctl, env=env)["result"].get("step", 0) >= 3)
        replies = [{"ctl": "pause", "reply": cli("ctl", "pause", *ctl, env=env)["result"]}]
        gpu = cli("ctl", "snapshot", *ctl, env=env)["result"].get("gpu")
        print(json.dumps({"processes": n, "gpu": gpu}))
        for command in (["set-batch-size", "2"], ["checkpoint"], ["resume"]):
            replies.append({"ctl": " ".join(command), "reply": cli("ctl", *command, *ctl, env=env)["result"]})
        print(*map(json.dumps, replies), sep="\n")
        wait("the OOM's recovery", lambda: [e for e in events(run) if e["kind"] == "oom_recovered"])
        pids = wait("the workers' pids", lambda: rank_pids(run) if len(rank_pids(run)) == n else None, 60)
        os.kill(pids[last], signal.SIGKILL)
        print(json.dumps({"sigkill": {"rank": last, "pid": pids[last]}}))
        wait("the restart", lambda: [e for e in events(run) if e["kind"] == "worker_restarted"])
        restarted_at = len(events(run))
        wait("a step after the restart", lambda: any(e["kind"] == "train_start" for e in events(run)[restarted_at:]))
        time.sleep(3)
    finally:
        cli("ctl", "stop", *ctl, env=env)
    for e in events(run):
        if e["kind"] in ("train_start", "command_applied", "oom_recovered", "batch_restored", "crash",
                         "worker_restarted", "resumed", "stopped", "straggler"):
            print(json.dumps(e, ensure_ascii=False)[:400])
    for log in sorted(run.glob("*.log")):
        print(f"--- {log.name}: commands as the ranks applied them")
        for line in log.read_text().splitlines():
            if "applied at step" in line:
                print(line[-120:])


if __name__ == "__main__":
    main()
