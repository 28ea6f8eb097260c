"""Scoring a run: its held-out split answered by the base model and by base + adapter.

    qwen-daemon eval RUN [--checkpoint N|final] [--split test] [--limit K] [--json]

`evaluate_run` takes the run's frozen config and its own split (the data pipeline is deterministic
and cached, so the split is the one training held out), loads the base model as training did
(4-bit when it trained in 4-bit) with the adapter, answers every question twice in batches (left
padding; for the base answers peft's `disable_adapter()` runs exactly the base model, so one load
serves both), separates the thinking from the answer and scores the answers against the
references (metrics.py), and computes the split's token loss both ways. It writes
`eval/<checkpoint>-<split>.jsonl` (one line per question: reference, both answers, every metric)
and `eval/summary.json` (overall and per category, base against tuned).

During training, with the model being trained: `eval_loss` (the validation split's token loss,
every train.eval_every_steps) and `score_sample`, the small version of the above on a fixed
validation sample (every eval.generate_every_steps).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from shared import runs
from shared.config import Config, load_config

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
SUMMARY = "summary.json"
STOP_TEXTS = ("<|im_end|>", "<|endoftext|>")


class EvaluationError(RuntimeError):
    """The run cannot be evaluated; the message says why and what to do."""


def adapter_dir(run_dir: Path, checkpoint: str | int = "final") -> Path:
    """`final/` or `checkpoints/checkpoint-<N>/` of the run, checked to hold an adapter."""
    path = run_dir / "final" if str(checkpoint) == "final" else run_dir / "checkpoints" / f"checkpoint-{checkpoint}"
    if not (path / "adapter_config.json").exists():
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) if (run_dir / "checkpoints").exists() else []
        raise EvaluationError(f"{path}: no adapter there ({'the run has not finished' if checkpoint == 'final' else 'no such checkpoint'}); "
                              f"checkpoints: {', '.join(have) or 'none'}")
    return path


def load_adapted(cfg: Config, adapter: Path | None, device):
    """The base model as training loaded it (quantised the same way) with the adapter (None: the
    base model alone), for inference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_daemon.train.builtin import resolve_model_path
    from qwen_daemon.train.model import _from_pretrained, bnb_config, compute_dtype

    dtype = compute_dtype(cfg, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.model.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(cfg, dtype)
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    base = _from_pretrained(AutoModelForCausalLM.from_pretrained, resolve_model_path(cfg.model.name_or_path),
                            "model", **kwargs)
    model = (PeftModel.from_pretrained(base, str(adapter)) if adapter else base).eval()
    torch.manual_seed(cfg.eval.seed)
    return model


def generate(model, tokenizer, prompts: list[list[dict]], cfg: Config, device, max_new_tokens: int | None = None,
             batch_size: int | None = None) -> list[str]:
    """Answers to chat prompts (with the thinking template's generation prompt), in order. Batches
    of similar length, left-padded; each batch seeded from eval.seed, so the base and the tuned
    model draw their samples alike."""
    import torch

    e = cfg.eval
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[str] = [""] * len(texts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TEXTS]
    size = batch_size or e.batch_size
    try:
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            enc = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            torch.manual_seed(e.seed + start)
            sampling = {"do_sample": True, "temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k} \
                if e.do_sample else {"do_sample": False}
            with torch.no_grad():
                ids = model.generate(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                                     max_new_tokens=max_new_tokens or e.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=stop_ids, **sampling)
            for i, row in zip(chunk, ids[:, enc.input_ids.shape[1]:].tolist()):
                cut = next((n for n, t in enumerate(row) if t in stop_ids), len(row))  # at the end of the turn
                out[i] = tokenizer.decode(row[:cut], skip_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    return out


def split_loss(model, tokenizer, ds, device, batch_size: int = 8) -> float | None:
    """Mean token loss of the split's answers (teacher forcing), as training counts it."""
    import torch

    from qwen_daemon.train.batching import collate

    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            rows = [ds[i] for i in range(start, min(len(ds), start + batch_size))]
            batch = collate([[{"input_ids": r["input_ids"], "prompt_len": r["prompt_len"]}] for r in rows],
                            packing=False, pad_token_id=tokenizer.pad_token_id)
            n = batch["num_label_tokens"]
            if n == 0:
                continue
            inputs = {k: batch[k].to(device) for k in ("input_ids", "labels", "attention_mask")}
            total += model(**inputs, use_cache=False, num_items_in_batch=n).loss.item() * n
            tokens += n
    return total / tokens if tokens else None


def evaluate_run(run_dir: Path, checkpoint: str | int = "final", split: str | None = None, limit: int | None = None,
                 device=None, cfg: Config | None = None) -> dict:
    """Answer, score and write the evaluation of `checkpoint`; returns the summary. `cfg`: the
    run's config (default: its frozen config.yaml)."""
    import torch

    from qwen_daemon.train import metrics
    from qwen_daemon.train.data import prepare_data
    from qwen_daemon.train.model import load_tokenizer
    from qwen_daemon.train.text_zh import load_terms

    run_dir = Path(run_dir)
    if cfg is None:
        if not (run_dir / "config.yaml").exists():
            raise EvaluationError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml")
    adapter = adapter_dir(run_dir, checkpoint)
    split = split or cfg.eval.split
    limit = limit or cfg.eval.limit
    device = device or (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    started = time.time()
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)  # as training did: same split, cache
    ds = prepare_data(cfg, tokenizer).splits[split]
    if len(ds) == 0:
        raise EvaluationError(f"the run's {split} split is empty (data.split.{split} in {run_dir / 'config.yaml'})")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    rows = [ds[i] for i in range(len(ds))]
    model = load_adapted(cfg, adapter, device)
    prompts = [r["prompt"] for r in rows]
    tuned = generate(model, tokenizer, prompts, cfg, device)
    tuned_loss = split_loss(model, tokenizer, ds, device)
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, cfg, device)
        base_loss = split_loss(model, tokenizer, ds, device)
    del model
    terms = load_terms(cfg.data.terms)
    records = []
    for row, base_text, tuned_text in zip(rows, base, tuned):
        records.append({"id": row["id"], "category": row["category"], "question": row["prompt"][-1]["content"],
                        "reference": row["answer"], "generated": {"base": base_text, "tuned": tuned_text},
                        "base": metrics.score_record(row["answer"], base_text, terms),
                        "tuned": metrics.score_record(row["answer"], tuned_text, terms)})
    name = f"{adapter.name if adapter.name != 'final' else 'final'}-{split}"
    scored = metrics.summarise(records, key="category")
    summary = {"run": run_dir.name, "checkpoint": adapter.name, "split": split, "records": len(records),
               "overall": scored["overall"], "per_category": scored["by_category"],
               "loss": {"base": base_loss, "tuned": tuned_loss},
               "perplexity": {k: math.exp(v) if v is not None and v < 50 else None
                              for k, v in (("base", base_loss), ("tuned", tuned_loss))},
               "generation": {k: getattr(cfg.eval, k) for k in ("max_new_tokens", "do_sample", "temperature", "top_p",
                                                                 "top_k", "seed")},
               "seconds": round(time.time() - started, 1), "file": f"{EVAL_DIR}/{name}.jsonl"}
    out = run_dir / EVAL_DIR
    out.mkdir(exist_ok=True)
    runs.write_text_atomic(out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    runs.write_text_atomic(out / f"{name}.summary.json", json.dumps(summary, ensure_ascii=False, indent=1))
    runs.write_text_atomic(out / SUMMARY, json.dumps(summary, ensure_ascii=False, indent=1))
    return summary


def eval_loss(r) -> float | None:
    """Mean token loss on the validation split (no dropout, no gradients), as an `eval` metrics
    record; the best one so far is kept in the run's state. Every rank runs it."""
    import torch

    from qwen_daemon.train.batching import epoch_units
    from qwen_daemon.train.loop import collate_for, forward  # (the loop imports this module)

    ds = r.splits["validation"].select_columns(["input_ids", "prompt_len"])
    if len(ds) == 0:
        return None
    r.sinks.event("evaluating", step=r.state.step)
    d = r.cfg.data
    units = epoch_units(r.splits["validation"]["num_tokens"], epoch=0, seed=d.seed, max_seq_len=d.max_seq_len,
                        packing=d.packing)
    r.model.eval()
    loss_sum, label_tokens = 0.0, 0
    mbs, per_round = r.state.micro_batch_size, r.state.micro_batch_size * r.world_size
    with torch.no_grad():
        # The same number of forwards on every rank (FSDP gathers weights in each): a rank with
        # nothing left runs the first unit again and does not count it.
        for start in range(r.rank * mbs, math.ceil(len(units) / per_round) * per_round, per_round):
            share = units[start:start + mbs]
            batch = collate_for(r, [[ds[i] for i in unit] for unit in share or units[:1]])
            loss = forward(r, batch)
            if share:
                loss_sum += loss.item() * batch["num_label_tokens"]
                label_tokens += batch["num_label_tokens"]
    r.model.train()
    loss_sum, label_tokens = r.ranks.sum(loss_sum, label_tokens)
    loss = loss_sum / max(1, label_tokens)
    s = r.state
    s.eval_loss = loss
    if s.best_eval_loss is None or loss < s.best_eval_loss:
        s.best_eval_loss, s.best_step = loss, s.step
    r.sinks.metrics({"kind": "eval", "ts": time.time(), "step": s.step, "eval_loss": loss})
    return loss


def score_sample(r) -> None:
    """The model being trained answers `eval.sample_size` fixed validation questions; their mean
    scores (term recall, ROUGE-L ...) go out as an `eval` metrics record next to the loss. Every
    rank runs it: under FSDP each forward needs all of them."""
    from qwen_daemon.train import metrics
    from qwen_daemon.train.text_zh import load_terms

    r.sinks.event("evaluating", step=r.state.step, what="sample")
    ds = r.splits["validation"]
    if len(ds) == 0:
        return
    rows = [ds[i] for i in range(min(r.cfg.eval.sample_size, len(ds)))]
    r.model.eval()
    try:
        texts = generate(r.model, r.tokenizer, [row["prompt"] for row in rows], r.cfg, r.device)
    finally:
        r.model.train()
    terms = load_terms(r.cfg.data.terms)
    scored = [{"category": "sample", "tuned": metrics.score_record(row["answer"], text, terms)}
              for row, text in zip(rows, texts)]
    means = metrics.summarise(scored, systems=("tuned",))["overall"]["tuned"]
    r.sinks.metrics({"kind": "eval", "ts": time.time(), "step": r.state.step,
                     **{k: float(v) for k, v in means.items() if v is not None}})


def format_table(summary: dict) -> str:
    """The before/after table `qwen-daemon eval` prints."""
    overall = summary.get("overall", {})
    base, tuned = overall.get("base", {}), overall.get("tuned", {})
    lines = [f"{summary['run']} {summary['checkpoint']} on {summary['split']} ({summary['records']} questions)",
             f"{'metric':<28}{'base':>10}{'tuned':>10}{'change':>10}"]
    loss = summary.get("loss", {})
    rows = [("loss", loss.get("base"), loss.get("tuned"))]
    rows += [(k, base.get(k), tuned.get(k)) for k in tuned if isinstance(tuned.get(k), (int, float))]
    for name, b, t in rows:
        if b is None or t is None:
            continue
        lines.append(f"{name:<28}{b:>10.3f}{t:>10.3f}{t - b:>+10.3f}")
    lines.append(f"answers: {summary.get('file')}")
    return "\n".join(lines)


