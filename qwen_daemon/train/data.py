"""The data pipeline: files -> checked, normalised, split, tokenised samples, with a report.

    read (readers.py) -> normalise Chinese text, term statistics (text_zh.py)
      -> duplicates -> seeded stratified split -> render with the tokenizer's chat template
      -> tokenise, mask the prompt, apply the over-long policy -> cache

`prepare_data(cfg, tokenizer)` runs it (or loads the cached result) and returns the splits and a
`DataReport`; `qwen-daemon data check` prints that same report. Nothing is dropped silently: every
record that does not reach the model is a `Problem` with file, line and reason.

A sample is `input_ids` plus `prompt_len`: labels are -100 for the first `prompt_len` tokens and the
token ids after that, i.e. exactly the assistant's reasoning, answer and end-of-turn token. The
prompt and the completion are tokenised separately, as the model sees them at inference time (the
prompt ends where generation starts, after `<think>\n` for Qwen3-Thinking).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from shared import runs
from shared.config import Config
from qwen_daemon.train import traces
from qwen_daemon.train.readers import Conversation, Problem, find_files, read_file
from qwen_daemon.train.text_zh import (asks_for_traditional, dedup_key, has_traditional, load_terms, normalize_text,
                                        simplify_chinese)

log = logging.getLogger(__name__)

PIPELINE_VERSION = 7  # bump when prepared samples change for the same inputs
SPLITS = ("train", "validation", "test")
UNCATEGORISED = "uncategorised"


@dataclass
class DataReport:
    """What happened to every record; `to_dict()` is the `data check --json` output."""

    kept: int = 0
    dropped: int = 0
    truncated: int = 0
    problems: list[Problem] = field(default_factory=list)
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> {records, kept, dropped, simplified}
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {records, tokens, categories, top_terms}
    without_reasoning: int = 0
    ignored: list[str] = field(default_factory=list)  # files in the given directories that are not data
    candidate_terms: list[list] = field(default_factory=list)  # [word, count]: frequent words not in the dictionary
    # data.to_simplified: what the Taiwan vocabulary replaced ("金鑰->密钥": count, most first) and
    # the records ("file:line") left in traditional Chinese because they ask for answers in it.
    vocabulary: dict[str, int] = field(default_factory=dict)
    kept_traditional: list[str] = field(default_factory=list)
    thinking: dict[str, Any] = field(default_factory=dict)  # traces.quality_section of the kept records

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept, "dropped": self.dropped, "truncated": self.truncated,
            "problems": [asdict(p) for p in self.problems],
            "files": self.files, "splits": self.splits, "without_reasoning": self.without_reasoning, "ignored": self.ignored,
            "candidate_terms": self.candidate_terms,
            "vocabulary": self.vocabulary, "kept_traditional": self.kept_traditional, "thinking": self.thinking,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        return cls(d["kept"], d["dropped"], d["truncated"], [Problem(**p) for p in d["problems"]],
                   d["files"], d["splits"], d["without_reasoning"], d["ignored"], d["candidate_terms"],
                   d.get("vocabulary", {}), d.get("kept_traditional", []), d.get("thinking", {}))

    def format_text(self) -> str:
        """The human-readable report: per file, per problem, per split."""
        out = [f"{len(self.files)} file(s): {self.kept} kept, {self.dropped} dropped, {self.truncated} truncated"
               + (f", {self.without_reasoning} without reasoning" if self.without_reasoning else "")]
        for name, c in self.files.items():
            simplified = f", {c['simplified']} converted to simplified" if c.get("simplified") else ""
            out.append(f"  {name}: {c['records']} records, {c['kept']} kept, {c['dropped']} dropped{simplified}")
        if self.vocabulary:
            out.append("Taiwan vocabulary replaced: " + _brief(f"{t} {n}" for t, n in self.vocabulary.items()))
        if self.kept_traditional:
            out.append(f"{len(self.kept_traditional)} record(s) kept in traditional Chinese, as they ask for it: "
                       + _brief(self.kept_traditional))
        if self.ignored:
            out.append(f"ignored (not data files): {', '.join(self.ignored)}")
        if self.problems:
            out.append(f"{len(self.problems)} problem(s):")
            out.extend(f"  {p}" for p in self.problems)
        else:
            out.append("no problems")
        for name, s in self.splits.items():
            cats = ", ".join(f"{c} {n}" for c, n in s["categories"].items())
            out.append(f"{name}: {s['records']} records, {s['tokens']} tokens ({s['label_tokens']} trained); {cats}")
        out.extend(traces.format_section(self.thinking))
        if self.candidate_terms:
            out.append("frequent words not in the term dictionary (candidates for data.terms): "
                       + ", ".join(f"{w} {n}" for w, n in self.candidate_terms))
        return "\n".join(out)


@dataclass
class PreparedData:
    splits: dict[str, Any]  # name -> datasets.Dataset with id, input_ids, prompt_len, category, ...
    report: DataReport


def prepare_data(cfg: Config, tokenizer, cache_dir: Path | None = None) -> PreparedData:
    """Run the pipeline for `cfg.data`, or load its cached result; logs the report."""
    from qwen_daemon.train.builtin import cache_root

    files, ignored, file_problems = find_files(cfg.data.paths)
    key = _cache_key(cfg, tokenizer, files)
    cache = (cache_dir or cache_root() / "prepared") / key
    if (cache / "report.json").exists():
        log.info("data: using prepared cache %s", cache)
        prepared = _load(cache)
    else:
        prepared = _prepare(cfg, tokenizer, files, ignored, file_problems)
        _save(prepared, cache)
    _log_report(prepared.report)
    return prepared


def _prepare(cfg: Config, tokenizer, files: list[Path], ignored: list[Path], file_problems: list[Problem]) -> PreparedData:
    import datasets
    import pyarrow as pa

    d = cfg.data
    report = DataReport(problems=list(file_problems), ignored=[str(f) for f in ignored])
    conversations: list[Conversation] = []
    for path in files:
        convs, problems = read_file(path)
        conversations.extend(convs)
        report.problems.extend(problems)
        record_problems = sum(1 for p in problems if p.line)
        report.files[str(path)] = {"records": len(convs) + record_problems, "kept": 0, "dropped": record_problems,
                                   "simplified": 0}

    num_proc = _num_proc(d.num_proc, len(conversations))
    rows = _parallel(_normalise_chunk, conversations, num_proc, terms_path=d.terms, to_simplified=d.to_simplified,
                     system_prompt=d.system_prompt)
    _report_conversion(rows, report)
    rows = _drop_duplicates(rows, report)
    assignment = split_rows(rows, d.split.model_dump(), d.seed)
    samples = _parallel(_tokenise_chunk, rows, num_proc, tokenizer=tokenizer, max_seq_len=d.max_seq_len,
                        overlong=d.overlong)

    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row, (sample, problem), split in zip(rows, samples, assignment):
        if problem is not None:
            report.problems.append(problem)
            report.truncated += problem.action == "truncated"
        if sample is None:
            report.files[row["file"]]["dropped"] += 1
            continue
        report.files[row["file"]]["kept"] += 1
        by_split[split].append({**row, **sample})

    report.kept = sum(len(v) for v in by_split.values())
    report.dropped = sum(c["dropped"] for c in report.files.values())
    report.without_reasoning = sum(1 for v in by_split.values() for r in v if r["reasoning"] is None)
    report.problems.sort(key=lambda p: (p.file, p.line))
    report.splits = {name: _split_stats(rows_) for name, rows_ in by_split.items()}
    report.thinking = traces.quality_section([r for rows_ in by_split.values() for r in rows_], d.min_thinking_tokens)
    report.candidate_terms = _candidate_terms(by_split["train"], d.terms, d.seed)
    features = _features()
    # Straight through Arrow: three times faster than Dataset.from_list on 100k samples.
    splits = {name: datasets.Dataset(pa.Table.from_pylist(rows_, schema=features.arrow_schema))
              if rows_ else _empty_split() for name, rows_ in by_split.items()}
    return PreparedData(splits, report)


# --- stage 1: normalise, term statistics, duplicate keys (parallel) ---------------------------

def _normalise_chunk(conversations: list[Conversation], terms_path: str, to_simplified: bool,
                     system_prompt: str | None) -> list[dict]:
    terms = load_terms(terms_path)

    def clean(text: str) -> str:
        return normalize_text(text, to_simplified=False)  # converted per record, in _simplify_record

    rows = []
    for c in conversations:
        prompt = [{"role": t["role"], "content": clean(t["content"])} for t in c.prompt]
        if system_prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": clean(system_prompt)})
        answer = clean(c.answer)
        reasoning = None if c.reasoning is None else clean(c.reasoning)
        prompt, reasoning, answer, conversion = _simplify_record(prompt, reasoning, answer, to_simplified)
        question = "\n".join(t["content"] for t in prompt if t["role"] != "system")
        question_counts = terms.count_terms(question)
        trace_counts, answer_counts = terms.count_terms(reasoning or ""), terms.count_terms(answer)
        counts = question_counts + trace_counts + answer_counts
        # A record kept in traditional Chinese is no duplicate of its simplified twin: it teaches the
        # answer in traditional characters.
        script = "\x00traditional" if conversion["kept_traditional"] else ""
        rows.append({
            "id": f"{c.file}:{c.line}", "file": c.file, "line": c.line,
            "prompt": prompt, "reasoning": reasoning, "answer": answer,
            "question_key": dedup_key(question),
            "record_key": dedup_key("\x00".join((question, reasoning or "", answer))) + script,
            "category": terms.dominant_category_of(counts, question=question_counts) or UNCATEGORISED,
            "terms": [{"term": t, "count": n} for t, n in sorted(counts.items())],
            "conversion": conversion,
            **traces.record_figures(reasoning, answer, set(trace_counts), set(answer_counts)),
        })
    return rows


def _simplify_record(prompt: list[dict], reasoning: str | None, answer: str, to_simplified: bool):
    """data.to_simplified for one record, whole: (prompt, reasoning, answer, what was done).

    A record with traditional characters anywhere gets simplify_chinese on every text (so a short
    answer such as "32 位元" is converted with its question); a record whose system prompt or
    question asks for an answer in traditional Chinese is kept as written.
    """
    conversion = {"simplified": False, "kept_traditional": False, "vocabulary": {}}
    texts = [t["content"] for t in prompt] + [reasoning or "", answer]
    if not to_simplified or not any(has_traditional(t) for t in texts):
        return prompt, reasoning, answer, conversion
    if any(asks_for_traditional(t["content"]) for t in prompt if t["role"] in ("system", "user")):
        conversion["kept_traditional"] = True
        return prompt, reasoning, answer, conversion
    replaced: Counter[str] = Counter()
    prompt = [{**t, "content": simplify_chinese(t["content"], replaced)} for t in prompt]
    reasoning = None if reasoning is None else simplify_chinese(reasoning, replaced)
    answer = simplify_chinese(answer, replaced)
    conversion.update(simplified=True, vocabulary=dict(replaced))
    return prompt, reasoning, answer, conversion


def _report_conversion(rows: list[dict], report: DataReport) -> None:
    """What data.to_simplified did, per file and overall, into the report."""
    vocabulary: Counter[str] = Counter()
    for row in rows:
        conversion = row.pop("conversion")
        report.files[row["file"]]["simplified"] += conversion["simplified"]
        if conversion["kept_traditional"]:
            report.kept_traditional.append(row["id"])
        vocabulary.update(conversion["vocabulary"])
    report.vocabulary = dict(sorted(vocabulary.items(), key=lambda kv: (-kv[1], kv[0])))


def _drop_duplicates(rows: list[dict], report: DataReport) -> list[dict]:
    """Drop repeated records; keep the same question with a different answer, but report it.

    The split keeps all answers to one question in one split, so no question is in two splits.
    """
    seen_record: dict[str, str] = {}
    seen_question: dict[str, str] = {}
    ids = Counter()
    kept = []
    for row in rows:
        ids[row["id"]] += 1
        if ids[row["id"]] > 1:  # several records on one line (JSON array written on one line)
            row["id"] = f"{row['id']}#{ids[row['id']]}"
        if row["record_key"] in seen_record:
            report.problems.append(Problem(row["file"], row["line"], f"duplicate of {seen_record[row['record_key']]} "
                                           "(same question and answer after normalisation)"))
            report.files[row["file"]]["dropped"] += 1
            continue
        if row["question_key"] in seen_question:
            report.problems.append(Problem(row["file"], row["line"], f"same question as {seen_question[row['question_key']]} "
                                           "with a different answer; both kept, in the same split", action="kept"))
        seen_record[row["record_key"]] = row["id"]
        seen_question.setdefault(row["question_key"], row["id"])
        kept.append(row)
    return kept


# --- stage 2: split -----------------------------------------------------------------------------

def split_rows(rows: list[dict], ratios: dict[str, float], seed: int) -> list[str]:
    """Assign each row to train/validation/test: seeded, stratified by category, question-grouped.

    Records with the same normalised question form one group and go to one split. Groups are
    shuffled within each category, then each group goes to the split furthest below its share of
    what has been assigned so far, so every category is spread in the configured ratios and the
    totals match them to within one group.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["question_key"]].append(i)
    by_category: dict[str, list[list[int]]] = defaultdict(list)
    for members in groups.values():
        by_category[rows[members[0]]["category"]].append(members)

    rng = random.Random(seed)
    assignment = [""] * len(rows)
    totals = dict.fromkeys(SPLITS, 0)
    for category in sorted(by_category):
        cat_groups = sorted(by_category[category], key=lambda m: rows[m[0]]["question_key"])
        rng.shuffle(cat_groups)
        cat_counts = dict.fromkeys(SPLITS, 0)
        for members in cat_groups:
            n = sum(cat_counts.values()) + len(members)
            # Deficit within the category first (stratification), then overall (exact totals).
            split = max((s for s in SPLITS if ratios[s] > 0),
                        key=lambda s: (ratios[s] * n - cat_counts[s],
                                       ratios[s] * (sum(totals.values()) + len(members)) - totals[s]))
            for i in members:
                assignment[i] = split
            cat_counts[split] += len(members)
            totals[split] += len(members)
    return assignment


