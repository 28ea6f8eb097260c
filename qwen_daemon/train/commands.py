"""The commands a run applies at the step boundary (controls.py queues them): one handler per
command of shared.protocol.COMMANDS that is not read-only.

Rank 0 takes the commands and broadcasts them (a tiny collective), so every rank applies the same
commands at the same step; only rank 0 answers them. A handler's result goes into the
`command_applied` event and the reply; `paused` in it is the run's state, which the daemon follows.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from qwen_daemon.train import fitting
from qwen_daemon.train.batch_size import remember_batch
from qwen_daemon.train.controls import Command
from qwen_daemon.train.run import Run, TrainingError
from qwen_daemon.train.saving import save
from shared import batchsize

log = logging.getLogger(__name__)


def apply_commands(r: Run) -> None:
    """Apply what arrived since the last step; while paused, wait here for more (the broadcast
    then repeats every second, far inside the collective timeout)."""
    while True:
        commands = r.controls.take() if r.is_main else []
        shared = r.ranks.broadcast([(c.name, c.args) for c in commands])
        commands = commands or [Command(name, args) for name, args in shared]
        for command in commands:
            # The event before the reply: whoever has the reply has everything the command did
            # (the daemon's figures too, should the worker die right after).
            try:
                result = HANDLERS[command.name](r, **command.args)  # (Controls filled in the defaults)
            except (ValueError, TrainingError) as e:
                r.sinks.event("command_failed", step=r.state.step, command=command.name, error=str(e))
                command.future.set_exception(e)
            else:
                r.sinks.event("command_applied", step=r.state.step, command=command.name, **result)
                log.info("rank %d: %s applied at step %d", r.rank, command.name, r.state.step)
                command.future.set_result({"step": r.state.step, **result})
        if not r.paused or r.stopping:
            return
        if r.is_main:
            r.controls.wait(timeout=1.0 if r.world_size > 1 else None)


def pause_run(r: Run, release_memory: bool) -> dict[str, Any]:
    r.paused = True
    if release_memory and r.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"paused": True}


def resume_run(r: Run) -> dict[str, Any]:
    r.paused = False
    return {"paused": False}


def checkpoint_now(r: Run) -> dict[str, Any]:
    save(r)
    path = r.run_dir / "checkpoints" / f"checkpoint-{r.state.step}"
    if r.is_main and not path.is_dir():
        raise TrainingError(f"the checkpoint of step {r.state.step} was not written (the checkpoint_skipped event "
                            "says why); it is tried again at the next checkpoint boundary")
    return {"path": str(path)}


def stop_run(r: Run) -> dict[str, Any]:
    r.stopping = True
    return {"stopping": True}


def set_micro_batch_size(r: Run, micro_batch_size: int, keep_global_batch: bool) -> dict[str, Any]:
    s = r.state
    s.micro_batch_size, s.grad_accum = batchsize.change(s.micro_batch_size, s.grad_accum, micro_batch_size,
                                                    keep_global_batch)
    remember_batch(r, "command")
    return {"micro_batch_size": s.micro_batch_size, "grad_accum": s.grad_accum,
            "global_batch": s.micro_batch_size * s.grad_accum * r.world_size, **fitting.replan(r)}


HANDLERS = {"pause": pause_run, "resume": resume_run, "checkpoint": checkpoint_now, "stop": stop_run,
            "set_batch_size": set_micro_batch_size}
