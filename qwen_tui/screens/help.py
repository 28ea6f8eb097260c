"""Every key, in English and Chinese."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

KEYS = (
    ("p", "pause / resume at the next step boundary", "暂停 / 继续"),
    ("c", "save a checkpoint now", "立即保存检查点"),
    ("b", "change the micro-batch size", "修改批大小"),
    ("s", "stop the run (a final checkpoint is saved)", "停止训练（保存检查点）"),
    ("m", "chart: loss / learning rate / grad norm / tokens/s", "切换图表"),
    ("l", "log: lowest level shown (INFO, WARNING, ERROR)", "日志级别过滤"),
    ("/", "log: search (Enter applies, Escape clears)", "搜索日志"),
    ("?", "this help", "帮助"),
    ("q", "quit the TUI; the run goes on", "退出界面（训练继续）"),
)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape,q,question_mark", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        rows = "\n".join(f"[b]{key:>3}[/b]  {what:<52} [dim]{zh}[/]" for key, what, zh in KEYS)
        with Vertical(id="dialog"):
            yield Label("[b]Keys[/b] 快捷键")
            yield Static(rows)
            yield Label("[dim]The mouse works too: click a key in the footer or a button. Escape closes.[/]")
