"""What the supervisor keeps between messages: the replies of recent commands (so that a client's
retry gets the original's reply instead of a second execution, docs/protocol.md "Retries") and
the metrics history that a snapshot carries, thinned out where it is long."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any


class ReplyCache:
    """Replies by (peer identity, request id), so that a retried request is answered again instead
    of executed again (the ZeroMQ guide's idempotent retries). A bounded LRU, by count and bytes.

    Server flow: `get` -> replay it; `pending` -> drop the retry (the original's reply is coming);
    else `begin`, execute, `put`, send. Read-only commands need no entry: running them twice is harmless.
    """

    def __init__(self, max_entries: int = 1024, max_bytes: int = 32 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[bytes, Any], bytes | None] = OrderedDict()  # None: in flight
        self._bytes = 0

    def get(self, identity: bytes, id: str | int) -> bytes | None:
        """The reply already sent for this request, or None."""
        key = (bytes(identity), id)
        reply = self._entries.get(key)
        if reply is not None:
            self._entries.move_to_end(key)
        return reply

    def pending(self, identity: bytes, id: str | int) -> bool:
        """True while the request is being executed (accepted, not yet applied)."""
        key = (bytes(identity), id)
        return key in self._entries and self._entries[key] is None

    def begin(self, identity: bytes, id: str | int) -> None:
        """Mark the request in flight."""
        self._store((bytes(identity), id), None)

    def put(self, identity: bytes, id: str | int, reply: bytes) -> None:
        """Remember the reply; one larger than max_bytes is not kept (a retry re-executes it)."""
        key = (bytes(identity), id)
        if len(reply) > self.max_bytes:
            self._drop(key)
            return
        self._store(key, bytes(reply))

    def __len__(self) -> int:
        return len(self._entries)

    def _store(self, key: tuple[bytes, Any], reply: bytes | None) -> None:
        self._drop(key)
        self._entries[key] = reply
        self._bytes += len(reply or b"")
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._bytes -= len(old or b"")

    def _drop(self, key: tuple[bytes, Any]) -> None:
        old = self._entries.pop(key, None)
        self._bytes -= len(old or b"")


def downsample(history: list[dict[str, Any]], recent: int = 2000, budget: int = 4000) -> list[dict[str, Any]]:
    """The metric history for a snapshot: every record of the last `recent` steps, at most `budget`
    evenly spaced train records from before them, every eval record, and always the first and last.

    Keeps order; returns the same dict objects (no copies). 100,000 steps shrink to 6,000 records
    plus the evals, under 2 MB of msgpack. "Last steps" counts from the last record's step, so a history
    with repeated steps after a resume still keeps its newest part whole.
    """
    if recent < 0 or budget < 0:
        raise ValueError(f"recent and budget must be >= 0, got {recent} and {budget}")
    if not history:
        return []
    cutoff = _step(history[-1]) - recent
    cut = len(history)
    while cut > 0 and _step(history[cut - 1]) > cutoff:
        cut -= 1
    older = history[:cut]
    keep = {i for i in (0, len(history) - 1) if i < cut}  # first and last (unless recent anyway)
    train = []  # positions of the older records that may be thinned out
    for i, record in enumerate(older):
        if record.get("kind") == "eval":
            keep.add(i)  # few and precious: the validation curve stays whole
        else:
            train.append(i)
    if len(train) <= budget:
        keep.update(train)
    elif budget == 1:
        keep.add(train[0])
    elif budget > 1:
        # Evenly spaced positions including both ends: the chart keeps its start and its shape.
        last = len(train) - 1
        keep.update(train[round(j * last / (budget - 1))] for j in range(budget))
    return [older[i] for i in sorted(keep)] + history[cut:]


def _step(record: Mapping[str, Any]) -> float:
    step = record.get("step")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else -math.inf
