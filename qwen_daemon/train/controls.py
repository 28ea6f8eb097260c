"""Steering a run: commands that the training loop applies at the next optimizer-step boundary.

Any thread (the daemon's control socket, a test) calls `pause()`, `checkpoint()`,
`set_micro_batch_size(n)` ...; each returns a `Future` that the loop resolves when the command
has been applied, with the step it was applied at, or fails with the reason (e.g. a micro-batch
size that does not divide the global batch). Nothing here touches the model: the loop owns it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Command:
    name: str  # pause | resume | checkpoint | set_batch_size | stop
    args: dict[str, Any] = field(default_factory=dict)
    future: Future = field(default_factory=Future)


class Controls:
    """A thread-safe queue of commands, taken by the loop at step boundaries."""

    def __init__(self) -> None:
        self._pending: list[Command] = []
        self._arrived = threading.Condition()

    def pause(self, release_memory: bool = False) -> Future:
        """Pause in place after the current step; release_memory empties the CUDA cache meanwhile."""
        return self._put("pause", release_memory=release_memory)

    def resume(self) -> Future:
        return self._put("resume")

    def checkpoint(self) -> Future:
        """Save a checkpoint at the next boundary; resolves with its step and path."""
        return self._put("checkpoint")

    def set_micro_batch_size(self, micro_batch_size: int, keep_global_batch: bool = True) -> Future:
        """Change the micro-batch size; gradient accumulation is recomputed so that the global
        batch stays the same, unless keep_global_batch is False (then accumulation stays)."""
        return self._put("set_batch_size", micro_batch_size=micro_batch_size, keep_global_batch=keep_global_batch)

    def stop(self) -> Future:
        """Stop after the current step with a final checkpoint."""
        return self._put("stop")

    def _put(self, name: str, **args: Any) -> Future:
        command = Command(name, args)
        with self._arrived:
            self._pending.append(command)
            self._arrived.notify_all()
        return command.future

    def take(self) -> list[Command]:
        """Loop side: every pending command, oldest first."""
        with self._arrived:
            taken, self._pending = self._pending, []
        return taken

    def wait(self, timeout: float | None = None) -> None:
        """Loop side, while paused: block until a command arrives (or the timeout)."""
        with self._arrived:
            if not self._pending:
                self._arrived.wait(timeout)
