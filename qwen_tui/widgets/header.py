"""The run at a glance: name, model, state, progress, speed, ETA, elapsed, connection."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from qwen_tui.client import RunView
from qwen_tui.format import STATE_STYLES, duration, number

CONNECTION_STYLES = {"live": "green", "connecting": "yellow", "reconnecting": "bold red", "offline": "bold magenta"}


class RunHeader(Widget):
    DEFAULT_CSS = "RunHeader { height: 2; padding: 0 1; background: $boost; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view: RunView | None = None
        self.now = 0.0

    def show(self, view: RunView, now: float) -> None:
        self.view, self.now = view, now
        self.refresh()

    def render(self) -> Text:
        v, width = self.view, self.size.width - 2
        if v is None:
            return Text("connecting ...")
        state = Text.assemble(("● ", STATE_STYLES.get(v.state, "bold")), (v.state, STATE_STYLES.get(v.state, "bold")),
                              "  ", (v.run or "?", "bold"), "  ", (v.model, "dim"))
        if v.reason and (v.state == "failed" or v.connection == "offline" and v.state not in ("finished", "stopped")):
            state.append(f"  {v.reason}", style="red")
        link = Text(f"[{v.connection}{': ' + v.note if v.note and v.connection != 'live' else ''}]",
                    style=CONNECTION_STYLES.get(v.connection, ""))
        state.truncate(max(10, width - link.cell_len - 2), overflow="ellipsis")
        gap = max(1, width - state.cell_len - link.cell_len)
        first = Text.assemble(state, " " * gap, link)
        first.truncate(width, overflow="ellipsis")

        total = v.total_steps or 0
        done = min(1.0, v.step / total) if total else 0.0
        eta = "paused" if v.state == "paused" else duration(v.eta_s())
        tokens = v.tokens_per_s()
        batch = (f"{v.micro_batch_size}×{v.grad_accum}" + (f"×{v.processes}" if v.processes > 1 else "")
                 + f"={v.global_batch}") if v.global_batch else "-"
        elapsed = duration(v.elapsed_s(self.now))
        epoch = f"{v.epoch:.2f}" if v.epoch is not None else "-"
        figures = [f"epoch {epoch}", f"{number(tokens)} tok/s", f"batch {batch}", f"ETA {eta}", f"elapsed {elapsed}"]
        if sum(len(f) + 2 for f in figures) + 16 > width:  # narrow terminal: the short forms
            short_tokens = "-" if tokens is None else f"{tokens / 1000:.1f}k" if tokens >= 1000 else f"{tokens:.0f}"
            figures = [f"ep {epoch}", f"{short_tokens} tok/s", f"bs {batch}", f"ETA {eta}", f"up {elapsed}"]
        steps = f"step {v.step}/{total or '?'} {done:4.0%} "
        tail = "  ".join(figures)
        bar_width = width - len(steps) - len(tail) - 2
        second = Text(steps, style="bold")
        if bar_width >= 8:
            filled = int(done * bar_width)
            second.append("━" * filled, style=STATE_STYLES.get(v.state, ""))
            second.append("─" * (bar_width - filled), style="dim")
            second.append("  ")
        second.append(tail)
        second.truncate(width, overflow="ellipsis")
        return Text("\n").join([first, second])
