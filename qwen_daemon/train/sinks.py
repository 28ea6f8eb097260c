"""Where metrics and events go: one tiny interface, several destinations.

The loop calls `metrics(record)` once per optimizer step and per evaluation, and `event(kind,
**data)` for checkpoints, OOM recoveries, commands applied and the like. Files in the run
directory are the source of truth (metrics.jsonl, events.jsonl, append-only); TensorBoard event
files let TensorBoard open the run; the daemon's ZeroMQ publisher will be one more sink.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

from shared import runs

log = logging.getLogger(__name__)


class Sink(Protocol):
    def metrics(self, record: dict[str, Any]) -> None: ...
    def event(self, kind: str, **data: Any) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl and events.jsonl, one JSON object per line, flushed per line."""

    def __init__(self, run_dir: Path) -> None:
        self._metrics = open(run_dir / runs.METRICS, "a", encoding="utf-8")
        self._events = open(run_dir / runs.EVENTS, "a", encoding="utf-8")

    def metrics(self, record: dict[str, Any]) -> None:
        self._write(self._metrics, record)

    def event(self, kind: str, **data: Any) -> None:
        self._write(self._events, {"ts": time.time(), "kind": kind, **data})

    @staticmethod
    def _write(f, record: dict[str, Any]) -> None:
        f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        f.flush()

    def close(self) -> None:
        self._metrics.close()
        self._events.close()


class TensorBoardSink:
    """TensorBoard event files under <run>/tensorboard (every numeric field, by step)."""

    def __init__(self, run_dir: Path) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def metrics(self, record: dict[str, Any]) -> None:
        kind = record.get("kind", "train")
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "ts"):
                self._writer.add_scalar(f"{kind}/{key}", value, record["step"])

    def event(self, kind: str, **data: Any) -> None:
        self._writer.add_text("events", f"{kind}: {json.dumps(data, ensure_ascii=False, default=str)}",
                              data.get("step", 0))

    def close(self) -> None:
        self._writer.close()


class LogSink:
    """A readable line per step in the log (the daemon's log topic carries it later)."""

    def metrics(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "eval":
            scores = {k: v for k, v in record.items() if k not in ("kind", "ts", "step")}
            log.info("step %d: %s", record["step"], brief(scores))
        else:
            log.info("step %d/%d epoch %.2f: loss %.4f lr %.2e grad_norm %.3f %.0f tok/s mbs %d x accum %d",
                     record["step"], record["total_steps"], record["epoch"], record["loss"], record["lr"],
                     record["grad_norm"], record["tokens_per_s"], record["micro_batch_size"], record["grad_accum"])

    def event(self, kind: str, **data: Any) -> None:
        log.info("event %s %s", kind, brief(data))

    def close(self) -> None:
        pass


def brief(data: dict[str, Any], width: int = 60) -> str:
    """One line for the log: key=value, long texts cut, lists and mappings summarised (the events'
    whole content is in events.jsonl)."""
    def short(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, (list, tuple)):
            return f"[{len(value)} items]" if len(value) > 3 or any(isinstance(v, (dict, list)) for v in value) \
                else "[" + ", ".join(short(v) for v in value) + "]"
        if isinstance(value, dict):
            shown = ", ".join(f"{k}={short(v)}" for k, v in list(value.items())[:6])
            return "{" + shown + (", ..." if len(value) > 6 else "") + "}"
        text = " ".join(str(value).split())
        return text if len(text) <= width else text[:width - 1] + "…"

    return " ".join(f"{k}={short(v)}" for k, v in data.items())


class Sinks:
    """Fan-out to several sinks; a failing sink is logged, never stops training."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = list(sinks)

    def metrics(self, record: dict[str, Any]) -> None:
        for s in self.sinks:
            try:
                s.metrics(record)
            except Exception:  # noqa: BLE001 - telemetry must not kill the run
                log.exception("metrics sink %s failed", type(s).__name__)

    def event(self, kind: str, **data: Any) -> None:
        for s in self.sinks:
            try:
                s.event(kind, **data)
            except Exception:  # noqa: BLE001
                log.exception("event sink %s failed", type(s).__name__)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
