"""The log: follows new lines, filters by level, searches; Rich measures CJK text in cells, so
Chinese lines align."""

from __future__ import annotations

import time

from rich.text import Text
from textual.widgets import RichLog

from qwen_tui.client import LogLine, RunView
from qwen_tui.format import LEVEL_STYLES

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FILTERS = ("INFO", "WARNING", "ERROR")  # `l` cycles the lowest level shown


def format_line(line: LogLine) -> Text:
    stamp = time.strftime("%H:%M:%S", time.localtime(line.ts)) if line.ts else "--:--:--"
    rank = f"[r{line.rank}] " if line.rank is not None else ""
    return Text.assemble((stamp + " ", "dim"), (f"{line.level[:4]:4} ", LEVEL_STYLES.get(line.level, "")),
                         (rank + line.logger.rsplit(".", 1)[-1] + ": ", "dim"),
                         (line.message, LEVEL_STYLES.get(line.level, "")))


class LogPane(RichLog):
    def __init__(self, **kwargs) -> None:
        super().__init__(highlight=False, markup=False, wrap=True, max_lines=5000, auto_scroll=True, min_width=20,
                         **kwargs)
        self.min_level = "INFO"
        self.search = ""
        self._shown = (-1, 0)  # (view generation, lines seen)

    def matches(self, line: LogLine) -> bool:
        level = LEVELS.index(line.level) if line.level in LEVELS else 1
        return level >= LEVELS.index(self.min_level) and (
            not self.search or self.search.casefold() in line.message.casefold()
            or self.search.casefold() in line.logger.casefold())

    def set_filter(self, min_level: str | None = None, search: str | None = None) -> None:
        self.min_level = min_level if min_level is not None else self.min_level
        self.search = search if search is not None else self.search
        self._shown = (-1, 0)
        self.update_title()

    def update_title(self) -> None:
        parts = [f"≥{self.min_level}" if self.min_level != "INFO" else "", f"/{self.search}" if self.search else ""]
        label = " ".join(p for p in parts if p)
        self.border_title = "Log" + (f"  [yellow]{label}[/]" if label else "") + "  [dim](l: level, /: search)[/]"

    def show(self, view: RunView) -> None:
        fresh, lines = view.since(self._shown, "logs")
        if fresh:
            self.clear()
        for line in lines:
            if self.matches(line):
                self.write(format_line(line))
        self._shown = (view.generation, view.logs_total)
