"""qwen-daemon data think PATHS --out DIR: reasoning traces written by the model itself.

Every record whose trace `data check` warns about (none at all, short, under half its answer, or
missing the answer's key facts: traces.py), or every record with `--all`, is answered by the
model with its thinking. The new thinking replaces the record's trace, next to the record's own
answer, when the model's answer agrees with that answer (the evaluation's term-weighted ROUGE-L
F1, metrics.py, at least `min_agreement`), its output is well formed and the new trace is not
short itself; otherwise the record goes to DIR/review.jsonl with both answers, the scores and why.

The user's files are never written: DIR gets a copy of each input file, in its own format (JSON,
JSON Lines, Markdown; the rest of the file as it was), with the accepted traces in place.
Progress goes to DIR/think-progress.jsonl after every batch, so the same command again continues
where it stopped; the output files are rewritten from the inputs and that progress each time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qwen_daemon.train import metrics, traces
from qwen_daemon.train.readers import (ANSWER_KEYS, JSON_SUFFIXES, MARKDOWN_SUFFIXES, REASONING_KEYS, TAG_RE,
                                       Conversation, find_files, read_file, split_reasoning)
from shared import runs
from shared.config import Config

log = logging.getLogger(__name__)

PROGRESS = "think-progress.jsonl"
REVIEW = "review.jsonl"


class ThinkError(ValueError):
    """data think cannot run as asked; the message says why and what to do."""


def think(cfg: Config, paths: list[str], out: Path, *, generate: Callable[[list[list[dict]]], list[str]] | None = None,
          tokenizer=None, all_records: bool = False, min_agreement: float = 0.3, limit: int | None = None,
          on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write traces for the records that need one; returns a summary. `generate(prompts) -> texts`
    defaults to the configured model (eval.* sampling settings, batches of eval.batch_size)."""
    from qwen_daemon.train.text_zh import load_terms

    files, _, problems = find_files(paths)
    if not files:
        raise ThinkError(f"no data files in {', '.join(paths)}")
    targets = _targets(files, paths, out)
    terms = load_terms(cfg.data.terms)
    tokenizer = tokenizer or _tokenizer(cfg)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731

    records: list[Conversation] = []
    for f in files:
        convs, file_problems = read_file(f)
        records.extend(convs)
        problems.extend(file_problems)
    needed = [c for c in records if all_records or _needs_trace(c, terms, count, cfg.data.min_thinking_tokens)]
    out.mkdir(parents=True, exist_ok=True)
    done = _read_progress(out / PROGRESS)
    todo = [c for c in needed if _id(c) not in done][:limit]
    if todo:
        generate = generate or _model_generate(cfg, tokenizer)
        size = cfg.eval.batch_size
        for start in range(0, len(todo), size):
            batch = todo[start:start + size]
            texts = generate([c.prompt for c in batch])
            entries = [_judge(c, text, terms, count, cfg.data.min_thinking_tokens, min_agreement)
                       for c, text in zip(batch, texts)]
            _append(out / PROGRESS, entries)
            done.update((e["id"], e) for e in entries)
            if on_batch:
                on_batch(start + len(batch), len(todo))
    accepted = {i: e for i, e in done.items() if e["accepted"]}
    unplaced = _write_outputs(files, targets, accepted)
    review = [e for e in done.values() if not e["accepted"]] + \
             [{**accepted[i], "accepted": False, "why": ["the trace could not be placed in the file: "
                                                         "the answer is not there as the reader saw it"]}
              for i in unplaced]
    runs.write_text_atomic(out / REVIEW, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in review))
    return {"records": len(records), "needed": len(needed), "generated": len(todo), "accepted": len(accepted) - len(unplaced),
            "review": len(review), "remaining": len([c for c in needed if _id(c) not in done]),
            "problems": [str(p) for p in problems], "files": [str(t) for t in targets.values()]}


