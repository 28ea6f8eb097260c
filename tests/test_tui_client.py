"""qwen_tui.client without Textual: the RunView, the run's files, and the connection against a
real ZeroMQ server speaking the protocol (tests/protocol_server.py)."""

import json
import math

import pytest

from protocol_server import ProtocolServer
from qwen_tui.client import CommandError, Connection, CurveKeys, Endpoints, RunView, describe_event


@pytest.fixture
def server(tmp_path):
    server = ProtocolServer.in_directory(tmp_path).start()
    yield server
    server.close()


def follow(server, **kwargs) -> Connection:
    return Connection(endpoints=Endpoints(server.control, server.telemetry), **kwargs).start()


def drain_until(connection, view, predicate, timeout=10.0):
    """Apply updates as they arrive until predicate(view) holds (no sleeping)."""
    connection.drain(view)
    while not predicate(view):
        if not connection.drain(view, wait=timeout):
            raise AssertionError(f"timed out; view at step {view.step}, {view.connection}: {view.note}")
    return view


def test_snapshot_then_live_updates_build_the_history(server):
    for step in range(1, 6):
        server.train_step(step, 3.0 - step / 10)
    server.publish("log", {"level": "INFO", "logger": "qwen_daemon.train.loop", "message": "早期日志", "rank": 0})
    server.wait_for(lambda s: len(s.metrics) == 5 and s.logs)
    connection, view = follow(server), RunView()
    try:
        drain_until(connection, view, lambda v: v.connection == "live" and v.step == 5)
        server.train_step(6, 2.0)
        server.publish("gpu", {"has_gpu": False, "gpus": [], "host": {"memory_used": 1, "memory_total": 2}})
        drain_until(connection, view, lambda v: v.step == 6 and v.gpu is not None)
    finally:
        connection.close()
    assert list(view.train["step"]) == [1, 2, 3, 4, 5, 6]
    assert list(view.train["loss"]) == pytest.approx([2.9, 2.8, 2.7, 2.6, 2.5, 2.0])
    assert [line.message for line in view.logs] == ["早期日志"]
    assert (view.run, view.micro_batch_size, view.grad_accum, view.global_batch) == ("fake-run", 4, 8, 32)


def test_a_sequence_gap_triggers_a_resync_that_recovers_the_lost_message(server):
    connection, view = follow(server), RunView()
    try:
        drain_until(connection, view, lambda v: v.connection == "live")
        server.train_step(1, 3.0)
        server.train_step(2, 2.9, skip=True)  # lost on the wire
        server.train_step(3, 2.8)
        drain_until(connection, view, lambda v: v.step == 3)
    finally:
        connection.close()
    assert list(view.train["step"]) == [1, 2, 3]  # step 2 came back with the new snapshot
    assert connection.resyncs == 1 and server.snapshots == 2


def test_a_restarted_daemon_is_followed_from_its_new_snapshot(tmp_path):
    first = ProtocolServer.in_directory(tmp_path, pid=1001).start()
    connection, view = follow(first, silence_s=2.0), RunView()
    try:
        first.train_step(1, 3.0)
        drain_until(connection, view, lambda v: v.step == 1 and v.pid == 1001)
        first.close()
        drain_until(connection, view, lambda v: v.connection == "reconnecting")
        second = ProtocolServer.in_directory(tmp_path, pid=2002).start()
        try:
            second.train_step(7, 1.5)
            drain_until(connection, view, lambda v: v.connection == "live" and v.pid == 2002 and v.step == 7)
        finally:
            second.close()
    finally:
        connection.close()
    assert list(view.train["step"]) == [7]


def test_malformed_telemetry_is_skipped_and_the_view_goes_on(server):
    connection, view = follow(server), RunView()
    try:
        drain_until(connection, view, lambda v: v.connection == "live")
        server.publish_raw([b"metrics", b"\xc1 not msgpack"])
        server.publish_raw([b"metrics"])
        server.publish("event", {"kind": "something_new", "step": 1, "odd": [1, 2]})
        server.train_step(1, float("nan"))
        server.train_step(2, 2.0)
        drain_until(connection, view, lambda v: v.step == 2)
    finally:
        connection.close()
    assert connection.resyncs == 0  # garbage is skipped, not a gap
    assert math.isnan(view.train["loss"][0]) and view.train["smoothed"][-1] == 2.0
    assert describe_event(view.events[-1]) == "something new"


