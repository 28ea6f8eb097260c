"""The training report (qwen_daemon/report.py): one self-contained HTML file and its summary dict,
built from run directories written here by `write_run`, healthy, failed, damaged or showing what
each advice rule looks for."""

import base64
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qwen_daemon import report
from qwen_tui.client import RunView
from shared import runs

T0 = 1_800_000_000.0
DEAD_PID = 2**30  # above any pid_max: never a live process


def healthy_loss(step: int) -> float:
    return 2.0 * math.exp(-step / 30) + 1.0 + 0.01 * math.sin(step)


def train_record(step: int, loss: float, total: int, fields: dict | None = None) -> dict:
    """A train record with the keys the loop writes (qwen_daemon/train/loop.py), `fields` changed."""
    record = {"kind": "train", "ts": T0 + 2 * step, "step": step, "total_steps": total, "epoch": 2 * step / total,
              "loss": loss, "lr": 2e-4, "grad_norm": 0.5, "tokens": 1000, "tokens_per_s": 500.0, "step_time": 2.0,
              "samples_seen": 8 * step, "micro_batch_size": 2, "grad_accum": 4, "processes": 1}
    return {**record, **(fields or {})}


def write_run(tmp_path, name="run", *, steps=60, loss=healthy_loss, eval_every=10, eval_loss=None, events=(),
              state="finished", fields=None, data=None, config=None, end=True):
    """A run directory as the daemon leaves it: metrics.jsonl (a train record per step, an eval
    record every `eval_every` steps), events.jsonl (train_start, `events`, final_saved when `end`),
    daemon.json, config.yaml and data_report.json. `fields(step)` adds or overrides record keys."""
    run = tmp_path / name
    run.mkdir()
    eval_loss = eval_loss or (lambda step: loss(step) + 0.05)
    with open(run / runs.METRICS, "w", encoding="utf-8") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps(train_record(step, loss(step), steps, fields(step) if fields else None)) + "\n")
            if step % eval_every == 0:
                f.write(json.dumps({"kind": "eval", "ts": T0 + 2 * step + 1, "step": step,
                                    "eval_loss": eval_loss(step)}) + "\n")
    all_events = [{"ts": T0, "kind": "train_start", "step": 0, "total_steps": steps, "resumed": False,
                   "micro_batch_size": 2, "grad_accum": 4, "processes": 1, "strategy": "ddp"}, *events]
    if end:
        all_events.append({"ts": T0 + 2 * steps + 5, "kind": "final_saved", "step": steps, "path": f"{run}/final"})
    with open(run / runs.EVENTS, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in all_events)
    (run / runs.DAEMON_JSON).write_text(json.dumps({"pid": DEAD_PID, "state": state, "protocol": 1,
                                                    "started_at": T0 - 10, "run": name}))
    settings = {"model": {"name_or_path": "Qwen/Qwen3-4B-Thinking-2507"},
                "train": {"epochs": 2.0, "max_steps": None, "micro_batch_size": 2, "grad_accum": 4,
                          "learning_rate": 2e-4, "max_grad_norm": 1.0, "memory_headroom": 0.1}}
    for section, values in (config or {}).items():
        settings[section] = {**settings.get(section, {}), **values}
    (run / runs.CONFIG).write_text(yaml.safe_dump(settings, allow_unicode=True), encoding="utf-8")
    data = data or {"kept": 100, "dropped": 0, "truncated": 0, "problems": [], "without_reasoning": 0, "ignored": [],
                    "files": {"data/qa.jsonl": {"records": 100, "kept": 100, "dropped": 0}},
                    "splits": {"train": {"records": 90, "tokens": 9000}, "validation": {"records": 10, "tokens": 1000}}}
    (run / runs.DATA_REPORT).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return run


