"""Several live runs: choose one."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Label, OptionList
from textual.widgets.option_list import Option


class RunPickerScreen(Screen[Path]):
    BINDINGS = [("q", "app.quit", "Quit")]

    def __init__(self, choices: list[tuple[Path, dict]]) -> None:
        super().__init__()
        self.choices = choices

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Label("[b]Several runs are live; attach to which?[/b] 选择要连接的训练任务")
            yield OptionList(*[Option(f"{run.name:40} {info.get('state', '?'):10} pid {info.get('pid')}", id=str(i))
                               for i, (run, info) in enumerate(self.choices)])
        yield Footer()

    @on(OptionList.OptionSelected)
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[int(event.option.id)][0])