def test_commands_reply_once_applied_and_refusals_raise(server):
    connection, view = follow(server), RunView()
    try:
        drain_until(connection, view, lambda v: v.connection == "live")
        assert connection.call("pause") == {"step": 0, "paused": True}
        drain_until(connection, view, lambda v: v.state == "paused")
        with pytest.raises(CommandError, match="does not divide"):
            connection.call("set_batch_size", {"micro_batch_size": 3})
        result = connection.call("set_batch_size", {"micro_batch_size": 2})
        drain_until(connection, view, lambda v: v.micro_batch_size == 2)
    finally:
        connection.close()
    assert result["grad_accum"] == 16 and view.grad_accum == 16 and view.global_batch == 32


def test_a_dead_run_is_read_from_its_files(tmp_path):
    run = tmp_path / "demo-1"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name_or_path: builtin:tiny-qwen3\n", encoding="utf-8")
    (run / "daemon.json").write_text(json.dumps({"pid": 999999, "state": "training", "started_at": 100.0}))
    records = [{"kind": "train", "ts": 100.0 + s, "step": s, "total_steps": 10, "loss": 3 - s / 10,
                "micro_batch_size": 2 if s < 4 else 1, "grad_accum": 4 if s < 4 else 8, "gpu_peak": 5.5}
               for s in range(1, 5)]
    records.insert(2, {"kind": "eval", "ts": 102.5, "step": 2, "eval_loss": 2.85})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr',
                                       encoding="utf-8")  # the last line cut short by the crash
    (run / "events.jsonl").write_text(
        json.dumps({"ts": 100.0, "kind": "train_start", "step": 0, "micro_batch_size": 2, "grad_accum": 4}) + "\n"
        + json.dumps({"ts": 103.0, "kind": "oom_recovered", "step": 3, "micro_batch_size": 1, "grad_accum": 8}) + "\n")
    (run / "daemon.log").write_text(
        "2026-11-23 10:00:00,123 INFO qwen_daemon.train.loop: 第 3 步：显存不足，批大小减半\n"
        "2026-11-23 10:00:01,000 ERROR qwen_daemon.supervisor: worker died\n"
        "Traceback (most recent call last):\n", encoding="utf-8")
    connection, view = Connection(run_dir=run).start(), RunView()
    try:
        drain_until(connection, view, lambda v: v.connection == "offline")
        with pytest.raises(CommandError, match="not running"):
            connection.call("pause")
    finally:
        connection.close()
    assert list(view.train["step"]) == [1, 2, 3, 4] and view.eval_steps == [2]
    assert (view.micro_batch_size, view.grad_accum, view.gpu_peak) == (1, 8, 5.5)
    assert "killed or crashed" in view.reason and view.state == "training"
    assert [line.level for line in view.logs] == ["INFO", "ERROR", "ERROR"]
    assert view.logs[0].message == "第 3 步：显存不足，批大小减半"
    assert view.step == 4 and view.eta_s() is None  # no ETA for a run nobody is running
    assert describe_event(view.events[-1]) == "out of memory: micro-batch now 1 x accumulation 8"
    assert view.elapsed_s(now=10**10) == 4.0  # offline: up to the last record, not the clock


def test_the_header_figures():
    view = RunView(total_steps=100)
    for step in range(1, 11):
        view.apply("metrics", {"kind": "train", "step": step, "ts": 1000.0 + 2 * step, "loss": 1.0,
                               "tokens_per_s": 100.0 * step, "micro_batch_size": 4, "grad_accum": 2})
    assert view.seconds_per_step() == 2.0 and view.eta_s() == 180.0
    assert view.tokens_per_s() == 800.0  # the median of the last five
    view.apply("state", {"state": "finished"})
    assert view.eta_s() is None


def test_endpoint_and_keys_arguments_are_checked(tmp_path):
    assert Endpoints.from_tcp("tcp://10.0.0.5:5555") == Endpoints("tcp://10.0.0.5:5555", "tcp://10.0.0.5:5556")
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        Endpoints.from_tcp("10.0.0.5:5555")
    with pytest.raises(ValueError, match="keys generate"):
        CurveKeys.load(tmp_path)