def on_gpu(total_gib: float, peak_gib: float):
    """A GPU run: the memory plan's fingerprint names the GPU's size, the records carry the peak."""
    plan = {"ts": T0 + 1, "kind": "memory_plan", "step": 0, "reason": "start", "layers": 36,
            "fitted_on": f"NVIDIA H100 80GB HBM3 {total_gib:g} GiB x1", "micro_batch_size": 2, "grad_accum": 4,
            "checkpointed": 36, "offload": False, "predicted_peak": None, "budget": None}
    return {"events": [plan],
            "fields": lambda step: {"gpu_allocated": peak_gib / 2, "gpu_reserved": peak_gib, "gpu_peak": peak_gib}}


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# --- a finished run --------------------------------------------------------------------------------------

def test_a_finished_run_gives_one_self_contained_file_with_the_right_figures(tmp_path):
    command = {"ts": T0 + 61, "kind": "command_applied", "step": 30, "command": "set_batch_size",
               "micro_batch_size": 4, "grad_accum": 2, "global_batch": 8}
    evals = {10: 1.5, 20: 1.3, 30: 1.2, 40: 1.15, 50: 1.10, 60: 1.12}
    run = write_run(tmp_path, events=[command], eval_loss=evals.get,
                    fields=lambda s: {"tokens_per_s": 1000.0 if s <= 50 else 100.0, "gpu_peak": 10 + s / 10,
                                      **({"micro_batch_size": 4, "grad_accum": 2} if s > 30 else {})})
    before = set(os.listdir(run))
    pyplot_before = "matplotlib.pyplot" in sys.modules

    path = report.write_report(run)

    assert path == run / "report.html"
    assert set(os.listdir(run)) - before == {"report.html"}  # one file, no temporary left behind
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", page) and "<script" not in page.lower() and "<link" not in page
    pngs = images(page)
    assert len(pngs) == 5 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)  # loss, lr, grad, tok/s, GPU
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # the Agg canvas alone, no backend switch
    s = report.summarise_run(run)
    assert (s["state"], s["step"], s["total_steps"], s["tokens"]) == ("finished", 60, 60, 60_000)
    assert s["model"] == "Qwen/Qwen3-4B-Thinking-2507"
    assert s["tokens_per_s_mean"] == pytest.approx((50 * 1000 + 10 * 100) / 60) and s["tokens_per_s_median"] == 1000
    assert s["gpu_peak_gib"] == pytest.approx(16.0)
    assert (s["best_eval_loss"], s["best_eval_step"]) == (1.10, 50)
    assert (s["final_eval_loss"], s["final_eval_step"]) == (1.12, 60)
    assert (s["micro_batch_size"], s["grad_accum"], s["global_batch"]) == (4, 2, 8)
    assert s["wall_time_s"] == pytest.approx(2 * 60 + 5 + 10)
    assert s["advice"] == [] and s["unreadable"] == []
    assert "60 of 60" in page and "1.1000 at step 50" in page and "set_batch_size applied" in page
    json.dumps(s)  # plain values for the TUI


