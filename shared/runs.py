"""The run directory layout (DESIGN.md, "Run directory"): one place that knows the file names."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from shared.config import Config
from shared.protocol import FINAL_STATES

CONFIG = "config.yaml"
DAEMON_JSON = "daemon.json"
DAEMON_LOG = "daemon.log"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
INFERENCE = "inference.jsonl"  # the end-of-run inference check
# The batch size restarted workers must use when it differs from their checkpoint's (an OOM, or a
# command since the checkpoint); written atomically, read and removed by the workers.
RESTART_BATCH = "restart_batch.json"
LOCK = "daemon.lock"  # held (flock) by the run's daemon and inherited by its trainers


class RunLocked(RuntimeError):
    """Another process owns the run directory; the message names it."""


def lock_run(run: Path) -> int:
    """Take the run directory's exclusive lock for this process (and the children that inherit
    the descriptor); returns the descriptor, to keep open. The lock goes with the last process
    holding it, however it ends (kill -9 included): a trainer left running by a killed daemon
    still holds it until it ends."""
    import fcntl

    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode("ascii", errors="replace").strip() or "?"
        os.close(fd)
        raise RunLocked(f"{run} is owned by another daemon (pid {holder}) or a trainer it started that is still "
                        f"ending; wait for it, or stop it (qwen-daemon stop {run}; kill {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def write_restart_batch(run: Path, micro_batch_size: int, grad_accum: int, processes: int, reason: str) -> None:
    batch = {"micro_batch_size": micro_batch_size, "grad_accum": grad_accum, "processes": processes, "reason": reason}
    tmp = run / f".{RESTART_BATCH}.tmp"
    tmp.write_text(json.dumps(batch), encoding="utf-8")
    os.replace(tmp, run / RESTART_BATCH)


def default_run_name(config_path: str | Path | None) -> str:
    """<config file stem>-<local time>, e.g. demo-20261123-151200."""
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir(cfg: Config) -> Path:
    if cfg.run.name is None:
        raise ValueError("run.name is not set; call default_run_name() first")
    return Path(cfg.run.runs_root) / cfg.run.name


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (owned by anyone). A value that is no pid (0 and -1
    would signal a process group, 2**40 overflows) is not alive."""
    if not isinstance(pid, int) or not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def live_daemon(run_dir: Path) -> dict | None:
    """daemon.json of the run if its daemon process is alive; a stale file (dead pid) is None."""
    try:
        info = json.loads((run_dir / DAEMON_JSON).read_text(encoding="utf-8"))
        if not pid_alive(info["pid"]):
            return None
        cmdline = Path(f"/proc/{info['pid']}/cmdline")
        if cmdline.exists() and b"qwen_daemon" not in cmdline.read_bytes():
            return None  # the pid was reused by another program
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if info.get("state") not in FINAL_STATES else None


def live_runs(runs_root: str | Path = "runs") -> list[tuple[Path, dict]]:
    """Runs under runs_root whose daemon is alive, newest first, with their daemon.json."""
    found = [(run.parent, info) for run in Path(runs_root).glob(f"*/{DAEMON_JSON}") if (info := live_daemon(run.parent))]
    return sorted(found, key=lambda item: item[1].get("started_at", 0), reverse=True)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a crash is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except OSError:
        pass
    return records


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: a temporary file beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
