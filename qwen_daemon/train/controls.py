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

from shared import protocol


@dataclass
class Command:
    name: str  # one of shared.protocol.COMMANDS that is not read-only
    args: dict[str, Any] = field(default_factory=dict)  # every argument, defaults filled in
    future: Future = field(default_factory=Future)


class Controls:
    """A thread-safe queue of commands, taken by the loop at step boundaries."""

    def __init__(self) -> None:
        self._pending: list[Command] = []
        self._arrived = threading.Condition()

    def submit(self, name: str, **args: Any) -> Future:
        """Queue the command `name` of shared.protocol.COMMANDS with its arguments (the ones left
        out at their defaults); the daemon's worker forwards every request through here."""
        if name not in protocol.COMMANDS or name in protocol.READ_ONLY_COMMANDS:
            raise ValueError(f"{name!r} is not a command the training loop applies")
        command = Command(name, protocol.with_defaults(name, args))
        with self._arrived:
            self._pending.append(command)
            self._arrived.notify_all()
        return command.future

    # The commands by name, for the loop's own callers (tests, signals); see docs/protocol.md.
    def pause(self, **args: Any) -> Future:
        """Pause in place after the current step (release_memory: empty the CUDA cache meanwhile)."""
        return self.submit("pause", **args)

    def resume(self) -> Future:
        return self.submit("resume")

    def checkpoint(self) -> Future:
        """Save a checkpoint at the next boundary; resolves with its step and path."""
        return self.submit("checkpoint")

    def set_micro_batch_size(self, micro_batch_size: int, **args: Any) -> Future:
        """Change the micro-batch size, keeping the global batch unless keep_global_batch=False."""
        return self.submit("set_batch_size", micro_batch_size=micro_batch_size, **args)

    def stop(self) -> Future:
        """Stop after the current step with a final checkpoint."""
        return self.submit("stop")

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