def test_the_summary_of_the_real_demo_run_format(tmp_path):
    """A directory as `qwen-daemon start --config configs/demo.yaml` left it (lines copied from one)."""
    run = tmp_path / "demo-20261202-043610"
    run.mkdir()
    first = ('{"kind": "train", "ts": 1796186205.389389, "step": 1, "total_steps": 24, "epoch": 0.027450980392156862, '
             '"loss": 11.956348419189453, "lr": 0.001, "grad_norm": 0.24684686958789825, "tokens": 1949, '
             '"tokens_per_s": 386.1034638924643, "step_time": 5.047869760999674, "samples_seen": 7, '
             '"micro_batch_size": 1, "grad_accum": 4, "processes": 1}')
    lines = [first]
    for step in range(2, 25):  # the same record shape for the other steps
        record = {**json.loads(first), "step": step, "ts": 1796186205.39 + 4.8 * (step - 1), "loss": 11.96 - step / 150}
        lines.append(json.dumps(record))
        if step % 8 == 0:
            lines.append(json.dumps({"kind": "eval", "ts": record["ts"] + 3.8, "step": step,
                                     "eval_loss": 11.82 - step / 500}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "events.jsonl").write_text("\n".join([
        '{"ts": 1796186200.3404088, "kind": "train_start", "step": 0, "total_steps": 24, "resumed": false, '
        '"micro_batch_size": 1, "grad_accum": 4, "processes": 1, "strategy": "ddp"}',
        '{"ts": 1796186239.303222, "kind": "evaluating", "step": 8}',
        '{"ts": 1796186243.1981733, "kind": "saving", "step": 8}',
        '{"ts": 1796186243.2769651, "kind": "checkpoint", "step": 8, "path": '
        '"runs/demo-20261202-043610/checkpoints/checkpoint-8"}',
        '{"ts": 1796186333.239741, "kind": "final_saved", "step": 24, "path": "runs/demo-20261202-043610/final"}',
        '{"ts": 1796186347.2593307, "kind": "inference_check", "step": 24, "answers": [{"question": '
        '"HMAC-SM3 的输出长度和分组长度是多少？", "reference": "分组长度 64 字节，输出 32 字节。", '
        '"generated": "绿城6"}]}',
    ]) + "\n", encoding="utf-8")
    (run / "daemon.json").write_text('{"pid": 19289, "state": "finished", "protocol": 1, "started_at": '
                                     '1796186171.0458024, "run": "demo-20261202-043610", "endpoints": {"control": '
                                     '"ipc:///tmp/qwen-daemon-0/9a4a6cba44da/control", "telemetry": '
                                     '"ipc:///tmp/qwen-daemon-0/9a4a6cba44da/telemetry", "tcp": []}}')
    (run / "config.yaml").write_text("run:\n  name: demo-20261202-043610\nmodel:\n  name_or_path: builtin:tiny-qwen3\n"
                                     "train:\n  epochs: 1.0\n  max_steps: 24\n  micro_batch_size: 1\n  grad_accum: 4\n"
                                     "  learning_rate: 0.002\n")
    (run / "data_report.json").write_text(json.dumps({
        "kept": 283, "dropped": 0, "truncated": 0, "problems": [],
        "files": {"data/crypto_qa/symmetric.jsonl": {"records": 116, "kept": 116, "dropped": 0}},
        "splits": {"train": {"records": 255, "tokens": 64203, "label_tokens": 55748, "categories": {"hash": 30},
                             "top_terms": [["证书", 180]]}},
        "without_reasoning": 0, "ignored": [], "candidate_terms": [["密钥", 338]]}, ensure_ascii=False),
        encoding="utf-8")

    page = report.write_report(run).read_text(encoding="utf-8")
    s = report.summarise_run(run)

    assert (s["run"], s["model"], s["state"], s["step"], s["total_steps"]) == (
        "demo-20261202-043610", "builtin:tiny-qwen3", "finished", 24, 24)
    assert s["tokens"] == 24 * 1949 and (s["micro_batch_size"], s["grad_accum"], s["global_batch"]) == (1, 4, 4)
    assert (s["best_eval_step"], s["best_eval_loss"]) == (24, pytest.approx(11.82 - 24 / 500))
    assert s["data"]["kept"] == 283 and s["data"]["splits"]["train"] == {"records": 255, "tokens": 64203}
    assert s["gpu_peak_gib"] is None and s["unreadable"] == []
    assert "inference check: 1 answers in inference.jsonl" in page and "checkpoint saved: checkpoint-8" in page
    assert "evaluating" not in page  # the every-few-steps detours stay out of the event table
    assert len(images(page)) == 4  # no GPU: no memory chart


# --- how runs end ------------------------------------------------------------------------------------------

def test_a_failed_run_says_failed_and_shows_the_error(tmp_path):
    error = {"ts": T0 + 50, "kind": "error", "step": 20, "message": "out of memory at micro-batch 1: Qwen3 needs 9 GiB"}
    run = write_run(tmp_path, steps=20, events=[error], state="failed", end=False)

    page = report.write_report(run).read_text(encoding="utf-8")
    s = report.summarise_run(run)

    assert s["state"] == "failed" and s["reason"] == error["message"]
    assert 'class="state failed"' in page and '<div class="error">out of memory at micro-batch 1' in page
    assert s["step"] == 20 and s["total_steps"] == 20


def test_the_reason_of_a_failure_without_an_error_event_comes_from_the_daemon_log(tmp_path):
    run = write_run(tmp_path, steps=5, state="failed", end=False)
    (run / runs.DAEMON_LOG).write_text("2026-12-02 04:36:11,048 INFO qwen_daemon.supervisor: state starting -> "
                                       "loading worker pid 1\n2026-12-02 04:40:00,000 INFO qwen_daemon.supervisor: "
                                       "state training -> failed worker exited with code 1 after 2 restart(s)\n")
    assert report.summarise_run(run)["reason"] == "worker exited with code 1 after 2 restart(s)"


@pytest.mark.parametrize(("daemon", "alive", "kinds", "expected"), [
    ({"state": "finished"}, False, ["train_start", "final_saved"], ("finished", None)),
    ({"state": "stopped"}, False, ["train_start", "stopped"], ("stopped", None)),
    ({"state": "paused"}, True, ["train_start"], ("running", None)),
    (None, False, ["train_start", "stopped"], ("stopped", None)),
    (None, False, ["train_start", "final_saved"], ("finished", None)),
    (None, False, ["train_start", "error"], ("failed", "error message")),
    ({"state": "failed"}, False, ["train_start", "crash", "worker_restarted", "train_start", "error"],
     ("failed", "error message")),
    ({"state": "finished"}, False, ["train_start", "crash", "train_start", "final_saved"], ("finished", None)),
])
def test_the_state_comes_from_daemon_json_then_from_the_events(daemon, alive, kinds, expected):
    events = [{"kind": kind, "step": i, **({"message": f"{kind} message"} if kind in ("error", "crash") else {})}
              for i, kind in enumerate(kinds)]
    assert report.run_state(daemon, alive, events) == expected


def test_a_killed_daemon_leaves_a_failed_run_that_says_so():
    crash = {"kind": "crash", "step": 7, "message": "RuntimeError: NCCL timeout"}
    state, reason = report.run_state({"state": "training"}, False, [{"kind": "train_start", "step": 0}, crash])
    assert state == "failed"
    assert "NCCL timeout" in reason and "not running" in reason and "training" in reason


def test_a_live_run_is_still_running(tmp_path, monkeypatch):
    run = write_run(tmp_path, steps=10, state="paused", end=False)
    monkeypatch.setattr(runs, "live_daemon", lambda run_dir: {"pid": 1, "state": "paused"})

    page = report.write_report(run).read_text(encoding="utf-8")
    s = report.summarise_run(run)

    assert (s["state"], s["daemon_state"], s["reason"]) == ("running", "paused", None)
    assert "still running (paused)" in page and " so far" in page


def test_steps_redone_after_a_resume_replace_the_first_attempt(tmp_path):
    run = write_run(tmp_path, steps=10, eval_every=4)
    with open(run / runs.METRICS, "a", encoding="utf-8") as f:  # resumed from checkpoint-5, on to step 12
        for step in range(6, 13):
            f.write(json.dumps(train_record(step, 0.5, 12)) + "\n")
    loaded = report.load_run(run)
    assert [r["step"] for r in loaded.train] == list(range(1, 13))
    assert [r["step"] for r in loaded.evals] == [4]  # step 8's eval belonged to the abandoned attempt
    s = report.summarise(loaded)
    assert (s["tokens"], s["final_loss"], s["total_steps"]) == (12_000, 0.5, 12)


# --- damaged files -------------------------------------------------------------------------------------------

def test_damaged_and_missing_files_are_skipped_and_named(tmp_path):
    run = write_run(tmp_path, steps=30)
    lines = (run / runs.METRICS).read_text().splitlines()
    lines.insert(5, "\x00\x00garbage{{")
    lines.insert(9, "[1, 2, 3]")
    (run / runs.METRICS).write_text("\n".join(lines) + '\n{"kind": "train", "ts": 18000000', encoding="utf-8")
    (run / runs.EVENTS).unlink()
    (run / runs.CONFIG).unlink()
    (run / runs.DAEMON_JSON).write_text('{"pid": 12, "sta')

    page = report.write_report(run).read_text(encoding="utf-8")
    s = report.summarise_run(run)

    assert s["step"] == 30 and s["tokens"] == 30_000 and s["best_eval_step"] == 30
    assert s["model"] is None and s["state"] == "failed"  # nothing says it ended
    notes = "\n".join(s["unreadable"])
    assert "metrics.jsonl: 3 unreadable line(s) skipped, line 6, 10, 36 (the last one cut short" in notes
    assert "events.jsonl: missing" in notes and "config.yaml: missing" in notes and "daemon.json: unreadable" in notes
    assert "metrics.jsonl: 3 unreadable line(s)" in page and "No events recorded." in page


@pytest.mark.parametrize("pid", [0, -1, 2**40, "12", None])
def test_a_nonsense_pid_in_daemon_json_is_no_live_daemon(tmp_path, pid):
    run = write_run(tmp_path, steps=5, state="training", end=False)
    (run / runs.DAEMON_JSON).write_text(json.dumps({"pid": pid, "state": "training", "started_at": T0}))
    s = report.summarise_run(run)
    assert s["state"] == "failed" and "the daemon is not running" in s["reason"]


def test_values_of_the_wrong_type_do_not_stop_the_report(tmp_path):
    odd_plan = {"ts": T0 + 1, "kind": "memory_plan", "step": 0, "predicted_peak": "big", "budget": 1.0}
    run = write_run(tmp_path, steps=10, events=[odd_plan, {"ts": T0 + 2, "kind": 5}],
                    fields=lambda s: {"loss": "high"} if s == 3 else {"tokens_per_s": [1]} if s == 4 else {})
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(
        {"overall": {"base": [1], "tuned": {"rouge_l": "good"}}, "per_category": "none", "loss": 3}))

    page = report.write_report(run).read_text(encoding="utf-8")

    assert "memory plan" in page  # the event still listed, by its kind
    s = report.summarise_run(run)
    assert s["step"] == 10 and math.isfinite(s["tokens_per_s_mean"])


