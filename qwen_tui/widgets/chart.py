"""The metric chart: training loss (raw and smoothed) with eval points and marks where the run
had an anomaly or a spike, or the learning rate, gradient norm or tokens/s, against the step. Points are averaged into at most two per
character column first, so 100,000 steps draw as fast as 100."""

from __future__ import annotations

import bisect
import time

import numpy as np
from textual_plotext import PlotextPlot

from qwen_tui.client import RunView

MODES = (("loss", "Loss"), ("lr", "Learning rate"), ("grad_norm", "Gradient norm"), ("tokens_per_s", "Tokens/s"),
         ("scores", "Answer scores"))
SCORE_COLORS = {"rouge_l_chars": "orange", "term_recall": "cyan", "rouge_l_weighted": "magenta"}
MIN_INTERVAL_S = 0.5  # replot at most twice a second, however fast metrics arrive


def bucket_means(xs, ys, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `buckets` points: the mean x and y of equal runs of consecutive points; NaN skipped."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)  # no copy for array("d")
    finite = np.isfinite(ys)
    xs, ys = xs[finite], ys[finite]
    if len(xs) <= buckets:
        return xs, ys
    starts = np.linspace(0, len(xs), buckets + 1).astype(int)[:-1]
    counts = np.diff(np.append(starts, len(xs)))
    return np.add.reduceat(xs, starts) / counts, np.add.reduceat(ys, starts) / counts


def anomaly_marks(v: RunView) -> list[tuple[int, float]]:
    """(step, y) for each marked step: on the smoothed loss, which is finite where the loss is not."""
    steps, smoothed = v.train["step"], v.train["smoothed"]
    out = []
    for step in v.marks:
        i = min(bisect.bisect_left(steps, step), len(steps) - 1)
        if np.isfinite(smoothed[i]):
            out.append((step, smoothed[i]))
    return out


class MetricChart(PlotextPlot):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = 0
        self._drawn: tuple | None = None
        self._drawn_at = 0.0
        self.view: RunView | None = None

    def next_mode(self) -> str:
        self.mode = (self.mode + 1) % len(MODES)
        self.replot(force=True)
        return MODES[self.mode][1]

    def show(self, view: RunView) -> None:
        self.view = view
        self.replot()

    def on_resize(self) -> None:
        self.replot(force=True)

    def replot(self, force: bool = False) -> None:
        v = self.view
        if v is None:
            return
        key = (v.generation, len(v.train["step"]), len(v.eval_steps), sum(map(len, v.scores.values())), len(v.marks),
               self.mode, self.size.width)
        if key == self._drawn or (not force and time.monotonic() - self._drawn_at < MIN_INTERVAL_S):
            return
        self._drawn, self._drawn_at = key, time.monotonic()
        name, title = MODES[self.mode]
        self.border_title = f"{title}  [dim](m: {' / '.join(t for _, t in MODES if t != title)})[/]"
        self.border_subtitle = "step"
        buckets = max(8, self.size.width - 8)  # one point per column of the plot area
        plt = self.plt
        plt.clear_data()
        steps = v.train["step"]
        if not steps:
            plt.title("waiting for the first step")
            self.refresh()
            return
        plt.title("")
        ticks = sorted({int(round(steps[0] + (steps[-1] - steps[0]) * i / 4)) for i in range(5)})  # whole steps
        plt.xticks(ticks, [str(t) for t in ticks])
        if name == "loss":
            plt.plot(*bucket_means(steps, v.train["loss"], buckets), marker="braille", color="gray", label="train")
            plt.plot(*bucket_means(steps, v.train["smoothed"], buckets), marker="braille", color="orange",
                     label="smoothed")
            if v.eval_steps:
                plt.scatter(*bucket_means(v.eval_steps, v.eval_losses, buckets), marker="◆", color="cyan",
                            label="eval")
            if marks := anomaly_marks(v):
                plt.scatter(*zip(*marks), marker="✗", color="red", label="anomaly / spike")
        elif name == "scores":
            if not v.scores:
                plt.title("no answer scores yet: eval.generate_every_steps scores a sample during training")
            for score, points in v.scores.items():
                xs, ys = zip(*points)
                plt.plot(*bucket_means(xs, ys, buckets), marker="braille", color=SCORE_COLORS.get(score, "white"),
                         label=score)
        else:
            plt.plot(*bucket_means(steps, v.train[name], buckets), marker="braille", color="orange")
        self.refresh()
