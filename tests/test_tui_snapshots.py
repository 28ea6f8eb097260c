"""Snapshot tests of the main screen (pytest-textual-snapshot): a fixed run at 80x24 and 160x48.
Update them after an intended change with `uv run pytest tests/test_tui_snapshots.py --snapshot-update`."""

import math
import time

import pytest

from protocol_server import sample_gpu
from qwen_tui.app import QwenTUI
from qwen_tui.client import RunView
from qwen_tui.screens.batch_size import BatchSizeScreen

T0 = 1_795_450_000.0


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def make_app() -> QwenTUI:
    """A run 300 steps into 1,000, one GPU short of free memory, Chinese and English log lines."""
    metrics = [{"kind": "train", "ts": T0 + 6 * s, "step": s, "total_steps": 1000, "epoch": s / 120,
                "loss": 2.2 * math.exp(-s / 90) + 0.6 + 0.15 * math.sin(s * 1.7), "lr": 2e-4 * min(1, s / 30),
                "grad_norm": 1 + 0.3 * math.cos(s), "tokens_per_s": 10_000 + 300 * math.sin(s / 5),
                "micro_batch_size": 2, "grad_accum": 8, "processes": 2} for s in range(1, 301)]
    metrics += [{"kind": "eval", "ts": T0 + 6 * s + 1, "step": s, "eval_loss": 2.0 * math.exp(-s / 90) + 0.75}
                for s in range(50, 301, 50)]
    logs = [{"ts": T0 + 1795, "level": "INFO", "logger": "qwen_daemon.train.loop", "rank": 0,
             "message": "第 298 步：损失 0.74，学习率 2.0e-04"},
            {"ts": T0 + 1797, "level": "WARNING", "logger": "qwen_daemon.train.loop", "rank": 1,
             "message": "rank 1: 显存不足 (CUDA out of memory), micro-batch 4 -> 2"},
            {"ts": T0 + 1799, "level": "INFO", "logger": "qwen_daemon.train.checkpoint", "rank": 0,
             "message": "saved checkpoint runs/crypto-qa/checkpoints/checkpoint-300"}]
    events = [{"ts": T0, "kind": "train_start", "step": 0, "total_steps": 1000, "micro_batch_size": 4, "grad_accum": 4},
              {"ts": T0 + 1200, "kind": "checkpoint", "step": 200, "path": "runs/crypto-qa/checkpoints/checkpoint-200"},
              {"ts": T0 + 1797, "kind": "oom_recovered", "step": 299, "micro_batch_size": 2, "grad_accum": 8},
              {"ts": T0 + 1799, "kind": "checkpoint", "step": 300, "path": "runs/crypto-qa/checkpoints/checkpoint-300"}]
    view = RunView(connection="live")
    view.apply_snapshot({"seq": 1000, "run": "crypto-qa-20261123", "state": "training",
                         "config": {"model": "Qwen/Qwen3-4B-Thinking-2507"}, "gpu": sample_gpu(used_gib=63.0),
                         "status": {"pid": 4242, "started_at": T0 - 60, "step": 300, "total_steps": 1000,
                                    "epoch": 2.5, "micro_batch_size": 2, "grad_accum": 8, "processes": 2},
                         "metrics": metrics, "logs": logs, "events": events})
    view.gpu["gpus"][1]["memory_used"] = int(78.9 * (1 << 30))  # GPU1 nearly full: the warning
    return QwenTUI(view=view, clock=lambda: T0 + 1800)


def test_main_screen_80x24(snap_compare):
    assert snap_compare(make_app(), terminal_size=(80, 24))


def test_main_screen_160x48(snap_compare):
    assert snap_compare(make_app(), terminal_size=(160, 48))


def test_batch_size_dialog_80x24(snap_compare):
    async def open_dialog(pilot):
        pilot.app.push_screen(BatchSizeScreen(2, 8, 2))
        await pilot.press("4")

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=open_dialog)