# --- stage 3: render and tokenise (parallel) ----------------------------------------------------

def render(tokenizer, prompt: list[dict], reasoning: str | None, answer: str) -> tuple[str, str]:
    """(prompt text, completion text) through the tokenizer's own chat template.

    The completion is what the model must produce after the generation prompt: the reasoning, the
    answer and the end-of-turn token; whatever the template adds after that token is not trained.
    """
    assistant = {"role": "assistant", "content": answer}
    if reasoning is not None:
        assistant["reasoning_content"] = reasoning
    full = tokenizer.apply_chat_template([*prompt, assistant], tokenize=False)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt_text):
        raise ValueError("the tokenizer's chat template renders the prompt differently with and without the "
                         "answer, so the prompt cannot be masked; use a template whose generation prompt is a "
                         "prefix of the rendered conversation (e.g. builtin:qwen3-tokenizer's)")
    end = full.rfind(tokenizer.eos_token)
    if end < len(prompt_text):
        raise ValueError(f"the chat template does not end the assistant turn with the eos token {tokenizer.eos_token!r}")
    return prompt_text, full[len(prompt_text): end + len(tokenizer.eos_token)]


def _tokenise_chunk(rows: list[dict], tokenizer, max_seq_len: int, overlong: str) -> list[tuple[dict | None, Problem | None]]:
    """(sample or None if dropped, problem or None) per row."""
    if not rows:
        return []
    rendered = [render(tokenizer, r["prompt"], r["reasoning"], r["answer"]) for r in rows]
    prompts = tokenizer([p for p, _ in rendered], add_special_tokens=False)["input_ids"]
    completions = tokenizer([c for _, c in rendered], add_special_tokens=False)["input_ids"]
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    traced = [r["reasoning"] for r in rows if r["reasoning"] is not None]
    trace_lengths = iter(len(t) for t in tokenizer(traced, add_special_tokens=False)["input_ids"]) if traced else iter(())
    out = []
    for row, p, c, a in zip(rows, prompts, completions, answers):
        figures = {"thinking_tokens": None if row["reasoning"] is None else next(trace_lengths), "answer_tokens": len(a)}
        n = len(p) + len(c)
        too_long = f"too long: {n} tokens > data.max_seq_len {max_seq_len}"
        if n <= max_seq_len:
            out.append(({"input_ids": p + c, "prompt_len": len(p), "num_tokens": n, **figures}, None))
        elif overlong == "truncate" and len(p) < max_seq_len:
            out.append(({"input_ids": (p + c)[:max_seq_len], "prompt_len": len(p), "num_tokens": max_seq_len, **figures},
                        Problem(row["file"], row["line"], f"{too_long}; the answer was cut "
                                "(raise data.max_seq_len to keep it whole)", action="truncated")))
        else:
            hint = ("the prompt alone does not fit; shorten it or raise data.max_seq_len" if overlong == "truncate"
                    else "raise data.max_seq_len or set data.overlong: truncate")
            out.append((None, Problem(row["file"], row["line"], f"{too_long}; {hint}")))
    return out


