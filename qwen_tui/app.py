"""The Textual app: one screen that shows a run and steers it.

The connection thread queues what it hears; a 10 Hz timer applies the queue to the RunView and
redraws only what changed, inside one batch update (no flicker, and any message rate costs at
most ten redraws a second). Commands run in worker threads, so a key acts at once and the
screen never waits for a step boundary.
"""

from __future__ import annotations

import time
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Input

from qwen_tui.client import CommandError, Connection, RunView
from qwen_tui.screens.batch_size import BatchSizeScreen
from qwen_tui.screens.confirm import ConfirmScreen
from qwen_tui.screens.help import HelpScreen
from qwen_tui.screens.run_picker import RunPickerScreen
from qwen_tui.widgets.chart import MetricChart
from qwen_tui.widgets.events_pane import EventsPane
from qwen_tui.widgets.gpu_panel import GpuPanel
from qwen_tui.widgets.header import RunHeader
from qwen_tui.widgets.log_pane import FILTERS, LogPane

FRAME_S = 0.1


class QwenTUI(App):
    CSS_PATH = "app.tcss"
    TITLE = "qwen-tui"
    BINDINGS = [
        Binding("p", "pause", "Pause/resume"),
        Binding("c", "checkpoint", "Checkpoint"),
        Binding("b", "batch_size", "Batch size"),
        Binding("s", "stop", "Stop"),
        Binding("m", "chart", "Chart"),
        Binding("l", "log_level", "Log level", show=False),
        Binding("slash", "search", "Search", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, connection: Connection | None = None, view: RunView | None = None,
                 choices: list[tuple[Path, dict]] | None = None, clock=time.time) -> None:
        """`connection` to follow a run; or a fixed `view` (tests, snapshots); or live runs to
        choose from (`choices`), each followed through its run directory once chosen."""
        super().__init__()
        self.connection, self.view, self.choices, self.clock = connection, view or RunView(), choices, clock
        self._shown: tuple[int, int] | None = None

    def compose(self) -> ComposeResult:
        yield RunHeader(id="header")
        yield GpuPanel(id="gpu")
        yield MetricChart(id="chart")
        with Horizontal(id="bottom"):
            with Vertical(id="logs"):
                yield LogPane(id="log")
                yield Input(placeholder="search the log (Enter applies, Escape clears)", id="search")
            yield EventsPane(id="events")
        yield Footer()

    def on_mount(self) -> None:
        # The frame runs ten times a second: look the widgets up once.
        self.header, self.gpu_panel = self.query_one(RunHeader), self.query_one(GpuPanel)
        self.chart, self.log_pane, self.events_pane = (self.query_one(MetricChart), self.query_one(LogPane),
                                                       self.query_one(EventsPane))
        self.search_input = self.query_one("#search", Input)
        self.log_pane.update_title()
        self.set_interval(FRAME_S, self.frame)
        if self.choices:
            self.push_screen(RunPickerScreen(self.choices), self.attach)
        self.frame()

    def attach(self, run_dir: Path | None) -> None:
        if run_dir is not None:
            self.connection = Connection(run_dir=run_dir).start()

    def on_unmount(self) -> None:
        if self.connection is not None:
            self.connection.close()

    def frame(self) -> None:
        """Apply what arrived, then redraw what changed (the header's clock once a second)."""
        if self.connection is not None:
            self.connection.drain(self.view)
        if (self.view.connection == "offline") != self._read_only:
            self._read_only = self.view.connection == "offline"
            self.refresh_bindings()  # a read-only run offers no controls in the footer
        now = self.clock()
        shown = (self.view.version, int(now) if self.view.connection != "offline" else 0)
        if shown == self._shown:
            self.chart.replot()  # a throttled replot that is now due
            return
        with self.batch_update():
            self.header.show(self.view, now)
            if self._shown is None or shown[0] != self._shown[0]:
                self.gpu_panel.show(self.view)
                self.chart.show(self.view)
                self.log_pane.show(self.view)
                self.events_pane.show(self.view)
        self._shown = shown

    # --- controls ---------------------------------------------------------------------------------

    _read_only = False
    STEERING = ("pause", "checkpoint", "batch_size", "stop")

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """The steering keys are off and out of the footer while the run is read-only (the header
        says why)."""
        return not (self._read_only and action in self.STEERING)

    def action_pause(self) -> None:
        if self.view.state == "paused":
            self.send("resume")
        else:
            self.send("pause")

    def action_checkpoint(self) -> None:
        self.send("checkpoint")

    def action_batch_size(self) -> None:
        v = self.view
        if not self.can_steer():
            return
        if v.micro_batch_size is None or v.grad_accum is None:
            self.notify("the batch size is not known yet: wait for the first step", severity="warning")
            return

        def chosen(args: dict | None) -> None:
            if args is not None:
                self.send("set_batch_size", args)

        self.push_screen(BatchSizeScreen(v.micro_batch_size, v.grad_accum, v.processes), chosen)

    def action_stop(self) -> None:
        if not self.can_steer():
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.send("stop")

        self.push_screen(ConfirmScreen(f"Stop {self.view.run or 'the run'} at the next step?\n"
                                       "A final checkpoint is saved; `qwen-daemon start --resume` continues it.\n"
                                       "在下一步停止训练并保存检查点？", yes="Stop"), answered)

    def action_chart(self) -> None:
        self.chart.next_mode()

    def action_log_level(self) -> None:
        self.filter_log(min_level=FILTERS[(FILTERS.index(self.log_pane.min_level) + 1) % len(FILTERS)])

    def action_search(self) -> None:
        self.search_input.display = True
        self.search_input.focus()

    @on(Input.Submitted, "#search")
    def searched(self, event: Input.Submitted) -> None:
        self.filter_log(search=event.value.strip())
        self.log_pane.focus()
        event.input.display = bool(event.value.strip())

    def on_key(self, event) -> None:
        if event.key == "escape" and self.search_input.has_focus:
            self.search_input.value = ""
            self.search_input.display = False
            self.filter_log(search="")
            self.log_pane.focus()

    def filter_log(self, **change) -> None:
        self.log_pane.set_filter(**change)
        self.log_pane.show(self.view)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def can_steer(self) -> bool:
        if self.connection is None or self.view.connection == "offline":
            self.notify("read-only: the run's daemon is not running (qwen-daemon start --resume continues it)",
                        severity="warning")
            return False
        return True

    def send(self, cmd: str, args: dict | None = None) -> None:
        if not self.can_steer():
            return
        self.notify(f"{cmd}: sent; it applies at the next step boundary", timeout=3)
        self.run_command(cmd, args)

    @work(thread=True, group="commands")
    def run_command(self, cmd: str, args: dict | None) -> None:
        try:
            result = self.connection.call(cmd, args)
        except CommandError as e:
            self.call_from_thread(self.notify, f"{cmd} failed: {e}", severity="error", timeout=10)
            return
        detail = ""
        if cmd == "set_batch_size":
            detail = f": micro-batch {result['micro_batch_size']} × accumulation {result['grad_accum']}"
        elif cmd == "checkpoint":
            detail = f": {Path(str(result.get('path', ''))).name}"
        self.call_from_thread(self.notify, f"{cmd} applied at step {result.get('step')}{detail}")
