"""The run directory layout (DESIGN.md, "Run directory"): one place that knows the file names."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.config import Config
from shared.protocol import FINAL_STATES

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
DAEMON_JSON = "daemon.json"
DAEMON_LOG = "daemon.log"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
INFERENCE = "inference.jsonl"  # the end-of-run inference check
# The batch size restarted workers must use when it differs from their checkpoint's (an OOM, or a
# command since the checkpoint): only workers write it (whenever the batch changes), atomically;
# the next workers read and remove it.
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
    write_text_atomic(run / RESTART_BATCH, json.dumps(batch))


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


def list_runs(runs_root: str | Path = "runs") -> list[Path]:
    """Every run directory under runs_root (one with a config.yaml), by name."""
    return sorted(config.parent for config in Path(runs_root).glob(f"*/{CONFIG}"))


def find_run(name: str | None, runs_root: str | Path = "runs") -> Path | None:
    """The run `name` (its path, or its name under runs_root); with no name, the newest run whose
    daemon is alive. None when there is no such run."""
    if name is None:
        live = live_runs(runs_root)
        return live[0][0] if live else None
    return next((run for run in (Path(name), Path(runs_root) / name) if (run / CONFIG).exists()), None)


# --- a run's files, read without its daemon ---------------------------------------------------------


def read_json(path: Path) -> dict | None:
    """A JSON object file (daemon.json, data_report.json); None when it is missing, damaged or no object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut short by a crash is skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _records(f)
    except OSError:
        return []


def tail_lines(path: Path, count: int, max_bytes: int = 2_000_000) -> list[str]:
    """The last `count` lines of a text file, read from at most its last max_bytes (the line that
    cuts in half is left out); [] when it cannot be read."""
    try:
        with open(path, "rb") as f:
            start = max(0, f.seek(0, os.SEEK_END) - max_bytes)
            f.seek(start)
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return lines[1 if start else 0:][-count:]


def last_step(run: Path) -> int:
    """The highest step among the run's newest metrics records; 0 before the first."""
    records = _records(tail_lines(run / METRICS, 100, max_bytes=8192))
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)


def _records(lines: Iterable[str]) -> list[dict]:
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# --- writing whole or not at all --------------------------------------------------------------------


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: a temporary file beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # (gone after the replace; left only by a failed write)


@contextmanager
def atomic_directory(target: Path, keep_existing: Callable[[Path], bool] = lambda target: False) -> Iterator[Path]:
    """`with atomic_directory(target) as tmp:` build a directory whole or not at all.

    The body writes into `.tmp-<name>-<pid>` beside target. When it returns, every file and
    directory in it is fsynced and it is renamed to target; when it raises, it is removed and an
    existing target is untouched. An existing target is replaced only once the new directory is
    complete: it is renamed aside to `.old-<name>-<pid>` first (and back if the rename of the new
    one fails), so one of the two is always whole on disk. Unless `keep_existing(target)` says it
    is a finished build, e.g. a concurrent builder's identical result: then it is kept and ours
    dropped. One process builds a given target once at a time (the names carry only the pid).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    aside = target.with_name(f".old-{target.name}-{os.getpid()}")
    recover_leftovers(target)
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would make a shared cache unreadable to others
    try:
        yield tmp
        for dirpath, _, filenames in os.walk(tmp, topdown=False):
            for name in filenames:
                fsync_path(Path(dirpath) / name)
            fsync_path(Path(dirpath))
        if target.exists():
            if keep_existing(target):
                return
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except OSError:
            if keep_existing(target):
                return  # a concurrent builder was quicker
            if aside.exists() and not target.exists():
                os.rename(aside, target)
            raise
        fsync_path(target.parent)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_leftovers(target: Path) -> None:
    """What builds of `target` by processes that died left beside it (atomic_directory's names):
    a set-aside `.old-` directory goes back when the target is missing (the builder died between
    its two renames), the rest is removed (a killed build can hold gigabytes). Leftovers of a
    process that is alive are left alone; this process's own are stale (one build at a time)."""
    pattern = re.compile(rf"\.(tmp|old)-{re.escape(target.name)}-([0-9]+)")
    for entry in sorted(target.parent.glob(f".*-{glob.escape(target.name)}-*")):
        m = pattern.fullmatch(entry.name)
        if not m or not dead_or_mine(int(m.group(2))):
            continue
        if m.group(1) == "old" and not target.exists():
            os.rename(entry, target)
            fsync_path(target.parent)
            log.warning("restored %s, set aside by an interrupted build (pid %s) that never replaced it",
                        target, m.group(2))
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed %s left behind by an interrupted build (pid %s)", entry, m.group(2))


def dead_or_mine(pid: int) -> bool:
    """Whether what process `pid` left is stale: it is gone, or it is this one (which builds one
    thing at a time)."""
    return pid == os.getpid() or not pid_alive(pid)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that the entries created or renamed in it are durable. On
    Linux fsync through a read-only descriptor flushes a file's data all the same."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
