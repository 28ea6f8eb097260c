"""The TUI against the real daemon training the tiny model: Pilot through every control, and
`qwen-tui attach` in tmux the way a user runs it over SSH."""

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from qwen_tui.app import QwenTUI
from qwen_tui.client import Connection
from qwen_tui.screens.batch_size import BatchSizeScreen
from qwen_tui.widgets.events_pane import EventsPane
from qwen_tui.widgets.gpu_panel import GpuPanel
from qwen_tui.widgets.header import RunHeader
from shared.runs import live_daemon
from test_daemon import child_env, running
from test_tui_app import text, until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_S = 180  # the first step: a fresh process imports torch and loads the tiny model


@pytest.mark.slow  # the default suite keeps its time on 2 cores; run with -m slow
async def test_every_control_against_the_real_daemon(run_dir):
    with running(run_dir) as (proc, _):
        app = QwenTUI(Connection(run_dir=run_dir).start())
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.view.step >= 2, timeout=START_S)
            assert "[live]" in text(app.query_one(RunHeader)) and app.view.run == "d"
            assert "no GPU on this machine" in text(app.query_one(GpuPanel))

            await pilot.press("p")
            await until(pilot, lambda: app.view.state == "paused", timeout=60)
            paused_at = app.view.step
            await pilot.press("b")
            assert isinstance(app.screen, BatchSizeScreen)
            await pilot.press("1", "enter")
            await until(pilot, lambda: (app.view.micro_batch_size, app.view.grad_accum) == (1, 4), timeout=60)
            await pilot.press("c")
            await until(pilot, lambda: f"checkpoint applied: checkpoint-{paused_at}" in text(app.query_one(EventsPane)),
                        timeout=60)
            await pilot.press("p")
            await until(pilot, lambda: app.view.step > paused_at, timeout=60)
            assert app.view.train["step"][-1] == app.view.step  # live metrics again, at the new batch size

            await pilot.press("s", "y")
            await until(pilot, lambda: app.view.connection == "offline", timeout=120)
            header = text(app.query_one(RunHeader))
            assert "stopped" in header and "read-only" in header
            assert proc.wait(60) == 0
    commands = [e["command"] for e in app.view.events if e.get("kind") == "command_applied"]
    assert commands == ["pause", "set_batch_size", "checkpoint", "resume", "stop"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_attach_in_tmux_and_pause_with_p(run_dir, tmp_path):
    def qwen_daemon(*args, check=True):
        return subprocess.run([sys.executable, "-m", "qwen_daemon", *args], env=child_env(), capture_output=True,
                              text=True, check=check, timeout=600)

    qwen_daemon("start", "--config", str(run_dir / "config.yaml"), "--set", "run.name=e2e")
    run = run_dir.parent / "e2e"
    tmux = ["tmux", "-L", f"qwen-test-{uuid.uuid4().hex[:8]}"]
    screen = lambda: subprocess.run([*tmux, "capture-pane", "-p", "-t", "tui"], capture_output=True, text=True).stdout

    def wait_for(predicate, what, timeout):
        deadline = time.monotonic() + timeout
        while not predicate():  # a terminal has nothing to wait on but its screen
            assert time.monotonic() < deadline, f"no {what} within {timeout} s; the screen:\n{screen()}"
            time.sleep(0.2)

    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", "tui", "-x", "120", "-y", "40", "-e", f"PYTHONPATH={REPO}",
                        f"{sys.executable} -m qwen_tui attach {run}; sleep 600"], check=True)
        wait_for(lambda: "● training" in screen() and "step " in screen(), "live run on the screen", START_S)
        subprocess.run([*tmux, "send-keys", "-t", "tui", "p"], check=True)
        wait_for(lambda: "● paused" in screen(), "'paused' on the screen", 60)
        status = qwen_daemon("ctl", "status", "--run", str(run)).stdout
        assert "state: paused" in status
        subprocess.run([*tmux, "send-keys", "-t", "tui", "q"], check=True)
        wait_for(lambda: "● paused" not in screen(), "the TUI quitting", 30)
        assert live_daemon(run) is not None  # q leaves the run alone
        assert "state: paused" in qwen_daemon("ctl", "status", "--run", str(run)).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        qwen_daemon("stop", str(run), check=False)