# --- which records, and is the model's trace good enough ------------------------------------------

def _id(c: Conversation) -> str:
    return f"{c.file}:{c.line}"


def _needs_trace(c: Conversation, terms, count, min_tokens: int) -> bool:
    if c.reasoning is None:
        return True
    figures = traces.record_figures(c.reasoning, c.answer, set(terms.count_terms(c.reasoning)),
                                    set(terms.count_terms(c.answer)))
    return bool(traces.warnings_of({**figures, "thinking_tokens": count(c.reasoning),
                                    "answer_tokens": count(c.answer)}, min_tokens))


def _judge(c: Conversation, text: str, terms, count, min_tokens: int, min_agreement: float) -> dict[str, Any]:
    thinking, answer, shape = metrics.split_reasoning(text)
    scores = metrics.score_record(c.answer, text, terms)
    why = []
    if not shape.well_formed or not shape.has_answer:
        why.append("the generation is not thinking + </think> + answer (cut off, or stray tags)")
    if scores["rouge_l_weighted"] < min_agreement:
        why.append(f"its answer disagrees with the record's: term-weighted ROUGE-L {scores['rouge_l_weighted']:.2f} "
                   f"< {min_agreement}")
    tokens = count(thinking)
    if tokens < min_tokens:
        why.append(f"its trace is short too: {tokens} tokens < data.min_thinking_tokens {min_tokens}")
    return {"id": _id(c), "accepted": not why, "why": why, "question": c.prompt[-1]["content"], "reference": c.answer,
            "thinking": thinking, "answer": answer, "thinking_tokens": tokens, "scores": scores}


# --- the model -------------------------------------------------------------------------------------

def _tokenizer(cfg: Config):
    from qwen_daemon.train.model import load_tokenizer

    return load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)


def _model_generate(cfg: Config, tokenizer) -> Callable[[list[list[dict]]], list[str]]:
    import torch

    from qwen_daemon.train.evaluate import generate, load_adapted

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = load_adapted(cfg, None, device)
    return lambda prompts: generate(model, tokenizer, prompts, cfg, device)


# --- progress and output files --------------------------------------------------------------------

def _targets(files: list[Path], paths: list[str], out: Path) -> dict[Path, Path]:
    """Each input file's copy under `out`, at its path relative to the directory given for it."""
    roots = [Path(p).resolve() for p in paths]
    inside = next((r for r in roots if r.is_dir() and out.resolve().is_relative_to(r)), None)
    if inside:
        raise ThinkError(f"--out {out} is inside the input directory {inside}: its copies would be read as data "
                         "next time; choose a directory outside it")
    targets = {}
    for f in files:
        if f.suffix.lower() not in JSON_SUFFIXES | MARKDOWN_SUFFIXES:
            raise ThinkError(f"{f}: data think writes JSON, JSON Lines and Markdown; convert this file to one of them "
                             "first (or leave it out of the paths)")
        resolved = f.resolve()
        root = next((r for r in roots if r.is_dir() and resolved.is_relative_to(r)), resolved.parent)
        target = out.resolve() / resolved.relative_to(root)
        if target in {g.resolve() for g in files}:
            raise ThinkError(f"--out {out} would overwrite the input file {f}; choose another directory")
        targets[f] = target
    return targets


