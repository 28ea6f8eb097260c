"""The training report: `write_report(run_dir)` writes <run_dir>/report.html, one self-contained
file (inline CSS, charts as base64 PNGs, no script, no external reference) that opens offline and
can be mailed around; `summarise_run(run_dir)` gives its summary as a dict for the terminal UI.

Everything comes from the run's files, so a finished, stopped, failed or live run all work. A crash
can leave any file cut short or missing: what cannot be read is skipped and named in the report,
never fatal. Charts use matplotlib's Agg canvas directly, not pyplot, so the process's backend is
left as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from qwen_daemon.train.guard import SPIKE_FACTOR, SPIKE_MIN_RISE, SPIKE_WINDOW
from shared import protocol, runs
from shared.events import SMOOTHING, describe_event

REPORT = "report.html"
EVAL_SUMMARY = Path("eval") / "summary.json"
MAX_POINTS = 2000         # per chart line: 100,000 steps draw as fast as 2,000
MAX_EVENT_ROWS = 1000     # the first and last of them when there are more
ROUTINE = {"evaluating", "saving"}  # every few steps, each followed by its eval record or checkpoint
BATCH_EVENTS = {"train_start", "memory_plan", "oom_recovered", "batch_restored", "command_applied"}
EVENT_GROUPS = {  # how the loss chart marks events: label -> (kinds, colour, line style)
    "OOM recovery": ({"oom_recovered", "oom_fatal"}, "#d62728", "-"),
    "restart / resume": ({"worker_restarted", "resumed", "batch_restored"}, "#9467bd", "-"),
    "command": ({"command_applied", "command_failed"}, "#1f77b4", "--"),
    "checkpoint": ({"checkpoint", "final_saved"}, "#7f7f7f", "-"),
    "anomaly": ({"crash", "error", "straggler", "anomaly", "grad_norm_spike"}, "#ff7f0e", "-."),
}


# --- reading the run ---------------------------------------------------------------------------------

@dataclass
class Run:
    """What a run's files say, read once."""

    run_dir: Path
    config: dict
    daemon: dict | None
    alive: bool            # its daemon process is running
    train: list[dict]      # one record per step: a step redone after a restart replaces the old one
    evals: list[dict]
    events: list[dict]
    data_report: dict | None
    eval_summary: dict | None
    state: str             # finished | stopped | failed | running
    reason: str | None     # why it failed
    unreadable: list[str] = field(default_factory=list)  # what was skipped, in words
    _columns: dict = field(default_factory=dict, repr=False)

    def column(self, key: str) -> np.ndarray:
        """A train-record field per step as floats, NaN where missing or not a number."""
        if key not in self._columns:
            values = [r.get(key) for r in self.train]
            try:  # numpy turns None into NaN itself, 10x faster than a check per value
                column = np.array(values, dtype=float)
            except (TypeError, ValueError, OverflowError):  # a string or a list where a number belongs
                column = np.array([_number(v) for v in values], dtype=float)
            self._columns[key] = column
        return self._columns[key]

    def setting(self, section: str, key: str, default=None):
        part = self.config.get(section)
        return part.get(key, default) if isinstance(part, dict) else default


def load_run(run_dir: Path) -> Run:
    """Read a run directory; missing or damaged files leave their part empty and a note."""
    import yaml

    run_dir = Path(run_dir)
    unreadable: list[str] = []
    train, evals = replay(_read_jsonl(run_dir / runs.METRICS, unreadable))
    events = _read_jsonl(run_dir / runs.EVENTS, unreadable)
    daemon = _read_json(run_dir / runs.DAEMON_JSON, unreadable)
    config: dict = {}
    try:
        config = yaml.safe_load((run_dir / runs.CONFIG).read_text(encoding="utf-8")) or {}
        if not isinstance(config, dict):
            unreadable.append(f"{runs.CONFIG}: not a mapping of settings; ignored")
            config = {}
    except FileNotFoundError:
        unreadable.append(f"{runs.CONFIG}: missing (the model and the settings are unknown)")
    except (OSError, ValueError, yaml.YAMLError) as e:
        unreadable.append(f"{runs.CONFIG}: unreadable ({type(e).__name__}); ignored")
    data_report = _read_json(run_dir / runs.DATA_REPORT, unreadable)
    eval_summary = _read_json(run_dir / EVAL_SUMMARY, unreadable, optional=True)
    alive = runs.live_daemon(run_dir) is not None
    state, reason = run_state(daemon, alive, events)
    if state == "failed" and reason is None:
        reason = _failed_reason_from_log(run_dir / runs.DAEMON_LOG)
    return Run(run_dir, config, daemon, alive, train, evals, events, data_report, eval_summary, state, reason,
               unreadable)


