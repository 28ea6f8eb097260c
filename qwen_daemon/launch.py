"""How the supervisor starts the trainers: one plain process, or torch.distributed.run (torchrun's
elastic agent) for several. The agent does no restarts of its own (`--max-restarts 0`): when a
rank dies it tears the group down and exits, and the supervisor restarts the whole group from the
newest checkpoint, which it also does for a single worker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qwen_daemon import gpu
from shared.config import Config

BACKEND_ENV = "QWEN_DAEMON_BACKEND"  # the backend the supervisor chose, for the workers
SUPERVISOR_ENV = "QWEN_DAEMON_SUPERVISOR_PID"  # the daemon a worker belongs to (workers end without it)
RESTARTS_ENV = "QWEN_DAEMON_RESTARTS"  # how many times the workers were restarted (0 at first)


REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict[str, str]:
    """The environment for a process we start (the daemon, its workers, a benchmark's runs): this
    one's as it is now, with this checkout first on the path (then whatever else is there, e.g. a
    machine's extra wheels)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if "PYTORCH_ALLOC_CONF" not in env and "PYTORCH_CUDA_ALLOC_CONF" not in env:
        # Growing segments instead of fixed blocks: the reserved memory stays close to the allocated
        # peak that the memory plan budgets for (sizes change with every micro-batch and plan).
        env["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    return env


def die_with_parent(sig: int | None = None) -> None:
    """Linux: this process gets `sig` (SIGTERM) when its parent dies (prctl PR_SET_PDEATHSIG; kept
    across exec). For the processes the supervisor starts (preexec_fn) and the ranks torchrun
    starts; elsewhere a no-op, and the workers' own watch of the supervisor's pid stays."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig or signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return


def processes(cfg: Config) -> int:
    """launch.num_processes, with auto = one per visible GPU (CUDA_VISIBLE_DEVICES respected), 1 on CPU."""
    if cfg.launch.num_processes != "auto":
        return cfg.launch.num_processes
    return max(1, len(gpu.sample()["gpus"]))


def backend(cfg: Config) -> str:
    if cfg.launch.backend != "auto":
        return cfg.launch.backend
    return "nccl" if gpu.sample()["gpus"] else "gloo"


def worker_command(run_dir: Path, resume: bool, cfg: Config, n: int, module: str = "qwen_daemon.worker") -> list[str]:
    """The command for `n` trainer processes (see `processes`)."""
    worker = ["-m", module, str(run_dir)] + (["--resume"] if resume else [])
    if n == 1 and not cfg.launch.torchrun_args:
        return [sys.executable, *worker]
    # One node unless the config passes torchrun's rendezvous options (--nnodes, --node-rank,
    # --rdzv-backend, --rdzv-endpoint, ...) for several.
    rendezvous = cfg.launch.torchrun_args or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--max-restarts=0",
            *rendezvous, *worker]
