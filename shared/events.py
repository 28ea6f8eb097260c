"""Words for a run's events and numbers both sides agree on: one line per event (the TUI's events
pane, the report's event table), the loss smoothing (the TUI's chart, the report's chart)."""

from __future__ import annotations

from pathlib import Path

SMOOTHING = 0.9  # TensorBoard-style exponential moving average of the training loss


def describe_event(event: dict) -> str:
    """One line for an event, e.g. 'out of memory: micro-batch now 2 x accumulation 8'; an event
    with fields of the wrong type still gets its kind."""
    try:
        return _describe(event)
    except (TypeError, ValueError, KeyError, AttributeError):
        return str(event.get("kind", "?")).replace("_", " ")


def _describe(event: dict) -> str:
    kind = event.get("kind", "?")
    if kind == "checkpoint":
        return f"checkpoint saved: {Path(str(event.get('path', ''))).name}"
    if kind == "oom_recovered":
        return (f"out of memory: micro-batch now {event.get('micro_batch_size')} x accumulation "
                f"{event.get('grad_accum')}")
    if kind == "batch_restored":
        return (f"after the restart: micro-batch {event.get('micro_batch_size')} x accumulation "
                f"{event.get('grad_accum')} again")
    if kind == "oom_fatal":
        return f"out of memory at micro-batch 1: {event.get('message', 'the run cannot go on')}"
    if kind == "worker_restarted":
        return (f"worker restarted (exit code {event.get('exit_code')}, restart {event.get('restart')}) from "
                f"{Path(str(event.get('checkpoint') or 'the start')).name}")
    if kind == "command_applied":
        command, extra = event.get("command"), ""
        if command == "set_batch_size":
            extra = (f": micro-batch {event.get('micro_batch_size')} x accumulation {event.get('grad_accum')}"
                     f" = global {event.get('global_batch')}")
        elif command == "checkpoint":
            extra = f": {Path(str(event.get('path', ''))).name}"
        return f"{command} applied{extra}"
    if kind == "command_failed":
        return f"{event.get('command')} failed: {event.get('error')}"
    if kind == "resumed" and event.get("from_start"):
        return "resumed: no checkpoint yet, so training starts again at step 0"
    if kind == "resumed":
        return f"resumed from {Path(str(event.get('checkpoint', ''))).name} ({event.get('samples_seen')} samples seen)"
    if kind == "train_start":
        processes = event.get("processes") or 1
        spread = f" on {processes} processes ({event.get('strategy', 'ddp')})" if processes > 1 else ""
        return (f"training {'continues' if event.get('resumed') else 'starts'}: micro-batch "
                f"{event.get('micro_batch_size')} x accumulation {event.get('grad_accum')}, "
                f"{event.get('total_steps', '?')} steps{spread}")
    if kind == "state":
        reason = f" ({event['reason']})" if event.get("reason") else ""
        return f"{event.get('previous') or 'start'} → {event.get('state')}{reason}"
    if kind == "final_saved":
        return f"final adapter saved: {event.get('path')}"
    if kind == "inference_check":
        return f"inference check: {len(event.get('answers') or [])} answers in inference.jsonl"
    if kind in ("error", "crash"):
        return f"{kind}: {event.get('message')}"
    if kind == "straggler":
        return f"rank {event.get('rank')} is {event.get('slower_pct', '?')}% slower than the median"
    if kind == "memory_plan":
        layers, k = event.get("layers"), event.get("checkpointed")
        recompute = ("every layer recomputed" if k == layers else "no layer recomputed" if k == 0
                     else f"{k} of {layers} layers recomputed")
        peak = (f", predicted peak {event['predicted_peak']:.1f} of {event['budget']:.1f} GiB"
                if event.get("predicted_peak") is not None and event.get("budget") is not None else "")
        return (f"memory plan ({event.get('reason')}): micro-batch {event.get('micro_batch_size')} x accumulation "
                f"{event.get('grad_accum')}, {recompute}{', inputs offloaded' if event.get('offload') else ''}{peak}")
    if kind == "anomaly":
        what = " and ".join(event.get("what") or ["loss"])
        then = {"pause": ": paused, resume (p) or stop", "stop": ": stopping",
                "skip": ", going on (train.on_anomaly skip)"}.get(str(event.get("action")), "")
        return f"step {event.get('step')} not applied: {what} not finite ({event.get('in_a_row')} in a row){then}"
    if kind == "loss_spike":
        return f"loss spike at step {event.get('step')}: {event['loss']:.3f} (recent median {event['median']:.3f})"
    if kind == "grad_norm_spike":
        return (f"gradient norm spike at step {event.get('step')}: {event['grad_norm']:.3g} "
                f"(recent median {event['median']:.3g})")
    if kind == "checkpoint_skipped":
        return f"checkpoint of step {event.get('step')} NOT written: {event.get('error')}"
    if kind == "disk_low":
        return (f"disk low: {event.get('free_gib')} GiB free, a checkpoint takes {event.get('checkpoint_mib')} MiB")
    if kind == "auto_paused":
        return f"paused at step {event.get('step')} after repeated anomalies: resume (p) or stop"
    if kind == "report":
        return f"report written: {event.get('path')}"
    if kind == "eval_done":
        tuned = ((event.get("overall") or {}).get("tuned") or {})
        base = ((event.get("overall") or {}).get("base") or {})
        score = "rouge_l_chars"
        extra = (f", ROUGE-L (chars) {base[score]:.3f} -> {tuned[score]:.3f}"
                 if isinstance(base.get(score), (int, float)) and isinstance(tuned.get(score), (int, float)) else "")
        return f"evaluation: {event.get('records')} questions of {event.get('split')}{extra}; {event.get('file')}"
    if kind == "memory_checked":
        return (f"memory: peak {event.get('measured_gib')} GiB, predicted {event.get('predicted_gib')} GiB "
                f"({event.get('error_pct', 0):+.1f}%)")
    return kind.replace("_", " ")
