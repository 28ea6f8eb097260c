"""Events: checkpoints, OOM recoveries with the new batch size, restarts, commands applied."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import RichLog

from qwen_tui.client import RunView
from shared.events import describe_event

EVENT_STYLES = {"checkpoint": "green", "final_saved": "bold green", "oom_recovered": "bold yellow",
                "oom_fatal": "bold red", "error": "bold red", "command_failed": "red", "worker_restarted": "bold magenta",
                "command_applied": "cyan", "stopped": "yellow", "evaluating": "dim", "saving": "dim",
                "straggler": "yellow", "memory_plan": "cyan"}


def format_event(event: dict) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["ts"])) if event.get("ts") else "--:--:--"
    return Text.assemble((stamp, "dim"), (f" {event.get('step', '-'):>6} ", "dim"),
                         (describe_event(event), EVENT_STYLES.get(event.get("kind"), "")))


class EventsPane(RichLog):
    def __init__(self, **kwargs) -> None:
        super().__init__(highlight=False, markup=False, wrap=True, max_lines=1000, auto_scroll=True, min_width=20,
                         **kwargs)
        self._shown = (-1, 0)
        self.border_title = "Events"

    def show(self, view: RunView) -> None:
        fresh, events = view.since(self._shown, "events")
        if fresh:
            self.clear()
        for event in events:
            self.write(format_event(event))
        self._shown = (view.generation, view.events_total)
