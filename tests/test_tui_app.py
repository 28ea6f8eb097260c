"""The TUI driven by Textual's Pilot against a real ZeroMQ server speaking the protocol
(tests/protocol_server.py): attach, live updates, every key, resync, reconnect, offline mode."""

import json
import time

import pytest
from textual.widgets import Button, Footer, Input, OptionList

from protocol_server import ProtocolServer, sample_gpu
from qwen_tui.app import QwenTUI
from qwen_tui.client import Connection, Endpoints
from qwen_tui.screens.batch_size import BatchSizeScreen, preview
from qwen_tui.screens.confirm import ConfirmScreen
from qwen_tui.screens.help import HelpScreen
from qwen_tui.widgets.chart import MetricChart, bucket_means
from qwen_tui.widgets.events_pane import EventsPane
from qwen_tui.widgets.gpu_panel import GpuPanel
from qwen_tui.widgets.header import RunHeader
from qwen_tui.widgets.log_pane import LogPane

SIZE = (120, 40)


@pytest.fixture
def server(tmp_path):
    server = ProtocolServer.in_directory(tmp_path).start()
    for step in range(1, 6):
        server.train_step(step, 3.0 - step / 10)
    server.publish("gpu", sample_gpu())
    server.publish("log", {"level": "INFO", "logger": "qwen_daemon.train.loop", "rank": 0, "message": "第 5 步：损失 2.5"})
    server.publish("log", {"level": "WARNING", "logger": "qwen_daemon.train.loop", "rank": 0, "message": "grad norm high"})
    server.wait_for(lambda s: len(s.logs) == 2)
    yield server
    server.close()


def make_app(server, silence_s=5.0) -> QwenTUI:
    return QwenTUI(Connection(endpoints=Endpoints(server.control, server.telemetry), silence_s=silence_s).start())


