"""A run guards its weights: NaN losses injected into real CPU training never reach them; what
repeated anomalies do (pause, skip, stop); spikes as events; a disk too full for a checkpoint
skips it and deletes nothing."""

import math
import threading

import pytest
from safetensors.torch import load_file

from qwen_daemon.train import checkpoint, loop, saving
from qwen_daemon.train.checkpoint import ADAPTER_WEIGHTS, checkpoint_size, list_checkpoints
from qwen_daemon.train.controls import Controls
from qwen_daemon.train.guard import ANOMALY_PATIENCE, SPIKE_WINDOW, Guard
from qwen_daemon.train.loop import train
from tests.test_train import Recorder, data_dir, make_cfg, read_jsonl, run_dir  # noqa: F401 - fixtures


def adapter(run, step):
    return load_file(run / "checkpoints" / f"checkpoint-{step}" / ADAPTER_WEIGHTS)


def test_repeated_anomalies_pause_the_run_until_the_user_resumes(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv(loop.INJECT_NAN_ENV, f"2x{ANOMALY_PATIENCE}")  # steps 2, 3, 4
    cfg = make_cfg(tmp_path, data_dir, "train.max_steps=6", "train.eval_every_steps=100",
                   "train.inference_check_tokens=0")  # on_anomaly: pause, the default
    controls = Controls()
    paused, resumed = threading.Event(), threading.Event()
    after_pause = []

    class Watcher(Recorder):
        def event(self, kind, **data):
            super().event(kind, **data)
            if kind == "auto_paused":
                paused.set()

        def metrics(self, record):
            if record["kind"] == "train" and paused.is_set():
                after_pause.append((record["step"], resumed.is_set()))

    def user():  # looks at the paused run, then resumes it
        assert paused.wait(120)
        resumed.set()
        controls.resume()

    thread = threading.Thread(target=user)
    thread.start()
    recorder = Watcher()
    state = train(cfg, run_dir(cfg), controls, sinks=(recorder,))
    thread.join()
    assert state.finished and state.step == 6
    anomalies = [(d["step"], d["action"]) for kind, d in recorder.events if kind == "anomaly"]
    assert anomalies == [(2, "skipped"), (3, "skipped"), (4, "pause")]
    assert [d["step"] for kind, d in recorder.events if kind == "auto_paused"] == [4]
    assert after_pause == [(5, True), (6, True)]  # no step while paused


def test_repeated_anomalies_stop_the_run_with_a_checkpoint_of_the_good_weights(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv(loop.INJECT_NAN_ENV, f"2x{ANOMALY_PATIENCE}")
    cfg = make_cfg(tmp_path, data_dir, "train.max_steps=8", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                   "train.eval_every_steps=100", "train.on_anomaly=stop")
    recorder = Recorder()
    state = train(cfg, run_dir(cfg), sinks=(recorder,))
    run = run_dir(cfg)
    assert state.step == 4 and not state.finished
    assert [kind for kind, _ in recorder.events][-1] == "stopped"
    first, final = adapter(run, 1), adapter(run, 4)
    assert all(final[k].equal(v) for k, v in first.items())  # steps 2-4 were never applied
    assert not (run / "final").exists()
    records = {m["step"]: m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"}
    assert [s for s in records if records[s].get("skipped")] == [2, 3, 4]
    assert math.isnan(records[2]["loss"]) and math.isfinite(records[1]["loss"])
    anomalies = [(d["step"], d["action"]) for kind, d in recorder.events if kind == "anomaly"]
    assert anomalies == [(2, "skipped"), (3, "skipped"), (4, "stop")]


def steady(guard, n=SPIKE_WINDOW, loss=1.0, grad_norm=0.5):
    for step in range(1, n + 1):
        assert guard.check(step, loss + 0.01 * (step % 3), grad_norm).events == []


def test_a_loss_spike_and_a_gradient_explosion_are_events_and_still_applied():
    guard = Guard()
    steady(guard)
    verdict = guard.check(21, 3.0, 0.5)
    assert not verdict.skip and [e["kind"] for e in verdict.events] == ["loss_spike"]
    assert verdict.events[0]["median"] == pytest.approx(1.01)
    verdict = guard.check(22, 1.0, 50.0)
    assert not verdict.skip and [e["kind"] for e in verdict.events] == ["grad_norm_spike"]


def test_no_spike_before_the_window_is_full_nor_for_small_losses():
    guard = Guard()
    steady(guard, n=SPIKE_WINDOW - 1)
    assert guard.check(SPIKE_WINDOW, 10.0, 0.5).events == []  # too early to call
    small = Guard()
    steady(small, loss=0.05)
    assert small.check(21, 0.3, 0.5).events == []  # 6x, but 0.25 above: noise at this scale


def test_anomalies_count_in_a_row_and_a_good_step_resets_them():
    guard = Guard(on_anomaly="stop")
    assert guard.check(1, math.nan, 1.0).skip
    assert guard.check(2, 1.0, math.inf).skip
    assert guard.check(3, 1.0, 0.5).skip is False  # the count starts again
    verdicts = [guard.check(s, math.nan, math.nan) for s in (4, 5, 6)]
    assert [v.act for v in verdicts] == [False, False, True]
    assert verdicts[-1].events[0] | {"loss": "nan"} == verdicts[-1].events[0]  # strict JSON: a word
    assert verdicts[-1].events[0]["action"] == "stop"


def test_an_overflow_under_float16_loss_scaling_is_the_scalers_business():
    guard = Guard()
    assert not guard.check(1, 1.0, math.inf, scaled=True).skip  # GradScaler skips it and lowers the scale
    assert guard.check(2, math.nan, 1.0, scaled=True).skip  # a NaN loss is still an anomaly


def test_a_disk_too_full_skips_the_checkpoint_keeps_the_older_one_and_warns(tmp_path, data_dir, monkeypatch):
    cfg = make_cfg(tmp_path, data_dir, "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
                   "train.eval_every_steps=100", "train.inference_check_tokens=0")
    run = run_dir(cfg)
    seen = {}

    def free_space(bytes_free):  # the filesystem's answer (a real full disk cannot be made here)
        monkeypatch.setattr(checkpoint, "free_bytes", lambda path: bytes_free)
        monkeypatch.setattr(saving, "free_bytes", lambda path: bytes_free)

    def on_step(step):
        if step == 4:
            free_space(1000)
        if step == 5:
            seen["kept"] = [p.name for p in list_checkpoints(run)]
            free_space(2 * checkpoint_size(run / "checkpoints" / "checkpoint-2"))  # room for two more

    recorder = Recorder(on_step)
    state = train(cfg, run, sinks=(recorder,))
    assert state.finished
    events = [(kind, d["step"]) for kind, d in recorder.events
              if kind in ("checkpoint", "checkpoint_skipped", "disk_low")]
    assert events == [("checkpoint", 2), ("checkpoint_skipped", 4), ("checkpoint", 6), ("disk_low", 6)]
    skipped = next(d for kind, d in recorder.events if kind == "checkpoint_skipped")
    assert "MiB free" in skipped["error"] and "checkpoint.keep_last" in skipped["error"]
    assert seen["kept"] == ["checkpoint-2"]  # keep_last=1, yet nothing was deleted for the skipped one
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-6"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