def labels_of(input_ids: list[int], prompt_len: int) -> list[int]:
    """The training labels of a sample: -100 over the prompt, the token ids after it."""
    return [-100] * prompt_len + list(input_ids[prompt_len:])


# --- helpers ------------------------------------------------------------------------------------

def _brief(items, limit: int = 8) -> str:
    """The first `limit` items, comma-separated, and how many more."""
    items = list(items)
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _features():
    import datasets

    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    return datasets.Features({
        "id": datasets.Value("string"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "prompt_len": datasets.Value("int32"),
        "num_tokens": datasets.Value("int32"),
        "category": datasets.Value("string"),
        "prompt": [turn],
        "reasoning": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "terms": [{"term": datasets.Value("string"), "count": datasets.Value("int32")}],  # per-record statistics
    })


def _candidate_terms(rows: list[dict], terms_path: str, seed: int, sample: int = 2000) -> list[list]:
    """jieba's view of the training text: frequent words the term dictionary lacks (on a sample)."""
    if len(rows) > sample:
        rows = random.Random(seed).sample(rows, sample)
    texts = ("\n".join((r["prompt"][-1]["content"], r["reasoning"] or "", r["answer"])) for r in rows)
    return [[w, n] for w, n in load_terms(terms_path).candidate_terms(texts)]


def _empty_split():
    import datasets

    features = _features()
    return datasets.Dataset.from_dict({k: [] for k in features}, features=features)


def _split_stats(rows: list[dict]) -> dict[str, Any]:
    categories = Counter(r["category"] for r in rows)
    terms = Counter()
    for r in rows:
        terms.update({t["term"]: t["count"] for t in r["terms"]})
    return {
        "records": len(rows),
        "tokens": sum(len(r["input_ids"]) for r in rows),
        "label_tokens": sum(len(r["input_ids"]) - r["prompt_len"] for r in rows),
        "categories": dict(sorted(categories.items(), key=lambda kv: (-kv[1], kv[0]))),
        "top_terms": [[t, n] for t, n in sorted(terms.items(), key=lambda kv: (-kv[1], kv[0]))[:20]],
    }


def _num_proc(setting: int | str, n_items: int) -> int:
    if setting != "auto":
        return int(setting)
    return 1 if n_items < 5000 else max(1, min(os.cpu_count() or 1, 8))


def _parallel(fn, items: list, num_proc: int, **kwargs) -> list:
    """fn(chunk, **kwargs) over contiguous chunks in worker processes; results in input order."""
    if num_proc <= 1 or len(items) < 2:
        return fn(items, **kwargs)
    size = -(-len(items) // (num_proc * 4))  # a few chunks per worker evens out the load
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are the parallelism
    with get_context("fork").Pool(num_proc) as pool:
        results = pool.starmap(_call, [(fn, chunk, kwargs) for chunk in chunks])
    return [x for part in results for x in part]


def _call(fn, chunk, kwargs):
    return fn(chunk, **kwargs)


def _cache_key(cfg: Config, tokenizer, files: list[Path]) -> str:
    h = hashlib.sha256()
    d = cfg.data
    settings = {"v": PIPELINE_VERSION, "max_seq_len": d.max_seq_len, "min_thinking_tokens": d.min_thinking_tokens, "overlong": d.overlong, "split": d.split.model_dump(),
                "seed": d.seed, "to_simplified": d.to_simplified, "system_prompt": d.system_prompt,
                "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template, tokenizer.eos_token]}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in [*files, Path(d.terms)]:
        h.update(str(path.resolve()).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest() if path.exists() else b"missing")
    return h.hexdigest()[:24]


def _save(prepared: PreparedData, cache: Path) -> None:
    """Write atomically: a half-written cache must never be picked up. A concurrent preparation
    that finished first wrote the same (the key covers every input): it is kept."""
    import datasets

    datasets.disable_progress_bars()  # a daemon's log is no place for progress bars
    with runs.atomic_directory(cache, keep_existing=lambda done: (done / "report.json").exists()) as tmp:
        for name, ds in prepared.splits.items():
            if len(ds):  # datasets cannot load an empty saved dataset back; _load recreates it
                ds.save_to_disk(str(tmp / name))
        (tmp / "report.json").write_text(json.dumps(prepared.report.to_dict(), ensure_ascii=False), encoding="utf-8")


def _load(cache: Path) -> PreparedData:
    import datasets

    report = DataReport.from_dict(json.loads((cache / "report.json").read_text(encoding="utf-8")))
    return PreparedData({name: datasets.load_from_disk(str(cache / name)) if (cache / name).exists()
                         else _empty_split() for name in SPLITS}, report)


def _log_report(report: DataReport) -> None:
    log.info("data: %d kept, %d dropped, %d truncated", report.kept, report.dropped, report.truncated)
    simplified = sum(c.get("simplified", 0) for c in report.files.values())
    if simplified or report.kept_traditional:
        log.info("data: %d record(s) converted to simplified Chinese, %d kept in traditional as they ask for it",
                 simplified, len(report.kept_traditional))
    for p in report.problems:
        log.warning("data: %s", p)
    for name, s in report.splits.items():
        log.info("data: %s: %d records, %d tokens, categories %s", name, s["records"], s["tokens"], s["categories"])