def test_text_from_the_files_is_escaped(tmp_path):
    attack = "<script>alert('x')</script>"
    error = {"ts": T0 + 30, "kind": "error", "step": 10, "message": f"bad record {attack}"}
    data = {"kept": 9, "dropped": 1, "truncated": 0, "files": {},
            "problems": [{"file": "<b>a.jsonl</b>", "line": 3, "reason": f"{attack}: unreadable", "action": "dropped"}]}
    run = write_run(tmp_path, steps=10, events=[error], state="failed", end=False, data=data,
                    config={"model": {"name_or_path": '<img src=x onerror="alert(1)">'}})
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(
        {"split": attack, "overall": {"base": {"<i>m</i>": 1}, "tuned": {"<i>m</i>": 2}},
         "per_category": {attack: {"base": {"x": 1}, "tuned": {"x": 2}}}}))

    page = report.write_report(run).read_text(encoding="utf-8")

    assert [a["rule"] for a in report.summarise_run(run)["advice"]] == ["dropped_data"]  # names the <script> kind
    assert "<script" not in page and "<img src=x" not in page and "<i>m</i>" not in page
    assert "bad record &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page


def test_the_report_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    run = write_run(tmp_path, steps=10)
    (run / "report.html").write_text("the previous report")
    replace, seen = os.replace, []

    def checking_replace(src, dst):
        seen.append(((run / "report.html").read_text(), Path(src).read_text(encoding="utf-8")))
        replace(src, dst)

    monkeypatch.setattr(report.os, "replace", checking_replace)
    report.write_report(run)

    (old, new), = seen
    assert old == "the previous report" and new.endswith("</html>\n")  # swapped in one step, complete
    assert (run / "report.html").read_text(encoding="utf-8") == new


