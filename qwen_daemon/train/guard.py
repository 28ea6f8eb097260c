"""The anomaly guard: a step whose loss or gradient is not finite never reaches the weights, and
steps far off the run's recent course are told as events.

The loop asks `Guard.check` after the backward and before the optimizer step. A NaN or inf loss
or gradient norm skips the optimizer step (the samples are spent, the step counts, the weights and
the optimizer's moments stay as they were) and is an `anomaly` event; `train.on_anomaly` says what
ANOMALY_PATIENCE such steps in a row do: pause (the user looks in the TUI and resumes, or stops),
skip (on regardless) or stop (a checkpoint of the good weights, then the run ends). A loss well
above its recent median (`loss_spike`) and a gradient norm far above its own (`grad_norm_spike`)
are events only: the step is applied (clipping bounds it).

Every rank sees the same loss (reduced over ranks) and the same gradient norm (of the reduced
gradients), so every rank decides the same.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

ANOMALY_PATIENCE = 3  # non-finite steps in a row before train.on_anomaly acts
# A loss spike: over SPIKE_FACTOR x the median of the SPIKE_WINDOW finite losses before it and at
# least SPIKE_MIN_RISE above it (0.05 -> 0.11 is no spike); the report finds the same ones in a
# run's metrics. A gradient norm spike: over GRAD_NORM_FACTOR x the median of the window's.
SPIKE_WINDOW = 20
SPIKE_FACTOR = 2.0
SPIKE_MIN_RISE = 0.5
GRAD_NORM_FACTOR = 10.0


@dataclass
class Verdict:
    skip: bool = False  # do not apply this step's gradients
    act: bool = False  # ANOMALY_PATIENCE anomalies in a row: do what train.on_anomaly says
    events: list[dict] = field(default_factory=list)  # (kind and fields) to record


@dataclass
class Guard:
    on_anomaly: str = "pause"
    in_a_row: int = 0
    losses: deque = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))
    grad_norms: deque = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))

    def check(self, step: int, loss: float, grad_norm: float, scaled: bool = False) -> Verdict:
        """`scaled`: float16 loss scaling is on, where an inf gradient is the scaler's routine (it
        skips the step and lowers the scale), not an anomaly."""
        bad = [name for name, value in (("loss", loss), ("grad_norm", grad_norm))
               if not math.isfinite(value) and not (scaled and name == "grad_norm")]
        if bad:
            self.in_a_row += 1
            act = self.in_a_row >= ANOMALY_PATIENCE
            return Verdict(skip=True, act=act, events=[{
                "kind": "anomaly", "step": step, "what": bad, "loss": _json(loss), "grad_norm": _json(grad_norm),
                "in_a_row": self.in_a_row, "action": self.on_anomaly if act else "skipped"}])
        self.in_a_row = 0
        events = []
        if _spike(loss, self.losses, SPIKE_FACTOR, SPIKE_MIN_RISE):
            events.append({"kind": "loss_spike", "step": step, "loss": loss,
                           "median": statistics.median(self.losses)})
        if math.isfinite(grad_norm) and _spike(grad_norm, self.grad_norms, GRAD_NORM_FACTOR):
            events.append({"kind": "grad_norm_spike", "step": step, "grad_norm": grad_norm,
                           "median": statistics.median(self.grad_norms)})
        self.losses.append(loss)
        if math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
        return Verdict(events=events)


def _spike(value: float, history: deque, factor: float, min_rise: float = 0.0) -> bool:
    if len(history) < SPIKE_WINDOW:
        return False
    median = statistics.median(history)
    return value > factor * median and value > median + min_rise


def _json(value: float) -> float | str:
    """NaN and inf as words: the event files are strict JSON."""
    return value if math.isfinite(value) else str(value)
