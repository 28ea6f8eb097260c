"""Reasoning-trace quality: is each trace long enough, and does it reach the answer's facts?

A Thinking model learns from its traces how long and how well to think. A trace that is a short
preamble, with the decisive facts only in the answer, teaches it to stop thinking. Per record
`record_figures` measures the trace (tokens, ratio to the answer, which of the answer's key facts
- its numbers and dictionary terms - the trace reaches first); `quality_section` sums that up per
file for `data check` and data_report.json, with a warning per record worth rewriting, copied
traces and boilerplate sentences. `data think` (think.py) writes traces for the records it warns about.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from typing import Any

from qwen_daemon.train.text_zh import dedup_key

SHORT_RATIO = 0.5
"""A trace under half its answer's tokens is "much shorter than the answer"."""
MIN_FACT_SHARE = 0.5
"""A trace reaching fewer than half of its answer's key facts (of at least MIN_FACTS) is a preamble."""
MIN_FACTS = 2
BOILERPLATE_MIN_CHARS = 12
BOILERPLATE_MIN_RECORDS = 3
MAX_WARNINGS = 1000  # listed in the report; the per-file counts are always complete

_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])|\d{2,}")
_SENTENCE_END = re.compile(r"[。！？!?；;\n]+")


def numbers_of(text: str) -> set[str]:
    """The numbers of a text that carry a fact: two digits or more, or a decimal (not list markers)."""
    return {n for n in _NUMBER.findall(text) if len(n) >= 2}


def record_figures(reasoning: str | None, answer: str, trace_terms: set[str], answer_terms: set[str]) -> dict[str, Any]:
    """Key facts of one record: which of the answer's facts the trace reaches (tokens come later)."""
    facts = answer_terms | numbers_of(answer)
    reached = trace_terms | numbers_of(reasoning or "")
    return {"facts": len(facts), "missing": sorted(facts - reached)}


def warnings_of(r: dict[str, Any], min_tokens: int) -> dict[str, str]:
    """Why a record's trace is worth rewriting, by kind ("short", "facts"; {} = fine); `r` has
    the record's figures."""
    if r["thinking_tokens"] is None:
        return {}  # no trace at all: counted as such, not a short one
    short = []
    if r["thinking_tokens"] < min_tokens:
        short.append(f"trace of {r['thinking_tokens']} tokens < data.min_thinking_tokens {min_tokens}")
    if r["thinking_tokens"] < SHORT_RATIO * r["answer_tokens"]:
        short.append(f"trace of {r['thinking_tokens']} tokens, under half the answer's {r['answer_tokens']}")
    why = {"short": "; ".join(short)} if short else {}
    reached = r["facts"] - len(r["missing"])
    if r["facts"] >= MIN_FACTS and reached < MIN_FACT_SHARE * r["facts"]:
        why["facts"] = (f"trace reaches {reached} of the answer's {r['facts']} key facts "
                        f"(missing: {', '.join(r['missing'][:6])}{', ...' if len(r['missing']) > 6 else ''})")
    return why


def quality_section(rows: list[dict[str, Any]], min_tokens: int) -> dict[str, Any]:
    """The report's trace-quality section over rows with id, file, reasoning, thinking_tokens,
    answer_tokens, facts, missing."""
    files: dict[str, dict[str, Any]] = {}
    by_file: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_file[r["file"]].append(r)
    first_of: dict[str, str] = {}
    sentences: Counter[str] = Counter()
    example: dict[str, list[str]] = {}  # sentence key -> [its text, the first record]
    warnings = []
    for file, recs in by_file.items():
        traced = [r for r in recs if r["thinking_tokens"] is not None]
        stats = {"records": len(recs), "with_trace": len(traced), "short": 0, "facts_missing": 0, "copies": 0}
        for r in traced:
            kinds = warnings_of(r, min_tokens)
            stats["short"] += "short" in kinds
            stats["facts_missing"] += "facts" in kinds
            why = list(kinds.values())
            key = dedup_key(r["reasoning"])
            if key in first_of:
                why.append(f"same trace as {first_of[key]}")
                stats["copies"] += 1
            first_of.setdefault(key, r["id"])
            seen = set()
            for text in _SENTENCE_END.split(r["reasoning"]):
                key = dedup_key(text)
                if len(key) >= BOILERPLATE_MIN_CHARS and key not in seen:
                    seen.add(key)
                    sentences[key] += 1
                    example.setdefault(key, [text.strip(), r["id"]])
            if why:
                warnings.append({"id": r["id"], "thinking_tokens": r["thinking_tokens"],
                                 "answer_tokens": r["answer_tokens"], "why": why})
        if traced:
            stats.update(median_tokens=statistics.median(r["thinking_tokens"] for r in traced),
                         median_ratio=round(statistics.median(r["thinking_tokens"] / max(r["answer_tokens"], 1)
                                                              for r in traced), 2),
                         facts_reached=round(sum(r["facts"] - len(r["missing"]) for r in traced)
                                             / max(1, sum(r["facts"] for r in traced)), 3))
        files[file] = stats
    boilerplate = [[*example[s], n] for s, n in sentences.most_common(10) if n >= BOILERPLATE_MIN_RECORDS]
    return {"min_thinking_tokens": min_tokens, "files": files, "warnings": warnings[:MAX_WARNINGS],
            "warned": len(warnings), "boilerplate": boilerplate}


def format_section(section: dict[str, Any]) -> list[str]:
    """The text lines of `data check` for the section."""
    if not section or not section.get("files"):
        return []
    out = [f"reasoning traces (data.min_thinking_tokens {section['min_thinking_tokens']}):"]
    for file, s in section["files"].items():
        if not s["with_trace"]:
            out.append(f"  {file}: no traces")
            continue
        flags = [f"{s[k]} {label}" for k, label in (("short", "short"), ("facts_missing", "missing the answer's facts"),
                                                    ("copies", "copies")) if s[k]]
        out.append(f"  {file}: {s['with_trace']} of {s['records']} with a trace, median {s['median_tokens']:g} tokens "
                   f"({s['median_ratio']:g}x the answer), {s['facts_reached']:.0%} of the answers' key facts reached"
                   + (f"; {', '.join(flags)}" if flags else ""))
    if section["warned"]:
        out.append(f"{section['warned']} trace(s) worth rewriting (qwen-daemon data think writes new ones):")
        out.extend(f"  {w['id']}: {'; '.join(w['why'])}" for w in section["warnings"][:20])
        if section["warned"] > 20:
            out.append(f"  ... {section['warned'] - 20} more in data check --json")
    else:
        out.append("  no short trace")
    for sentence, first, n in section["boilerplate"]:
        out.append(f"  boilerplate in {n} traces (first {first}): {sentence[:60]}")
    return out