def _read_progress(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                done[entry["id"]] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill: that record is generated again
    return done


def _append(path: Path, entries: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        f.flush()
        os.fsync(f.fileno())




def _write_outputs(files: list[Path], targets: dict[Path, Path], accepted: dict[str, dict]) -> list[str]:
    """Every input file copied to its target with the accepted traces; returns the ids of accepted
    records that could not be placed."""
    unplaced: list[str] = []
    for f in files:
        text = f.read_bytes().decode("utf-8-sig")
        mine = {int(i.rsplit(":", 1)[1]): e["thinking"] for i, e in accepted.items() if i.rsplit(":", 1)[0] == str(f)}
        if f.suffix.lower() in MARKDOWN_SUFFIXES:
            text, missed = _markdown_with(text, mine)
        else:
            text, missed = _json_with(text, mine)
        unplaced += [f"{f}:{line}" for line in missed]
        targets[f].parent.mkdir(parents=True, exist_ok=True)
        runs.write_text_atomic(targets[f], text)
    return unplaced


def _block(tag: str, trace: str, answer: str) -> str:
    return f"<{tag}>\n{trace}\n</{tag}>\n\n{answer}"


def _tag_of(text: str) -> str:
    """The reasoning tag a file uses (<thinking> or <think>); <think> when it uses none."""
    m = TAG_RE.search(text)
    return m.group(2) if m else "think"


def _set_trace(obj: dict, trace: str, tag: str) -> None:
    """Put the trace where the record keeps it: a reasoning field, tags in the answer, or (none
    yet) reasoning_content in a chat turn and tags in a plain answer field."""
    turns = obj.get("messages", obj.get("conversations"))
    target = turns[-1] if turns else obj
    key = next((k for k in REASONING_KEYS if target.get(k) is not None), None)
    if key:
        target[key] = trace
        return
    content = "content" if turns and "content" in target else "value" if turns else \
        next(k for k in ANSWER_KEYS if target.get(k) is not None)
    if turns and not TAG_RE.search(target[content]):
        target["reasoning_content"] = trace
        return
    _, answer = split_reasoning(target[content])
    target[content] = _block(tag, trace, answer)


def _json_with(text: str, traces_by_line: dict[int, str]) -> tuple[str, list[int]]:
    from qwen_daemon.train.readers import _json_rows

    if not traces_by_line:
        return text, []
    tag = _tag_of(text)
    stripped = text.lstrip()
    rows = list(_json_rows(text))  # values of every kind; a broken JSON Lines line stays as written
    if stripped.startswith("[") or (stripped.startswith("{") and len(rows) == 1 and _is_one_object(text)):
        for line, obj in rows:
            if line in traces_by_line:
                _set_trace(obj, traces_by_line[line], tag)
        values = [obj for _, obj in rows]
        return json.dumps(values if stripped.startswith("[") else values[0], ensure_ascii=False, indent=2) + "\n", []
    lines = text.splitlines(keepends=True)
    for line, obj in rows:
        if line in traces_by_line and isinstance(obj, dict):
            _set_trace(obj, traces_by_line[line], tag)
            end = "\n" if lines[line - 1].endswith("\n") else ""
            lines[line - 1] = json.dumps(obj, ensure_ascii=False) + end
    return "".join(lines), []


def _is_one_object(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _markdown_with(text: str, traces_by_line: dict[int, str]) -> tuple[str, list[int]]:
    """The answer of each record found as written after its question's line, then its reasoning
    (a <think> block in it, or an explicit reasoning section before it) replaced."""
    from qwen_daemon.train.markdown_qa import parse_markdown_qa

    tag = _tag_of(text)
    items = {item.line: item for item in parse_markdown_qa(text)[0]}
    starts = [0, *(i + 1 for i, ch in enumerate(text) if ch == "\n")]
    missed = []
    for line in sorted(traces_by_line, reverse=True):  # from the end, so earlier offsets hold
        item, trace = items.get(line), traces_by_line[line]
        at = text.find(item.answer, starts[line - 1]) if item else -1
        if at < 0:
            missed.append(line)
            continue
        if item.reasoning is not None:  # an explicit reasoning section between question and answer
            r = text.rfind(item.reasoning, starts[line - 1], at)
            if r < 0:
                missed.append(line)
                continue
            text = text[:r] + trace + text[r + len(item.reasoning):]
            continue
        _, answer = split_reasoning(item.answer)
        text = text[:at] + _block(tag, trace, answer) + text[at + len(item.answer):]
    return text, missed