def replay(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, eval) records as they stand: a resume or restart redoes the steps after its
    checkpoint, and the redone records replace the first ones (as the TUI's chart does)."""
    train: list[dict] = []
    evals: list[dict] = []
    for record in records:
        step = record.get("step")
        if not _finite(step):
            continue
        if record.get("kind") == "train":
            while train and train[-1]["step"] >= step:
                train.pop()
            while evals and evals[-1]["step"] >= step:
                evals.pop()
            train.append(record)
        elif record.get("kind") == "eval":
            evals.append(record)
    return train, evals


def run_state(daemon: dict | None, alive: bool, events: list[dict]) -> tuple[str, str | None]:
    """(state, reason): finished, stopped, failed or running, from daemon.json and the events; the
    reason says why a run failed. Only events since the last train_start count: an error before a
    successful restart is history."""
    starts = [i for i, e in enumerate(events) if e.get("kind") == "train_start"]
    recent = events[starts[-1] + 1:] if starts else events
    errors = [e for e in recent if e.get("kind") in ("error", "oom_fatal", "crash")]
    reason = str(errors[-1].get("message") or errors[-1].get("kind")) if errors else None
    last_state = (daemon or {}).get("state")
    if last_state in protocol.FINAL_STATES:
        return last_state, reason if last_state == "failed" else None
    if alive:
        return "running", None
    kinds = {e.get("kind") for e in recent}
    if kinds & {"error", "oom_fatal"}:
        return "failed", reason
    if "stopped" in kinds:
        return "stopped", None
    if "final_saved" in kinds:
        return "finished", None
    gone = (f"the daemon is not running (killed or crashed); its last state was {last_state}" if daemon
            else "no readable daemon.json and events.jsonl shows no end: the run was interrupted")
    return "failed", f"{reason} ({gone})" if reason else gone


def _read_jsonl(path: Path, unreadable: list[str]) -> list[dict]:
    """The records of a JSON-lines file, like runs.read_jsonl, but saying what it skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        unreadable.append(f"{path.name}: missing")
        return []
    except OSError as e:
        unreadable.append(f"{path.name}: cannot be read ({e.strerror})")
        return []
    lines = data.split(b"\n")
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # (a bad UTF-8 byte is a ValueError too)
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if bad:
        where = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        cut = " (the last one cut short: a crash, or a run still writing)" if bad[-1] == len(lines) else ""
        unreadable.append(f"{path.name}: {len(bad)} unreadable line(s) skipped, line {where}{cut}")
    return records


def _read_json(path: Path, unreadable: list[str], optional: bool = False) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not optional:
            unreadable.append(f"{path.name}: missing")
        return None
    except (OSError, ValueError, RecursionError) as e:
        unreadable.append(f"{path.name}: unreadable ({type(e).__name__}); ignored")
        return None
    if not isinstance(value, dict):
        unreadable.append(f"{path.name}: not a JSON object; ignored")
        return None
    return value




def _failed_reason_from_log(path: Path) -> str | None:
    """The supervisor's 'state X -> failed REASON' line: its reason when no event gave one."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 200_000))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    found = re.findall(r"state \w+ -> failed (.+)", text)
    return (found[-1].strip() or None) if found else None


# --- the summary ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Advice:
    """One piece of advice the run's figures support."""

    rule: str   # which rule, e.g. "overfitting"
    title: str
    text: str   # what the figures show and what to change
    zh: str = ""


def summarise_run(run_dir: Path) -> dict:
    """The report's summary as plain JSON-ready values, for the terminal UI."""
    return summarise(load_run(run_dir))


def summarise(run: Run) -> dict:
    last = run.train[-1] if run.train else {}
    tokens_per_s = _finite_values(run.column("tokens_per_s"))
    peaks = _finite_values(run.column("gpu_peak"))
    evals = eval_points(run)
    best = min(evals, key=lambda p: p[1]) if evals else None
    micro_batch_size, grad_accum, processes = final_batch(run)
    started, ended = _time_span(run)
    return {
        "run": run.run_dir.name,
        "model": _text(run.setting("model", "name_or_path")),
        "state": run.state,
        "daemon_state": (run.daemon or {}).get("state") if run.state == "running" else None,
        "reason": run.reason,
        "started_at": started,
        "ended_at": ended,
        "wall_time_s": ended - started if started is not None and ended is not None else None,
        "step": int(last["step"]) if last else 0,
        "total_steps": total_steps(run),
        "tokens": int(np.nansum(run.column("tokens"))),
        "tokens_per_s_mean": float(tokens_per_s.mean()) if tokens_per_s.size else None,
        "tokens_per_s_median": float(np.median(tokens_per_s)) if tokens_per_s.size else None,
        "final_loss": _last_finite(run.column("loss")),
        "gpu_peak_gib": float(peaks.max()) if peaks.size else None,
        "gpu_total_gib": gpu_total_gib(run),
        "best_eval_loss": best[1] if best else None,
        "best_eval_step": best[0] if best else None,
        "final_eval_loss": evals[-1][1] if evals else None,
        "final_eval_step": evals[-1][0] if evals else None,
        "micro_batch_size": micro_batch_size,
        "grad_accum": grad_accum,
        "processes": processes,
        "global_batch": (micro_batch_size * grad_accum * (processes or 1)
                         if micro_batch_size is not None and grad_accum is not None else None),
        "events": dict(Counter(str(e.get("kind")) for e in run.events if e.get("kind") not in ROUTINE)),
        "data": data_brief(run.data_report),
        "evaluation": run.eval_summary,
        "advice": [asdict(a) for a in advise(run)],
        "unreadable": list(run.unreadable),
    }


def eval_points(run: Run) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["eval_loss"])) for r in run.evals if _finite(r.get("eval_loss"))]