# --- the evaluation and the data ------------------------------------------------------------------------------

@pytest.mark.parametrize("categories", ["per_category", "by_category"])  # (metrics.summarise writes by_)
def test_the_evaluation_summary_becomes_a_before_after_table(tmp_path, categories):
    run = write_run(tmp_path, steps=10)
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(
        {"split": "test", "checkpoint": "final", "records": 14, "loss": {"base": 2.5, "tuned": 1.75},
         "overall": {"n": 14, "base": {"rouge_l": 0.2, "term_recall": 0.5},
                     "tuned": {"rouge_l": 0.35, "term_recall": 0.75}},
         categories: {"哈希": {"n": 3, "base": {"rouge_l": 0.1}, "tuned": {"rouge_l": 0.3}}, "broken": None}},
        ensure_ascii=False), encoding="utf-8")

    page = report.write_report(run).read_text(encoding="utf-8")

    row = '<td>{}</td><td class="num">{}</td><td class="num">{}</td><td class="num">{}</td>'
    assert row.format("rouge_l", "0.2", "0.35", "+0.15") in page
    assert row.format("loss", "2.5", "1.75", "-0.75") in page
    assert "<td>哈希</td>" + row.format("rouge_l", "0.1", "0.3", "+0.2") in page
    assert "split test · checkpoint final · records 14" in page