def test_redone_steps_replace_the_lost_ones():
    """A restart from checkpoint-4 redoes steps 5 and 6: the chart must not draw them twice."""
    view = RunView()
    for step, eval_loss in ((1, None), (2, None), (3, None), (4, 5.0), (5, None), (6, 4.5), (5, None), (6, 4.0), (7, None)):
        view.apply("metrics", {"kind": "train", "step": step, "ts": float(step), "loss": 10.0 - step})
        if eval_loss is not None:
            view.apply("metrics", {"kind": "eval", "step": step, "eval_loss": eval_loss})
    assert list(view.train["step"]) == [1, 2, 3, 4, 5, 6, 7] and len(view.train["smoothed"]) == 7
    assert (view.eval_steps, view.eval_losses) == ([4, 6], [5.0, 4.0])


def test_a_curve_endpoint_needs_the_keys(tmp_path):
    import socket

    import zmq.auth

    from qwen_daemon.supervisor import generate_keys

    generate_keys(tmp_path / "keys")
    _, server_secret = zmq.auth.load_certificate(str(tmp_path / "keys" / "server.key_secret"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoints = Endpoints.from_tcp(f"tcp://127.0.0.1:{port}")
    server = ProtocolServer(endpoints.control, endpoints.telemetry, curve_secret_key=server_secret).start()
    try:
        with_keys = Connection(endpoints=endpoints, keys=CurveKeys.load(tmp_path / "keys")).start()
        without = Connection(endpoints=endpoints).start()
        view, refused = RunView(), RunView()
        try:
            drain_until(with_keys, view, lambda v: v.connection == "live")
            drain_until(without, refused, lambda v: v.connection == "reconnecting")  # its snapshot times out
        finally:
            with_keys.close()
            without.close()
    finally:
        server.close()
    assert view.run == "fake-run" and refused.run == ""


def test_attach_with_no_live_run_says_what_to_do(tmp_path, capsys):
    from qwen_tui.cli import main

    assert main(["attach", "--runs-root", str(tmp_path)]) == 1
    assert "no live run" in capsys.readouterr().err
    (tmp_path / "old-run").mkdir()
    (tmp_path / "old-run" / "config.yaml").write_text("{}")
    assert main(["attach", "--runs-root", str(tmp_path)]) == 1
    assert "qwen-tui attach old-run" in capsys.readouterr().err
    assert main(["attach", "no-such-run", "--runs-root", str(tmp_path)]) == 1
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert main(["attach", "--endpoint", "localhost:5555"]) == 1
    assert "tcp://HOST:PORT" in capsys.readouterr().err


def test_answer_scores_from_eval_records_become_series_and_rewind_with_a_restart():
    view = RunView()
    for record in ({"kind": "train", "step": 1, "loss": 2.0}, {"kind": "eval", "step": 1, "rouge_l_chars": 0.1},
                   {"kind": "train", "step": 2, "loss": 1.9},
                   {"kind": "eval", "step": 2, "rouge_l_chars": 0.2, "term_recall": 0.5, "eval_loss": 1.5},
                   {"kind": "train", "step": 2, "loss": 1.8}):  # step 2 redone after a restart
        view._add_metric(record)
    assert view.scores == {"rouge_l_chars": [(1, 0.1)], "term_recall": []}
    assert view.eval_losses == []


def test_anomalies_and_spikes_are_marked_on_the_loss_curve_and_rewind():
    from qwen_tui.widgets.chart import anomaly_marks

    view = RunView()
    for step, loss in ((1, 2.0), (2, math.nan), (3, 1.8), (4, 5.0)):
        view.apply("metrics", {"kind": "train", "step": step, "loss": loss})
    view.apply("event", {"kind": "anomaly", "step": 2, "what": ["loss"], "action": "skipped"})
    view.apply("event", {"kind": "loss_spike", "step": 4, "loss": 5.0, "median": 1.9})
    view.apply("event", {"kind": "checkpoint", "step": 4, "path": "checkpoint-4"})  # not a mark
    marks = anomaly_marks(view)
    assert [step for step, _ in marks] == [2, 4]
    assert marks[0][1] == pytest.approx(2.0)  # a NaN step sits on the smoothed curve
    assert marks[1][1] == view.train["smoothed"][3]
    view.apply("metrics", {"kind": "train", "step": 3, "loss": 1.7})  # a restart redoes step 3 on
    assert [step for step, _ in anomaly_marks(view)] == [2]
