"""Small formatting helpers shared by the widgets (no Textual)."""

from __future__ import annotations

GIB = 1 << 30

STATE_STYLES = {
    "starting": "bold blue", "loading": "bold blue", "training": "bold green", "paused": "bold yellow",
    "evaluating": "bold cyan", "saving": "bold cyan", "finished": "bold green", "stopped": "bold yellow",
    "failed": "bold red", "unknown": "bold",
}

LEVEL_STYLES = {"DEBUG": "dim", "INFO": "", "WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}


def duration(seconds: float | None) -> str:
    """1:02:03, 4:05 or '-'."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def gib(n_bytes: float | None) -> str:
    return "-" if n_bytes is None else f"{n_bytes / GIB:.1f}"


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"