def test_the_data_report_in_brief_counts_problems_by_kind():
    problems = ([{"file": "a.jsonl", "line": i, "reason": f"too long: {900 + i} tokens > data.max_seq_len 512; "
                  "raise data.max_seq_len", "action": "dropped"} for i in range(1, 4)]
                + [{"file": "a.jsonl", "line": 9, "reason": "duplicate of a.jsonl:2 (same question and answer)",
                    "action": "dropped"},
                   {"file": "b.md", "line": 4, "reason": "too long: 600 tokens > 512; the answer was cut",
                    "action": "truncated"}])
    brief = report.data_brief({"kept": 96, "dropped": 4, "truncated": 1, "problems": problems, "files": {"a": {}}})
    assert brief["problems"] == [{"kind": "too long", "action": "dropped", "count": 3},
                                 {"kind": "duplicate", "action": "dropped", "count": 1},
                                 {"kind": "too long", "action": "truncated", "count": 1}]
    assert (brief["kept"], brief["dropped"], brief["truncated"], brief["files"]) == (96, 4, 1, 1)


@pytest.mark.parametrize(("reason", "kind"), [
    ("broken JSON: Expecting value (column 1)", "broken JSON"),
    ("same question as a.jsonl:2 with a different answer; both kept", "same question"),
    ("not UTF-8 (byte 0xff at offset 3); the file was skipped", "not UTF-8"),
    ("empty reasoning: the <thinking> block has no text", "empty reasoning"),
    ("", "other"),
])
def test_problem_kinds(reason, kind):
    assert report.problem_kind(reason) == kind


# --- advice ------------------------------------------------------------------------------------------------------

def test_a_healthy_run_gets_no_advice(tmp_path):
    run = report.load_run(write_run(tmp_path, **on_gpu(total_gib=80, peak_gib=60)))
    assert [rule(run) for rule in report.RULES] == [None] * len(report.RULES)


def test_overfitting_points_at_the_best_checkpoint(tmp_path):
    evals = {10: 1.5, 20: 1.3, 30: 1.2, 40: 1.3, 50: 1.4, 60: 1.5}
    path = write_run(tmp_path, eval_loss=evals.get)
    (path / "checkpoints" / "checkpoint-30").mkdir(parents=True)
    advice = report.advise_overfitting(report.load_run(path))
    assert advice is not None
    assert "from 1.2000 (step 30) to 1.5000 (step 60)" in advice.text
    assert "checkpoints/checkpoint-30 (the run keeps it)" in advice.text and "train.epochs: 1" in advice.text


def test_overfitting_needs_a_clear_rise(tmp_path):
    evals = {10: 1.5, 20: 1.3, 30: 1.2, 40: 1.21, 50: 1.21, 60: 1.22}  # +1.7%: noise
    assert report.advise_overfitting(report.load_run(write_run(tmp_path, eval_loss=evals.get))) is None


def test_a_flat_loss_blames_a_low_learning_rate(tmp_path):
    run = report.load_run(write_run(tmp_path, loss=lambda s: 2.0 + 0.01 * math.sin(s), fields=lambda s: {"lr": 1e-6}))
    advice = report.advise_flat_loss(run)
    assert advice is not None and "may be too low (it peaked at 1e-06" in advice.text


