"""The batch-size dialog: the current micro-batch, accumulation and global batch; a new
micro-batch, and what the accumulation becomes."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Static

from shared import batchsize


def preview(micro_batch_size: int, grad_accum: int, processes: int, new: int | None, keep_global: bool) -> tuple[str, bool]:
    """What the change does, and whether it can be applied: the daemon's own rule (shared.batchsize)."""
    if new is None:
        return "type a micro-batch size (a positive integer)", False
    try:
        mbs, accum = batchsize.change(micro_batch_size, grad_accum, new, keep_global)
    except ValueError as e:
        return str(e), False
    unchanged = " (unchanged)" if keep_global else ""
    return f"→ micro-batch {mbs} × accumulation {accum} = global batch {mbs * accum * processes}{unchanged}", True


class BatchSizeScreen(ModalScreen[dict | None]):
    """Dismissed with the set_batch_size arguments, or None."""

    BINDINGS = [("escape", "cancel", "Cancel")]

    def __init__(self, micro_batch_size: int, grad_accum: int, processes: int = 1) -> None:
        super().__init__()
        self.current = (micro_batch_size, grad_accum, processes)

    def compose(self) -> ComposeResult:
        mbs, accum, procs = self.current
        with Vertical(id="dialog"):
            yield Label("[b]Batch size[/b] 批大小")
            yield Static(f"now: micro-batch {mbs} × accumulation {accum}" + (f" × {procs} processes" if procs > 1 else "")
                         + f" = global batch {mbs * accum * procs}")
            yield Input(placeholder="new micro-batch size", type="integer", id="size")
            yield Checkbox("keep the global batch (recompute the accumulation)", value=True, id="keep")
            yield Static("", id="preview")
            with Horizontal(classes="buttons"):
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#size", Input).focus()
        self.update_preview()

    def arguments(self) -> tuple[dict | None, str]:
        text = self.query_one("#size", Input).value.strip()
        new = int(text) if text.lstrip("-").isdigit() else None
        keep = self.query_one("#keep", Checkbox).value
        message, ok = preview(*self.current, new, keep)
        return ({"micro_batch_size": new, "keep_global_batch": keep} if ok else None), message

    @on(Input.Changed)
    @on(Checkbox.Changed)
    def update_preview(self) -> None:
        args, message = self.arguments()
        self.query_one("#preview", Static).update(message)
        self.query_one("#preview", Static).set_class(args is None, "error")
        self.query_one("#apply", Button).disabled = args is None

    @on(Input.Submitted)
    @on(Button.Pressed, "#apply")
    def apply(self) -> None:
        args, _ = self.arguments()
        if args is not None:
            self.dismiss(args)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