def total_steps(run: Run) -> int | None:
    for record in [*reversed(run.train[-1:]), *reversed([e for e in run.events if e.get("kind") == "train_start"])]:
        if _finite(record.get("total_steps")):
            return int(record["total_steps"])
    max_steps = run.setting("train", "max_steps")
    return int(max_steps) if _finite(max_steps) else None


def final_batch(run: Run) -> tuple[int | None, int | None, int | None]:
    """(micro_batch_size, grad_accum, processes) in effect at the end: the newest of the last train
    record and the events that change it (an OOM, a command after the last step)."""
    candidates = [r for r in (run.train[-1:] + [e for e in run.events if e.get("kind") in BATCH_EVENTS])
                  if _finite(r.get("micro_batch_size")) and _finite(r.get("grad_accum"))]
    if not candidates:
        return None, None, None
    newest = max(candidates, key=lambda r: _number(r.get("ts")) if _finite(r.get("ts")) else -math.inf)
    processes = next((r["processes"] for r in reversed(candidates) if _finite(r.get("processes"))), None)
    return int(newest["micro_batch_size"]), int(newest["grad_accum"]), None if processes is None else int(processes)


def gpu_total_gib(run: Run) -> float | None:
    """The GPU's memory in GiB where the run recorded it: a `gpu_total` field, or the GPU the memory
    plan was fitted on ("NVIDIA H200 140 GiB x1")."""
    for record in reversed(run.train[-1:] + run.events):
        if _finite(record.get("gpu_total")) and record["gpu_total"] > 0:
            return float(record["gpu_total"])
        match = re.search(r"(\d+(?:\.\d+)?) GiB x\d+$", str(record.get("fitted_on", "")))
        if record.get("kind") == "memory_plan" and match and float(match.group(1)) > 0:
            return float(match.group(1))
    return None


def _time_span(run: Run) -> tuple[float | None, float | None]:
    """First and last moment the files record; a live run ends now."""
    starts = [(run.daemon or {}).get("started_at"), *(r.get("ts") for r in (run.train[:1] + run.events[:1]))]
    ends = [r.get("ts") for r in (run.train[-1:] + run.evals[-1:] + run.events[-1:])]
    starts, ends = [float(t) for t in starts if _finite(t)], [float(t) for t in ends if _finite(t)]
    if run.state == "running":
        ends = [time.time()]
    return (min(starts) if starts else None), (max(ends) if ends else None)


def data_brief(report: dict | None) -> dict | None:
    """The data check in brief: record counts and problems by kind and action."""
    if not isinstance(report, dict):
        return None
    problems = report.get("problems") if isinstance(report.get("problems"), list) else []
    problems = [p for p in problems if isinstance(p, dict)]
    by_kind = Counter((problem_kind(str(p.get("reason", ""))), str(p.get("action", "dropped"))) for p in problems)
    splits = report.get("splits") if isinstance(report.get("splits"), dict) else {}
    return {
        "kept": _int_or_none(report.get("kept")),
        "dropped": _int_or_none(report.get("dropped")),
        "truncated": _int_or_none(report.get("truncated")),
        "without_reasoning": _int_or_none(report.get("without_reasoning")),
        "files": len(report["files"]) if isinstance(report.get("files"), dict) else None,
        "ignored": len(report["ignored"]) if isinstance(report.get("ignored"), list) else 0,
        "splits": {str(name): {"records": _int_or_none(s.get("records")), "tokens": _int_or_none(s.get("tokens"))}
                   for name, s in splits.items() if isinstance(s, dict)},
        "problems": [{"kind": kind, "action": action, "count": n} for (kind, action), n in by_kind.most_common()],
    }


def problem_kind(reason: str) -> str:
    """A data problem's kind from its reason: 'too long' from 'too long: 900 tokens > ...',
    'duplicate' from 'duplicate of a.jsonl:3 (...)'."""
    head = re.split(r"[:;(]| of | as ", reason, maxsplit=1)[0].strip()
    return head[:60] or "other"


# --- advice: one small rule each ---------------------------------------------------------------------

OVERFIT_RISE = 0.03       # eval loss this far above its best ...
OVERFIT_TRAIN_FALL = 0.01  # ... while the train loss fell at least this much since the best step
FLAT_CHANGE = 0.02        # the loss moved less than this between the first and last tenth of the run
FLAT_MIN_STEPS = 20
FLAT_LOW_LR = 1e-4        # a flat loss under a peak learning rate below this blames the learning rate
HEADROOM_USE = 0.85       # a bigger micro-batch is advised when its upper-bound peak fits in this share
DROPPED_SHARE = 0.10


