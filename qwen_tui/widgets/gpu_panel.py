"""One row per GPU: a memory bar with the trainer's allocated and reserved memory marked,
utilisation, temperature and power; host memory on a machine without a GPU."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from qwen_tui.client import RunView
from qwen_tui.format import GIB, gib
from shared.events import describe_event

LOW_FREE_FRACTION = 0.05   # warn when less than this share of a GPU's memory is free ...
LOW_FREE_BYTES = 1 * GIB   # ... or less than this, whichever is larger
LEGEND = "█ allocated ▓ reserved ▒ other ░ free"


def low_free(used: int, total: int) -> bool:
    return total > 0 and total - used < max(LOW_FREE_BYTES, LOW_FREE_FRACTION * total)


def memory_bar(width: int, total: float, allocated: float = 0, reserved: float = 0, used: float = 0) -> Text:
    """█ torch-allocated, ▓ reserved by torch's cache, ▒ used by anything else, ░ free."""
    if width <= 0 or not total:
        return Text()
    # A share that is not zero gets at least one cell: a small trainer is still visibly there.
    cells = [max(int(round(width * min(total, x) / total)), 1 if x > 0 else 0)
             for x in (allocated, max(reserved, allocated), max(used, reserved, allocated))]
    cells = [min(c, width) for c in cells]
    fraction = used / total
    colour = "green" if fraction < 0.75 else "yellow" if fraction < 0.9 else "red"
    return Text.assemble(("█" * cells[0], colour), ("▓" * (cells[1] - cells[0]), colour),
                         ("▒" * (cells[2] - cells[1]), f"dim {colour}"), ("░" * (width - cells[2]), "dim"))


def ended(v) -> list[tuple[str, str]]:
    """What a run that has ended leaves to read: its best eval loss, the evaluation's result and
    where the report is (from its events)."""
    parts = []
    if v.eval_losses:
        best = min(range(len(v.eval_losses)), key=v.eval_losses.__getitem__)
        parts.append((f"\nbest eval loss {v.eval_losses[best]:.4f} at step {v.eval_steps[best]}", ""))
    for kind, style in (("eval_done", "cyan"), ("report", "bold green")):
        event = next((e for e in reversed(v.events) if e.get("kind") == kind), None)
        if event is not None:
            parts.append(("\n" + describe_event(event), style))
    return parts


class GpuPanel(Widget):
    DEFAULT_CSS = "GpuPanel { height: auto; padding: 0 1; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.view: RunView | None = None

    def show(self, view: RunView) -> None:
        self.view = view
        gpus = (view.gpu or {}).get("gpus") or []
        warnings = [f"GPU{g.get('index')}" for g in gpus if g.get("memory_used") is not None
                    and low_free(g["memory_used"], g.get("memory_total") or 0)]
        self.border_title = "GPU"
        self.border_subtitle = f"⚠ low free memory: {', '.join(warnings)}" if warnings else (LEGEND if gpus else "")
        self.set_class(bool(warnings), "warning")
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        if self.view is not None and self.view.gpu is None and self.view.connection == "offline":
            return 1 + len(ended(self.view))
        gpus = ((self.view.gpu or {}).get("gpus") if self.view else None) or []
        return max(1, len(gpus))

    def render(self) -> Text:
        v = self.view
        if v is None or (v.gpu is None and v.connection != "offline"):
            return Text("waiting for the first GPU sample ...", style="dim")
        if v.gpu is None:
            peak = f" · the trainer's peak was {v.gpu_peak:.1f} GiB" if v.gpu_peak is not None else ""
            return Text.assemble(("no live GPU figures: the daemon is not running" + peak, "dim"), *ended(v))
        width = self.size.width - 2
        gpus, ranks = v.gpu.get("gpus") or [], v.gpu.get("ranks") or []
        if not gpus:
            host = v.gpu.get("host") or {}
            used, total = host.get("memory_used") or 0, host.get("memory_total") or 0
            label = "no GPU on this machine · host memory "
            figures = f" {gib(used)}/{gib(total)} GiB"
            cpu = f"  CPU {host['cpu_percent']:.0f}%" if host.get("cpu_percent") is not None else ""
            bar = memory_bar(max(0, width - len(label) - len(figures) - len(cpu)), total, used=used)
            return Text.assemble((label, "dim"), bar, figures, cpu)
        lines = []
        for g in gpus:
            mine = [r for r in ranks if r.get("index") == g.get("index")]
            allocated = sum(r.get("allocated") or 0 for r in mine)
            reserved = sum(r.get("reserved") or 0 for r in mine)
            used, total = g.get("memory_used"), g.get("memory_total") or 0
            name = f"GPU{g.get('index')} {(g.get('name') or '').removeprefix('NVIDIA ')}"[:18].ljust(18)
            mem = f" {gib(used)}/{gib(total)}G"
            util = f" {g['utilization']:3.0f}%" if g.get("utilization") is not None else "    -"
            temp = g.get("temperature")
            power = f" {g['power']:.0f}W" if g.get("power") is not None else ""
            rest = Text.assemble(mem, (util, "bold"), (f" {temp:.0f}°C" if temp is not None else "",
                                                       "red" if (temp or 0) >= 85 else "yellow" if (temp or 0) >= 75 else ""),
                                 power)
            if used is not None and low_free(used, total):
                rest.append(" ⚠", style="bold red")
            bar_width = max(4, width - len(name) - rest.cell_len - 1)
            lines.append(Text.assemble(name, " ", memory_bar(bar_width, total, allocated, reserved, used or 0), rest))
        return Text("\n").join(lines)