async def until(pilot, predicate, timeout=10.0):
    """Let the app run until predicate() holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the TUI"
        await pilot.pause(0.05)


def text(widget) -> str:
    if hasattr(widget, "lines"):  # a RichLog: its rendered lines, wrapped lines joined again
        return " ".join(" ".join("".join(segment.text for segment in line) for line in widget.lines).split())
    return str(widget.render())


async def test_attach_shows_the_run_and_follows_it(server):
    app = make_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "step 5/100" in text(app.query_one(RunHeader)))
        header = text(app.query_one(RunHeader))
        assert "training" in header and "fake-run" in header and "batch 4×8=32" in header and "[live]" in header
        gpus = text(app.query_one(GpuPanel))
        assert "GPU0 H100 80GB" in gpus and "GPU1" in gpus and "61.0/79.6G" in gpus and "71°C" in gpus
        assert "第 5 步：损失 2.5" in text(app.query_one(LogPane))

        server.train_step(6, 2.0)
        server.publish("event", {"kind": "oom_recovered", "step": 6, "micro_batch_size": 2, "grad_accum": 16})
        await until(pilot, lambda: "step 6/100" in text(app.query_one(RunHeader)))
        await until(pilot, lambda: "out of memory" in text(app.query_one(EventsPane)))
        assert "batch 2×16=32" in text(app.query_one(RunHeader))
        assert "micro-batch now 2 x accumulation 16" in text(app.query_one(EventsPane))
        assert list(app.query_one(MetricChart).view.train["step"]) == [1, 2, 3, 4, 5, 6]


async def test_every_key_steers_the_run(server):
    app = make_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view.step == 5)
        await pilot.press("p")
        await until(pilot, lambda: "paused" in text(app.query_one(RunHeader)))
        await pilot.press("p")
        await until(pilot, lambda: server.commands().count("resume") == 1 and app.view.state == "training")
        await pilot.press("c")
        await until(pilot, lambda: "checkpoint applied" in text(app.query_one(EventsPane)))

        await pilot.press("b")
        assert isinstance(app.screen, BatchSizeScreen)
        await pilot.press("3")
        assert app.screen.query_one("#apply", Button).disabled  # 3 does not divide 32
        assert "choose one of 1, 2, 4, 8, 16, 32" in str(app.screen.query_one("#preview").render())
        await pilot.press("backspace", "2")
        assert "accumulation 16 = global batch 32" in str(app.screen.query_one("#preview").render())
        await pilot.press("enter")
        await until(pilot, lambda: "batch 2×16=32" in text(app.query_one(RunHeader)))

        await pilot.press("s")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("s", "y")
        await until(pilot, lambda: app.view.state == "stopped")
        assert "stopped" in text(app.query_one(RunHeader))

        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        messages = [n.message for n in app._notifications]
    assert [c for c in server.commands() if c not in ("snapshot", "status")] == [
        "pause", "resume", "checkpoint", "set_batch_size", "stop"]
    assert server.requests[-1]["args"] == {}
    assert {"micro_batch_size": 2, "keep_global_batch": True} in [r.get("args") for r in server.requests]
    assert any("set_batch_size applied at step 5: micro-batch 2 × accumulation 16" in m for m in messages)


async def test_the_mouse_works_too(server):
    app = make_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view.step == 5)
        await pilot.press("b")
        await pilot.press("1", "6")
        await pilot.click("#apply")
        await until(pilot, lambda: app.view.micro_batch_size == 16)
        await pilot.press("s")
        await pilot.click("#no")
        assert not isinstance(app.screen, ConfirmScreen)
    assert "stop" not in server.commands()


async def test_q_quits_and_never_stops_the_run(server):
    app = make_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view.step == 5)
        await pilot.press("q")
        await until(pilot, lambda: not app.is_running)
    assert set(server.commands()) == {"snapshot"}


async def test_chart_modes_log_filter_and_search(server):
    app = make_app(server)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "grad norm high" in text(app.query_one(LogPane)))
        chart = app.query_one(MetricChart)
        assert chart.border_title.startswith("Loss")
        await pilot.press("m")
        assert chart.border_title.startswith("Learning rate")
        await pilot.press("m", "m", "m")
        assert chart.border_title.startswith("Answer scores")
        await pilot.press("m")
        assert chart.border_title.startswith("Loss")

        await pilot.press("l")  # WARNING and above
        log = app.query_one(LogPane)
        assert "grad norm high" in text(log) and "损失" not in text(log)
        await pilot.press("l", "l")  # ERROR, then back to INFO
        assert "损失" in text(log)

        await pilot.press("slash")
        assert app.focused is app.query_one("#search", Input)
        await pilot.press(*"损失", "enter")
        assert "损失" in text(log) and "grad norm" not in text(log)
        await pilot.press("slash", "escape")
        assert "grad norm" in text(log) and "损失" in text(log)


async def test_a_gap_resyncs_and_a_restart_reconnects(server, tmp_path):
    app = make_app(server, silence_s=2.0)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.view.step == 5)
        server.train_step(6, 2.4, skip=True)
        server.train_step(7, 2.3)
        await until(pilot, lambda: app.view.step == 7)
        assert list(app.view.train["step"]) == [1, 2, 3, 4, 5, 6, 7] and app.connection.resyncs == 1

        server.close()
        await until(pilot, lambda: "reconnecting" in text(app.query_one(RunHeader)))
        restarted = ProtocolServer.in_directory(tmp_path, pid=4242).start()
        try:
            restarted.train_step(8, 2.2)
            await until(pilot, lambda: app.view.pid == 4242 and "[live]" in text(app.query_one(RunHeader)))
            assert list(app.view.train["step"]) == [8]
        finally:
            restarted.close()


async def test_a_finished_run_opens_read_only(tmp_path):
    run = tmp_path / "demo-done"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name_or_path: builtin:tiny-qwen3\n", encoding="utf-8")
    (run / "daemon.json").write_text(json.dumps({"pid": 999999, "state": "finished", "started_at": 1000.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"kind": "train", "ts": 1000.0 + s, "step": s, "total_steps": 3, "loss": 2.0, "micro_batch_size": 1,
         "grad_accum": 4}) + "\n" for s in (1, 2, 3)))
    (run / "events.jsonl").write_text(json.dumps({"ts": 1003.0, "kind": "final_saved", "step": 3, "path": "final"}))
    app = QwenTUI(Connection(run_dir=run).start())
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: "read-only" in text(app.query_one(RunHeader)))
        header = text(app.query_one(RunHeader))
        assert "finished" in header and "step 3/3" in header and "elapsed 0:03" in header
        assert "final adapter saved" in text(app.query_one(EventsPane))
        assert "daemon is not running" in text(app.query_one(GpuPanel))
        def footer():
            return {key.description for key in app.query_one(Footer).query("FooterKey")}

        await until(pilot, lambda: "Chart" in footer() and "Stop" not in footer())  # no control of a finished run
        assert "Chart" in footer() and not {"Pause/resume", "Checkpoint", "Batch size"} & footer()
        await pilot.press("p")
        await pilot.press("s")
        assert not isinstance(app.screen, ConfirmScreen)  # nothing to steer


async def test_several_live_runs_offer_a_picker(tmp_path):
    choices = []
    for name in ("run-a", "run-b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("model:\n  name_or_path: m\n", encoding="utf-8")
        choices.append((tmp_path / name, {"state": "training", "pid": 1}))
    app = QwenTUI(choices=choices)
    async with app.run_test(size=SIZE) as pilot:
        assert app.screen.query_one(OptionList).option_count == 2
        await pilot.press("down", "enter")
        await until(pilot, lambda: app.view.run == "run-b")


def test_batch_size_preview_follows_the_daemons_rule():
    assert preview(4, 8, 1, 2, keep_global=True) == (
        "→ micro-batch 2 × accumulation 16 = global batch 32 (unchanged)", True)
    assert preview(4, 8, 2, 16, keep_global=True)[0].endswith("global batch 64 (unchanged)")
    assert preview(4, 8, 1, 6, keep_global=False) == ("→ micro-batch 6 × accumulation 8 = global batch 48", True)
    assert preview(4, 8, 1, 3, keep_global=True)[1] is False
    assert preview(4, 8, 1, None, keep_global=True)[1] is False


def test_100k_steps_reduce_to_the_chart_width():
    steps = list(range(1, 100_001))
    xs, ys = bucket_means(steps, [float(s % 7) for s in steps], 200)
    assert len(xs) == len(ys) == 200
    assert xs[0] == pytest.approx(250.5) and ys.mean() == pytest.approx(3.0, abs=0.01)



async def test_an_ended_run_shows_its_result_and_where_the_report_is(tmp_path):
    run = tmp_path / "demo-done"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name_or_path: builtin:tiny-qwen3\n", encoding="utf-8")
    (run / "daemon.json").write_text(json.dumps({"pid": 999999, "state": "finished", "started_at": 1000.0}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"kind": "train", "ts": 1001.0, "step": 1, "total_steps": 2, "loss": 2.0},
        {"kind": "eval", "ts": 1001.5, "step": 1, "eval_loss": 1.75},
        {"kind": "train", "ts": 1002.0, "step": 2, "total_steps": 2, "loss": 1.9},
        {"kind": "eval", "ts": 1002.5, "step": 2, "eval_loss": 1.8})))
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (
        {"ts": 1003.0, "kind": "eval_done", "step": 2, "split": "test", "records": 4, "file": "eval/final-test.jsonl",
         "overall": {"base": {"rouge_l_chars": 0.1}, "tuned": {"rouge_l_chars": 0.25}}},
        {"ts": 1004.0, "kind": "report", "path": str(run / "report.html")})))
    app = QwenTUI(Connection(run_dir=run).start())
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: "report written" in text(app.query_one(GpuPanel)))
        panel = text(app.query_one(GpuPanel))
        assert "best eval loss 1.7500 at step 1" in panel
        assert "4 questions of test, ROUGE-L (chars) 0.100 -> 0.250" in panel
        assert str(run / "report.html") in panel