def advise_overfitting(run: Run) -> Advice | None:
    """Eval loss rising from its best while the train loss keeps falling."""
    evals = eval_points(run)
    if len(evals) < 3:
        return None
    best_step, best = min(evals, key=lambda p: p[1])
    final_step, final = evals[-1]
    if final_step == best_step or final < best * (1 + OVERFIT_RISE):
        return None
    steps, loss = run.column("step"), run.column("loss")
    window = max(3, len(steps) // 20)
    at_best = _finite_values(loss[steps <= best_step])[-window:]
    at_end = _finite_values(loss)[-window:]
    if not at_best.size or not at_end.mean() < at_best.mean() * (1 - OVERFIT_TRAIN_FALL):
        return None
    checkpoint = Path("checkpoints") / f"checkpoint-{best_step}"
    keep = (f"use the best checkpoint, {checkpoint} (the run keeps it)" if (run.run_dir / checkpoint).is_dir()
            else f"use the checkpoint of step {best_step}, the best")
    record = next((r for r in run.train if r["step"] == best_step), {})
    if run.setting("train", "max_steps") is None and _finite(record.get("epoch")):
        shorter = f"train.epochs: {math.ceil(record['epoch'] * 100) / 100:g}"
    else:
        shorter = f"train.max_steps: {best_step}"
    return Advice("overfitting", "Overfitting: eval loss rises while train loss falls",
                  f"Eval loss rose from {best:.4f} (step {best_step}) to {final:.4f} (step {final_step}) while the "
                  f"training loss fell from {at_best.mean():.4f} to {at_end.mean():.4f}. Either {keep}, or train "
                  f"less: {shorter} stops near the best step.",
                  "验证集损失上升而训练损失下降：模型过拟合。请使用最佳检查点，或减少训练轮数。")


def advise_flat_loss(run: Run) -> Advice | None:
    """The loss barely moved over the run."""
    loss = _finite_values(run.column("loss"))
    if loss.size < FLAT_MIN_STEPS:
        return None
    tenth = max(3, loss.size // 10)
    first, last = loss[:tenth].mean(), loss[-tenth:].mean()
    if first <= 0 or abs(last - first) / first >= FLAT_CHANGE:
        return None
    lrs = _finite_values(run.column("lr"))
    if lrs.size and lrs.max() >= FLAT_LOW_LR:
        lr = f"The learning rate is not low (it peaked at {lrs.max():.2g}): look at the data first."
        zh = "损失几乎不下降：学习率并不低，请检查数据和标签。"
    else:
        zh = "损失几乎不下降：学习率可能过低，或数据/标签有问题。"
        peak = f"it peaked at {lrs.max():.2g}" if lrs.size else "it was not recorded"
        lr = (f"The learning rate may be too low ({peak}; QLoRA commonly uses 1e-4 to 2e-4, "
              "train.learning_rate), or the data may be the problem.")
    return Advice("flat_loss", "Flat loss: the model is hardly learning",
                  f"The training loss went from {first:.4f} to {last:.4f} ({(last - first) / first:+.1%}) over "
                  f"{loss.size} steps. {lr} Are the labels the answers you mean to teach? See the data report "
                  "below and `qwen-daemon data check`.", zh)


def advise_unstable_loss(run: Run) -> Advice | None:
    """NaN or infinite losses, or spikes far above the recent median."""
    steps, loss = run.column("step"), run.column("loss")
    bad = nonfinite_loss_steps(run)
    spikes = steps[loss_spikes(loss)].astype(int)
    if not bad and not spikes.size:
        return None
    found = []
    if bad:
        found.append(f"{len(bad)} step(s) with a NaN or infinite loss (first at step {bad[0]})")
    if spikes.size:
        where = ", ".join(map(str, spikes[:5])) + (" ..." if spikes.size > 5 else "")
        found.append(f"{spikes.size} loss spike(s) over {SPIKE_FACTOR:g}x the median of the {SPIKE_WINDOW} steps "
                     f"before (step {where})")
    clip = run.setting("train", "max_grad_norm")
    return Advice("unstable_loss", "Unstable loss: NaNs or spikes",
                  f"{_sentence(' and '.join(found))}. Lower train.learning_rate (e.g. halve it), keep gradient "
                  f"clipping on (train.max_grad_norm{f' is {clip}' if clip is not None else ''}), and look at the "
                  "records trained around those steps.",
                  "损失出现 NaN 或尖峰：请降低学习率，保持梯度裁剪，并检查相应步数附近的数据。")


def advise_memory_headroom(run: Run) -> Advice | None:
    """Much GPU memory left free at the final micro-batch: a bigger one would be faster."""
    if any(e.get("kind") in ("oom_recovered", "oom_fatal") for e in run.events):
        return None
    if run.setting("train", "micro_batch_size") == "auto":
        return None  # the memory plan measured this GPU and chose the fastest plan that fits
    total = gpu_total_gib(run)
    micro_batch_size, grad_accum, _ = final_batch(run)
    if total is None or micro_batch_size is None or grad_accum < 2:
        return None  # without accumulation to trade, a bigger micro-batch changes the global batch
    peaks = _finite_values(np.array([_number(r.get("gpu_peak")) for r in run.train
                                     if r.get("micro_batch_size") == micro_batch_size]))
    if not peaks.size:
        return None
    factor = next(d for d in range(2, grad_accum + 1) if grad_accum % d == 0)
    # An upper bound: the weights and the optimizer state do not grow with the micro-batch.
    needed = peaks.max() * factor
    if needed > HEADROOM_USE * total:
        return None
    bigger, accum = micro_batch_size * factor, grad_accum // factor
    return Advice("memory_headroom", "GPU memory to spare: use a bigger micro-batch",
                  f"Peak GPU memory was {peaks.max():.1f} of {total:g} GiB at micro-batch {micro_batch_size}. "
                  f"Micro-batch {bigger} x accumulation {accum} keeps the global batch and needs at most "
                  f"{needed:.1f} GiB: set train.micro_batch_size: {bigger} and train.grad_accum: {accum} (or "
                  f"`qwen-daemon ctl set-batch-size {bigger}` on a running run), usually faster.",
                  f"显存余量充足：可将 micro-batch 增大到 {bigger}（梯度累积 {accum}），全局 batch 不变。")


def advise_oom_recoveries(run: Run) -> Advice | None:
    """Out-of-memory recoveries happened: start where they ended."""
    ooms = [e for e in run.events if e.get("kind") == "oom_recovered" and _finite(e.get("micro_batch_size"))]
    if not ooms:
        return None
    smallest = min(ooms, key=lambda e: e["micro_batch_size"])
    micro_batch_size, grad_accum = int(smallest["micro_batch_size"]), smallest.get("grad_accum")
    restarts = sum(1 for e in ooms if e.get("restarted"))
    if run.setting("train", "micro_batch_size") == "auto":
        headroom = run.setting("train", "memory_headroom", 0.1)
        headroom = headroom if _finite(headroom) else 0.1
        fix = (f"the memory plan was too optimistic for this data: raise train.memory_headroom from "
               f"{headroom:g} to {min(0.5, headroom + 0.1):g}")
    elif run.setting("train", "global_batch_size") is not None or not _finite(grad_accum):
        fix = f"start with train.micro_batch_size: {micro_batch_size}"
    else:
        fix = f"start with train.micro_batch_size: {micro_batch_size} and train.grad_accum: {int(grad_accum)}"
    step = ooms[0].get("step")
    return Advice("oom_recoveries", "Out-of-memory recoveries",
                  f"{len(ooms)} out-of-memory recover{'y' if len(ooms) == 1 else 'ies'} (the first at step {step})"
                  f"{f', {restarts} with a restart of the workers' if restarts else ''}, down to micro-batch "
                  f"{micro_batch_size}. Each one costs a retry; {fix} so that the next run does not hit them.",
                  f"训练中发生显存不足（OOM）并自动降到 micro-batch {micro_batch_size}；下次请直接从这个值开始。")


def advise_dropped_data(run: Run) -> Advice | None:
    """A large share of the data records was dropped by the data check."""
    brief = data_brief(run.data_report)
    if not brief or not brief["dropped"]:
        return None
    total = (brief["kept"] or 0) + brief["dropped"]
    if brief["dropped"] < DROPPED_SHARE * total:
        return None
    reasons = [f"{p['kind']} ({p['count']})" for p in brief["problems"] if p["action"] == "dropped"][:3]
    hint = (" Most were too long: raise data.max_seq_len or set data.overlong: truncate."
            if reasons and reasons[0].startswith("too long") else "")
    return Advice("dropped_data", "Many data records were dropped",
                  f"{brief['dropped']} of {total} records ({brief['dropped'] / total:.0%}) were dropped"
                  f"{': ' + ', '.join(reasons) if reasons else ''}.{hint} `qwen-daemon data check PATHS --config "
                  "CONFIG` lists each one with its file and line.",
                  f"有 {brief['dropped'] / total:.0%} 的数据记录被丢弃，请检查数据。")


RULES = (advise_overfitting, advise_flat_loss, advise_unstable_loss, advise_memory_headroom,
         advise_oom_recoveries, advise_dropped_data)


def advise(run: Run) -> list[Advice]:
    """The advice every rule finds in the run."""
    return [advice for rule in RULES if (advice := rule(run)) is not None]


def nonfinite_loss_steps(run: Run) -> list[int]:
    """Steps whose loss was NaN or infinite (not merely missing)."""
    return [int(r["step"]) for r in run.train if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"])]


def loss_spikes(loss: np.ndarray) -> np.ndarray:
    """Positions in `loss` over SPIKE_FACTOR x (and SPIKE_MIN_RISE above) the median of the
    SPIKE_WINDOW finite losses before them."""
    where = np.flatnonzero(np.isfinite(loss))
    values = loss[where]
    if values.size <= SPIKE_WINDOW:
        return np.array([], dtype=int)
    median = np.median(np.lib.stride_tricks.sliding_window_view(values[:-1], SPIKE_WINDOW), axis=1)
    later = values[SPIKE_WINDOW:]
    return where[SPIKE_WINDOW:][(later > SPIKE_FACTOR * median) & (later > median + SPIKE_MIN_RISE)]


# --- charts ----------------------------------------------------------------------------------------------

def charts(run: Run) -> list[tuple[str, bytes]]:
    """(title, PNG) per chart the run has figures for."""
    out = [("Loss", loss_chart(run))]
    for key, title in (("lr", "Learning rate"), ("grad_norm", "Gradient norm (before clipping)"),
                       ("tokens_per_s", "Tokens/s")):
        out.append((title, line_chart(run, title, {title: run.column(key)})))
    memory = {f"{name} (GiB)": run.column(f"gpu_{name}") for name in ("allocated", "reserved", "peak")}
    out.append(("GPU memory", line_chart(run, "GPU memory (GiB)", memory, ceiling=gpu_total_gib(run))))
    return [(title, png) for title, png in out if png is not None]


def loss_chart(run: Run) -> bytes | None:
    steps, loss = run.column("step"), run.column("loss")
    evals = eval_points(run)
    if not np.isfinite(loss).any() and not evals:
        return None
    fig, ax = _figure("Loss")
    x, mean, low, high = bucket(steps, loss)
    if len(x) < np.isfinite(loss).sum():
        ax.fill_between(x, low, high, color="#1f77b4", alpha=0.15, lw=0, label="train loss, range per point")
    ax.plot(x, mean, color="#1f77b4", lw=0.8, alpha=0.6, label="train loss")
    x, smoothed, _, _ = bucket(steps, ema(loss))
    ax.plot(x, smoothed, color="#08306b", lw=1.8, label=f"smoothed (EMA {SMOOTHING:g})")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-" if len(evals) <= 50 else "-", color="#2ca02c", ms=4, lw=1.2, zorder=3,
                label="eval loss")
    marks = {label: [e.get("step") for e in run.events if e.get("kind") in kinds]
             for label, (kinds, _, _) in EVENT_GROUPS.items()}
    marks["anomaly"] += [*nonfinite_loss_steps(run), *steps[loss_spikes(loss)]]
    for label, (_, colour, style) in EVENT_GROUPS.items():
        xs = [s for s in marks[label] if _finite(s)]
        # Checkpoints come every few hundred steps: ticks along the bottom, not a wall of lines.
        top = 0.05 if label == "checkpoint" else 1
        if xs:
            ax.vlines(xs, 0, top, transform=ax.get_xaxis_transform(), colors=colour, linestyles=style,
                      lw=1.2, alpha=0.8, label=f"{label} ({len(xs)})")
    _clip_outliers(ax, loss)
    _legend(ax)
    return _png(fig)


def _clip_outliers(ax, values: np.ndarray) -> None:
    """A loss of 1e4 at one step would flatten the rest of the curve: cut the axis above the bulk
    of the values and say so (the spike is marked as an anomaly anyway)."""
    finite = _finite_values(values)
    if finite.size < 100:
        return
    bulk = np.percentile(finite, 99.5)
    if finite.max() > 3 * bulk > 0:
        low, top = finite.min(), 1.5 * bulk
        ax.set_ylim(low - 0.05 * (top - low), top)
        ax.set_title(f"y axis cut at {1.5 * bulk:.3g}; the largest loss was {finite.max():.3g}", loc="right",
                     fontsize=8, color="#d62728")


def line_chart(run: Run, title: str, lines: dict[str, np.ndarray], ceiling: float | None = None) -> bytes | None:
    steps = run.column("step")
    lines = {label: y for label, y in lines.items() if np.isfinite(y).any()}
    if not lines:
        return None
    fig, ax = _figure(title)
    for label, y in lines.items():
        x, mean, _, high = bucket(steps, y)
        ax.plot(x, high if "peak" in label else mean, lw=1, label=label)
    if ceiling is not None:
        ax.axhline(ceiling, color="#d62728", ls="--", lw=1, label=f"GPU total ({ceiling:g} GiB)")
    ax.set_ylim(bottom=0)
    if len(lines) > 1 or ceiling is not None:
        _legend(ax)
    return _png(fig)


def bucket(x: np.ndarray, y: np.ndarray, points: int = MAX_POINTS) -> tuple[np.ndarray, ...]:
    """At most `points` points to draw: (x, mean, min, max) of equal runs of consecutive finite
    values, so that a spike still shows in the max however long the run."""
    finite = np.isfinite(y)
    x, y = x[finite], y[finite]
    if len(x) <= points:
        return x, y, y, y
    starts = np.linspace(0, len(x), points + 1).astype(int)[:-1]
    counts = np.diff(np.append(starts, len(x)))
    return (np.add.reduceat(x, starts) / counts, np.add.reduceat(y, starts) / counts,
            np.minimum.reduceat(y, starts), np.maximum.reduceat(y, starts))


def ema(values: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """The TUI's smoothed line (qwen_tui/client.py), value for value: TensorBoard's debiased
    exponential moving average over the steps, a non-finite loss holding the previous value."""
    out = np.empty_like(values)
    previous = math.nan
    for n, value in enumerate(values.tolist()):
        if not math.isfinite(value):
            out[n] = previous
            continue
        if math.isnan(previous):
            previous = value
        else:
            weight = smoothing * (1 - smoothing ** n) / (1 - smoothing ** (n + 1))
            previous = weight * previous + (1 - weight) * value
        out[n] = previous
    return out


def _figure(title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return fig, ax


def _legend(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside: never on a curve


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


# --- the HTML --------------------------------------------------------------------------------------------

def write_report(run_dir: Path) -> Path:
    """Write <run_dir>/report.html (atomically: a browser never sees half a file) and return its path.
    Damaged or missing run files do not stop it; an OSError means the directory cannot be written."""
    run = load_run(run_dir)
    page = render(run, summarise(run), charts(run))
    path = run.run_dir / REPORT
    runs.write_text_atomic(path, page)
    return path


CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "PingFang SC", "Microsoft YaHei", "Noto Sans CJK SC",
       sans-serif; color: #222; max-width: 1060px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee;
       text-align: left; vertical-align: top; } th { background: #f6f6f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { display: inline-block; padding: 2px 10px; border-radius: 10px; color: #fff; font-weight: 600; }
.finished { background: #2ca02c; } .stopped { background: #7f7f7f; } .failed { background: #d62728; }
.running { background: #1f77b4; }
.note { background: #fff6e0; border-left: 4px solid #f0a000; padding: 6px 12px; margin: 10px 0; }
.error { background: #fdecea; border-left: 4px solid #d62728; padding: 6px 12px; margin: 10px 0;
         white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; }
.advice { border-left: 4px solid #1f77b4; background: #f2f7fc; padding: 6px 12px; margin: 8px 0; }
.advice b { display: block; } .zh { color: #555; }
img { max-width: 100%; display: block; margin: 6px 0 14px; }
.events td:nth-child(4) { word-break: break-word; }
.muted { color: #777; }
"""


def render(run: Run, summary: dict, images: list[tuple[str, bytes]]) -> str:
    """The page: every text from the run's files goes through html.escape."""
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{e(summary['run'])}: training report</title><style>{CSS}</style></head><body>",
             f"<h1>{e(summary['run'])} <span class=\"state {e(summary['state'])}\">{e(_state_words(summary))}"
             f"</span></h1>",
             f"<div class=\"muted\">{e(summary['model'] or 'model unknown')} · report written "
             f"{e(_clock(time.time()))}</div>"]
    if summary["reason"]:
        parts.append(f"<div class=\"error\">{e(summary['reason'])}</div>")
    if summary["unreadable"]:
        parts.append("<div class=\"note\">Some of the run's files could not be read in full; the report shows "
                     "the rest:<ul>" + "".join(f"<li>{e(u)}</li>" for u in summary["unreadable"]) + "</ul></div>")
    parts += ["<h2>Summary</h2>", _table(None, _summary_rows(summary))]
    if summary["advice"]:
        parts.append("<h2>Advice</h2>")
        parts += [_advice(a) for a in summary["advice"]]
    if summary["evaluation"]:
        parts += ["<h2>Evaluation: base model against the tuned one</h2>", _evaluation(summary["evaluation"])]
    parts.append("<h2>Charts</h2>")
    if not images:
        parts.append("<p class=\"muted\">No training steps recorded yet.</p>")
    for title, png in images:
        parts.append(f"<img alt=\"{e(title)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode('ascii')}\">")
    parts += ["<h2>Data</h2>", _data(summary["data"]), "<h2>Events</h2>", _events(run.events, summary["started_at"])]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _advice(advice: dict) -> str:
    zh = f"<div class=\"zh\">{html.escape(advice['zh'])}</div>" if advice["zh"] else ""
    return f"<div class=\"advice\"><b>{html.escape(advice['title'])}</b>{html.escape(advice['text'])}{zh}</div>"


def _state_words(summary: dict) -> str:
    if summary["state"] == "running":
        return f"still running ({summary['daemon_state']})" if summary["daemon_state"] else "still running"
    return summary["state"]


def _summary_rows(s: dict) -> list[list[str]]:
    steps = f"{s['step']:,} of {s['total_steps']:,}" if s["total_steps"] else f"{s['step']:,}"
    wall = _duration(s["wall_time_s"]) + (" so far" if s["state"] == "running" and s["wall_time_s"] else "")
    rows = [["model", s["model"] or "unknown"],
            ["state", _state_words(s)],
            ["started", _clock(s["started_at"])],
            ["wall time", wall],
            ["steps", steps],
            ["tokens", f"{s['tokens']:,}"],
            ["tokens/s", f"mean {_num(s['tokens_per_s_mean'], '.0f')}, median {_num(s['tokens_per_s_median'], '.0f')}"
                         if s["tokens_per_s_mean"] is not None else "unknown"],
            ["final train loss", _num(s["final_loss"], ".4f")]]
    if s["gpu_peak_gib"] is not None:
        total = f" of {s['gpu_total_gib']:g} GiB" if s["gpu_total_gib"] else ""
        rows.append(["peak GPU memory", f"{s['gpu_peak_gib']:.2f} GiB{total}"])
    if s["best_eval_loss"] is not None:
        rows.append(["best eval loss", f"{s['best_eval_loss']:.4f} at step {s['best_eval_step']}"])
        rows.append(["final eval loss", f"{s['final_eval_loss']:.4f} at step {s['final_eval_step']}"])
    if s["micro_batch_size"] is not None:
        processes = f" x {s['processes']} processes" if (s["processes"] or 1) > 1 else ""
        rows.append(["final batch", f"micro-batch {s['micro_batch_size']} x accumulation {s['grad_accum']}"
                                    f"{processes} = global {s['global_batch']}"])
    return rows


def _evaluation(summary: dict) -> str:
    """The before/after table of eval/summary.json; parts missing or of another shape are skipped."""
    overall = summary.get("overall") if isinstance(summary.get("overall"), dict) else {}
    rows = []
    for name in ("loss", "perplexity"):  # written next to the scores, as {base, tuned}
        if isinstance(summary.get(name), dict):
            rows.append(_comparison(name, summary[name].get("base"), summary[name].get("tuned")))
    base, tuned = _mapping(overall.get("base")), _mapping(overall.get("tuned"))
    rows += [_comparison(metric, base.get(metric), tuned.get(metric)) for metric in _keys(base, tuned)]
    where = " · ".join(f"{k} {summary[k]}" for k in ("split", "checkpoint", "records") if summary.get(k) is not None)
    out = [f"<p class=\"muted\">{html.escape(where)}</p>" if where else "",
           _table(["metric", "base", "tuned", "change"], rows, numeric=(1, 2, 3)) if rows else
           "<p class=\"muted\">eval/summary.json has no overall figures.</p>"]
    # The brief named it per_category; qwen_daemon/train/metrics.py's summarise() writes by_category.
    categories = summary.get("per_category") or summary.get("by_category")
    if isinstance(categories, dict) and categories:
        rows = []
        for category, parts in categories.items():
            parts = _mapping(parts)
            base, tuned = _mapping(parts.get("base")), _mapping(parts.get("tuned"))
            rows += [[str(category), *_comparison(metric, base.get(metric), tuned.get(metric))]
                     for metric in _keys(base, tuned)]
        out += ["<p>Per category:</p>", _table(["category", "metric", "base", "tuned", "change"], rows,
                                               numeric=(2, 3, 4))]
    return "\n".join(out)


def _comparison(metric, base, tuned) -> list[str]:
    change = f"{tuned - base:+.4g}" if _finite(base) and _finite(tuned) else ""
    return [str(metric), _num(base, ".4g"), _num(tuned, ".4g"), change]


def _data(brief: dict | None) -> str:
    if brief is None:
        return "<p class=\"muted\">No data report (data_report.json) in the run directory.</p>"
    counts = ", ".join(f"{brief[k]:,} {k.replace('_', ' ')}" for k in ("kept", "dropped", "truncated",
                                                                     "without_reasoning") if brief[k] is not None)
    files = f" from {brief['files']} file(s)" if brief["files"] is not None else ""
    ignored = f"; {brief['ignored']} file(s) ignored (not data)" if brief["ignored"] else ""
    out = [f"<p>Records: {html.escape(counts)}{files}{ignored}.</p>"]
    if brief["splits"]:
        splits = [[name, _num(s["records"], ","), _num(s["tokens"], ",")] for name, s in brief["splits"].items()]
        out.append(_table(["split", "records", "tokens"], splits, numeric=(1, 2)))
    if brief["problems"]:
        problems = [[p["kind"], p["action"], str(p["count"])] for p in brief["problems"]]
        out += ["<p>Problems by kind:</p>", _table(["kind", "action", "count"], problems, numeric=(2,))]
    else:
        out.append("<p>No problems found.</p>")
    return "\n".join(out)


def _events(events: list[dict], start: float | None) -> str:
    rows = []
    for group in _runs_of_checkpoints([e for e in events if e.get("kind") not in ROUTINE]):
        first, last = group[0], group[-1]
        ts = first.get("ts")
        since = f"+{_duration(ts - start)}" if _finite(ts) and start is not None else ""
        if len(group) == 1:
            rows.append([_clock(ts), since, _step(first), describe_event(first)])
        else:
            names = [Path(str(e.get("path", ""))).name for e in (first, last)]
            rows.append([_clock(ts), since, f"{_step(first)}-{_step(last)}",
                         f"{len(group)} checkpoints saved: {names[0]} ... {names[1]}"])
    if not rows:
        return "<p class=\"muted\">No events recorded.</p>"
    if len(rows) > MAX_EVENT_ROWS:  # the beginning (the plan) and the end (how it finished) matter most
        head = MAX_EVENT_ROWS // 10
        hidden = len(rows) - MAX_EVENT_ROWS
        rows = rows[:head] + [["", "", "", f"... {hidden:,} rows not shown ..."]] + rows[-(MAX_EVENT_ROWS - head):]
    return "<div class=\"events\">" + _table(["time", "since start", "step", "event"], rows, numeric=(2,)) + "</div>"


def _runs_of_checkpoints(events: list[dict]) -> list[list[dict]]:
    """Each event alone, except consecutive checkpoints (one every few hundred steps): one row."""
    groups: list[list[dict]] = []
    for event in events:
        if event.get("kind") == "checkpoint" and groups and groups[-1][-1].get("kind") == "checkpoint":
            groups[-1].append(event)
        else:
            groups.append([event])
    return groups


def _step(event: dict) -> str:
    return str(int(event["step"])) if _finite(event.get("step")) else ""


def _table(header: list[str] | None, rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """A table; every cell is escaped."""
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{e(str(c))}</td>" if i in numeric else f"<td>{e(str(c))}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


# --- small helpers ---------------------------------------------------------------------------------------

def _finite(value) -> bool:
    """A real number (not a bool, not NaN, not an integer too large for a float)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(_number(value))


def _number(value) -> float:
    try:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        return math.nan


def _finite_values(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def _last_finite(values: np.ndarray) -> float | None:
    finite = _finite_values(values)
    return float(finite[-1]) if finite.size else None


def _int_or_none(value) -> int | None:
    return int(value) if _finite(value) else None


def _text(value) -> str | None:
    return None if value is None else str(value)


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _keys(*mappings: dict) -> list:
    return list(dict.fromkeys(k for m in mappings for k in m))


def _num(value, spec: str) -> str:
    if _finite(value):
        return format(value, spec)
    return "" if value is None else str(value)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _duration(seconds: float | None) -> str:
    if not _finite(seconds):
        return "unknown"
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def _clock(ts) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if _finite(ts) else ""
    except (OverflowError, OSError, ValueError):  # a time far outside the calendar
        return ""
