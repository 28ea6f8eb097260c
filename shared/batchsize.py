"""The batch size's rules, in one place: the training loop applies them, the TUI's dialog previews
them, the daemon and the TUI follow the figures from the events that change them.

The global batch is micro-batch x accumulation x processes. A change of micro-batch keeps it
(accumulation recomputed) unless told otherwise; an OOM halves the micro-batch to the largest
divisor of the per-process batch at most half of it; a resume on another number of processes keeps
it where it divides.
"""

from __future__ import annotations

BATCH_EVENTS = ("train_start", "memory_plan", "command_applied", "oom_recovered", "batch_restored")
"""Events that carry the micro-batch and accumulation in effect from their step on."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def change(micro_batch_size: int, grad_accum: int, new: int, keep_global_batch: bool) -> tuple[int, int]:
    """(micro-batch, accumulation) after a change of micro-batch to `new`; ValueError saying what
    to choose when it cannot be done."""
    if not isinstance(new, int) or isinstance(new, bool) or new < 1:
        raise ValueError(f"the micro-batch size must be a positive integer, got {new!r}")
    if not keep_global_batch:
        return new, grad_accum
    per_process = micro_batch_size * grad_accum
    if per_process % new:
        options = ", ".join(map(str, divisors(per_process)))
        raise ValueError(f"micro-batch {new} does not divide the global batch {per_process} (per process); "
                         f"choose one of {options}, or let the global batch change")
    return new, per_process // new


def halved(micro_batch_size: int, grad_accum: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation) after an out-of-memory error: the largest divisor of the
    per-process batch at most half the micro-batch; None at micro-batch 1."""
    per_process = micro_batch_size * grad_accum
    smaller = next((m for m in range(micro_batch_size // 2, 0, -1) if per_process % m == 0), None)
    return None if smaller is None else (smaller, per_process // smaller)


def rescaled(micro_batch_size: int, grad_accum: int, processes_before: int, processes: int) -> tuple[int, int] | None:
    """(micro-batch, accumulation) that keep the global batch on `processes` instead of
    `processes_before` (the micro-batch lowered only if it must be); None if it does not divide."""
    per_process, rest = divmod(micro_batch_size * grad_accum * processes_before, processes)
    if rest:
        return None
    micro = next(m for m in range(min(micro_batch_size, per_process), 0, -1) if per_process % m == 0)
    return micro, per_process // micro