def test_nans_and_spikes_are_found(tmp_path):
    def loss(step):
        return math.nan if step == 40 else 9.0 if step == 30 else healthy_loss(step)

    advice = report.advise_unstable_loss(report.load_run(write_run(tmp_path, loss=loss)))
    assert advice is not None
    assert "1 step(s) with a NaN or infinite loss (first at step 40)" in advice.text
    assert "1 loss spike(s)" in advice.text and "(step 30)" in advice.text


def test_spare_gpu_memory_suggests_a_bigger_micro_batch_only_when_the_total_is_known(tmp_path):
    gpu = on_gpu(total_gib=80, peak_gib=20)
    advice = report.advise_memory_headroom(report.load_run(write_run(tmp_path, **gpu)))
    assert advice is not None and "20.0 of 80 GiB" in advice.text
    assert "train.micro_batch_size: 4 and train.grad_accum: 2" in advice.text
    unknown_total = write_run(tmp_path, "no-total", fields=gpu["fields"])  # no memory plan: GPU size unknown
    assert report.advise_memory_headroom(report.load_run(unknown_total)) is None


def test_oom_recoveries_suggest_starting_at_the_micro_batch_they_reached(tmp_path):
    oom = {"ts": T0 + 41, "kind": "oom_recovered", "step": 20, "micro_batch_size": 1, "grad_accum": 8}
    advice = report.advise_oom_recoveries(report.load_run(write_run(tmp_path, events=[oom])))
    assert advice is not None and "1 out-of-memory recovery (the first at step 20)" in advice.text
    assert "train.micro_batch_size: 1 and train.grad_accum: 8" in advice.text


def test_many_dropped_records_are_named_with_their_reasons(tmp_path):
    problems = ([{"file": "a.jsonl", "line": i, "reason": "too long: 900 tokens > data.max_seq_len 512",
                  "action": "dropped"} for i in range(25)]
                + [{"file": "b.json", "line": i, "reason": "broken JSON: Expecting ','", "action": "dropped"}
                   for i in range(5)])
    data = {"kept": 70, "dropped": 30, "truncated": 0, "problems": problems, "files": {}}
    advice = report.advise_dropped_data(report.load_run(write_run(tmp_path, data=data)))
    assert advice is not None and "30 of 100 records (30%) were dropped: too long (25), broken JSON (5)" in advice.text
    assert "raise data.max_seq_len" in advice.text


def test_advice_reaches_the_summary_and_the_page(tmp_path):
    oom = {"ts": T0 + 41, "kind": "oom_recovered", "step": 20, "micro_batch_size": 1, "grad_accum": 8}
    run = write_run(tmp_path, events=[oom])
    page = report.write_report(run).read_text(encoding="utf-8")
    assert [a["rule"] for a in report.summarise_run(run)["advice"]] == ["oom_recoveries"]
    assert "Out-of-memory recoveries" in page and "train.micro_batch_size: 1 and train.grad_accum: 8" in page


# --- long runs ----------------------------------------------------------------------------------------------------

def test_long_series_are_drawn_from_at_most_max_points_and_keep_their_spikes():
    steps = np.arange(1, 100_001, dtype=float)
    loss = np.full(steps.size, 1.0)
    loss[54_321] = 9.0
    loss[7] = math.nan
    x, mean, low, high = report.bucket(steps, loss)
    assert len(x) == report.MAX_POINTS and high.max() == 9.0 and low.min() == 1.0
    assert x[0] < 60 and x[-1] > 99_900  # the whole run, start to end


def test_the_smoothed_loss_matches_the_tui():
    losses = [3.0, 2.5, math.nan, 2.8, 2.0, 1.7, 1.9]
    view = RunView()
    for step, loss in enumerate(losses, 1):
        view._add_metric({"kind": "train", "step": step, "loss": loss})
    assert report.ema(np.array(losses)) == pytest.approx(np.array(view.train["smoothed"]))
