"""Scores for a model's answers against the reference answers: pure functions on strings.

A generated text is split into its thinking and its answer first (``split_reasoning``) and only
the answer is scored, against the reference's answer (``reference_answer``). ``score_record``
gives every metric for one question; ``summarise`` averages them overall and per category.

Both sides go through ``normalize_text`` before anything is counted. The references already went
through it when the data was prepared, the generations did not: without it a model that writes
traditional characters or full-width letters ("ＡＥＳ", "金鑰") would lose points for spelling.

What is compared
----------------
- Character tokens (``char_tokens``), the usual unit for Chinese ROUGE: every Chinese character
  (or other non-ASCII letter or digit) is one token, every run of ASCII letters and digits is one
  token, lower-cased ("AES-128" -> "aes", "128"); whitespace, punctuation and symbols are dropped.
  On English text this is exactly rouge-score's own tokenizer (without stemming), so the ASCII
  words inside a Chinese answer count the way ROUGE has always counted words. Punctuation is
  dropped because it is style (，against ,) and every answer is full of ，and 。, which would
  lift every score alike.
- Word tokens (``word_tokens``): jieba segmentation by the term dictionary's ``segment``, so a
  term such as 分组密码 or SHA-256 is one token; lower-cased, tokens without a letter or digit
  (punctuation) dropped.

rouge-score's default tokenizer keeps only [a-z0-9], so a Chinese answer has no tokens and scores
0 even against itself; we give ``RougeScorer`` our tokenizers instead.

The term-weighted ROUGE-L (加权ROUGE-L, ``weighted_rouge_l``)
-----------------------------------------------------------
Character tokens, each with a weight on its own side: TERM_WEIGHT when the token lies (wholly or
partly) inside a term occurrence that ``TermDictionary.find_terms`` finds in that side's text,
else 1. A matched pair of equal tokens weighs the smaller of its two weights, so the characters
of 分组密码 earn the term weight only when both texts wrote the term (not when the candidate
merely has the same characters in other words), and precision and recall never exceed 1. The
common subsequence with the largest total weight M is found by dynamic programming; precision =
M / candidate weight, recall = M / reference weight, F1 their harmonic mean. With every weight 1
it is the plain character ROUGE-L.

Terms (``term_overlap``)
------------------------
The canonical names ``count_terms`` finds, as sets: a term counts once however often it is
repeated, since an answer either names a concept or does not. Recall = reference terms found in
the candidate / reference terms; precision = candidate terms found in the reference / candidate
terms. Undefined (None) when the side it divides by has no term.

Empty texts score 0 (rouge-score's convention, kept for the weighted score), never a division
by zero.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any

from rouge_score import rouge_scorer
from rouge_score.scoring import Score, fmeasure

from qwen_daemon.train.readers import TAG_RE
from qwen_daemon.train.text_zh import TermDictionary, normalize_text

__all__ = [
    "TERM_WEIGHT",
    "ReasoningFormat",
    "Score",
    "char_tokens",
    "reference_answer",
    "rouge_l_chars",
    "rouge_l_words",
    "score_record",
    "split_reasoning",
    "summarise",
    "term_overlap",
    "weighted_rouge_l",
    "word_tokens",
]

TERM_WEIGHT = 3
"""Weight of a character inside a term occurrence (others weigh 1) in ``weighted_rouge_l``.

In the bundled answers (data/crypto_qa, 283 records) 11.5% of the character tokens lie inside a
term. At weight 3 the terms carry 28% of an answer's weight: a missing term costs three times an
ordinary character, yet the prose around the terms still decides most of the score, so a list of
the right terms without an explanation does not score like a good answer.
"""

# Special tokens a decode with skip_special_tokens=False leaves in: <|im_end|>, <|endoftext|>, ...
_SPECIAL_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>")


# --- thinking and answer --------------------------------------------------------------------------

@dataclass(frozen=True)
class ReasoningFormat:
    """How a generation is shaped (``split_reasoning``); score_record reports these fields."""

    well_formed: bool
    """A </think> closes the thinking and no tag is out of place (stray_tags == 0)."""
    has_answer: bool
    """Some text follows the </think>."""
    stray_tags: int
    """Tags out of place: a <think> other than one at the very start, a </think> after the first,
    a special token inside the text, and one for text after the end-of-turn token (dropped)."""
    truncated: bool
    """No </think> and no end-of-turn token: generation was cut off while thinking. (A text
    decoded without its special tokens, or cut at them, is truncated whenever it is unclosed.)"""


def split_reasoning(text: str) -> tuple[str, str, ReasoningFormat]:
    """Split a Qwen3-Thinking generation into (thinking, answer, format).

    The generation prompt already opened <think>, so the usual shape is
    ``thinking</think>\\n\\nanswer``; a leading <think> is accepted too (<thinking> counts as
    <think>, in any case). The first </think> ends the thinking, as in vLLM's Qwen3 reasoning
    parser: what follows is the answer a user would be shown. Without a </think> it is all
    thinking and the answer is empty. The turn ends at the first <|im_end|> or <|endoftext|>;
    anything after it is dropped. Stray tags and special tokens are removed from both parts,
    their text is kept; both parts are stripped.
    """
    end = min((i for i in map(text.find, _END_OF_TURN) if i >= 0), default=-1)
    stray = 0
    if end >= 0:
        after = _SPECIAL_RE.sub("", text[end:])
        stray += bool(after.strip())  # the model went on after ending its turn
        text = text[:end]
    text, specials = _SPECIAL_RE.subn("", text)
    stray += specials

    tags = list(TAG_RE.finditer(text))
    opened = bool(tags) and not tags[0].group(1) and not text[:tags[0].start()].strip()
    close = next((m for m in tags if m.group(1)), None)
    stray += len(tags) - opened - (close is not None)
    if close is None:
        thinking, answer = TAG_RE.sub("", text), ""
    else:
        thinking, answer = TAG_RE.sub("", text[:close.start()]), TAG_RE.sub("", text[close.end():])
    thinking, answer = thinking.strip(), answer.strip()
    return thinking, answer, ReasoningFormat(
        well_formed=close is not None and stray == 0, has_answer=bool(answer), stray_tags=stray,
        truncated=close is None and end < 0)


def reference_answer(text: str) -> str:
    """The answer part of a reference: what follows the last </think> or </thinking> (the data
    readers' rule, so several or nested blocks work), with any other tags and special tokens
    removed and stripped. A reference without tags is all answer."""
    text = _SPECIAL_RE.sub("", text)
    closes = [m for m in TAG_RE.finditer(text) if m.group(1)]
    if closes:
        text = text[closes[-1].end():]
    return TAG_RE.sub("", text).strip()


# --- tokens ---------------------------------------------------------------------------------------

# A run of ASCII letters and digits, or one other letter or digit ([^\W_]: \w without "_").
_CHAR_TOKEN_RE = re.compile(r"[A-Za-z0-9]+|[^\W_]")
_HAS_ALNUM_RE = re.compile(r"[^\W_]")


def _char_token_spans(normalized: str) -> list[tuple[str, int, int]]:
    """Character tokens of an already normalised text with their spans in it."""
    return [(m.group().lower(), m.start(), m.end()) for m in _CHAR_TOKEN_RE.finditer(normalized)]


def char_tokens(text: str) -> list[str]:
    """Character tokens of ``normalize_text(text)`` (see the module docstring)."""
    return [tok for tok, _, _ in _char_token_spans(normalize_text(text))]


def word_tokens(text: str, terms: TermDictionary) -> list[str]:
    """jieba tokens of ``normalize_text(text)``, terms whole, lower-cased, punctuation dropped."""
    return [tok.lower() for tok in terms.segment(text) if _HAS_ALNUM_RE.search(tok)]


@dataclass(frozen=True)
class _Tokenizer:
    """What RougeScorer takes: an object with ``tokenize(text) -> list[str]``."""

    tokenize: Callable[[str], list[str]]


# --- ROUGE-L --------------------------------------------------------------------------------------

def _rouge_l(reference: str, candidate: str, tokenize: Callable[[str], list[str]]) -> Score:
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer(tokenize))
    return scorer.score(reference, candidate)["rougeL"]


def rouge_l_chars(reference: str, candidate: str) -> Score:
    """ROUGE-L (precision, recall, fmeasure) over character tokens."""
    return _rouge_l(reference, candidate, char_tokens)


def rouge_l_words(reference: str, candidate: str, terms: TermDictionary) -> Score:
    """ROUGE-L over jieba word tokens, the dictionary's terms kept whole."""
    return _rouge_l(reference, candidate, lambda text: word_tokens(text, terms))


def _weighted_tokens(text: str, terms: TermDictionary,
                     term_weight: int) -> tuple[list[str], list[int]]:
    """Character tokens of ``normalize_text(text)`` and their weights (term_weight in a term)."""
    text = normalize_text(text)
    in_term = bytearray(len(text))
    for _, start, end in terms.find_terms(text):
        in_term[start:end] = b"\x01" * (end - start)
    tokens, weights = [], []
    for tok, start, end in _char_token_spans(text):
        tokens.append(tok)
        weights.append(term_weight if 1 in in_term[start:end] else 1)
    return tokens, weights


def _weighted_lcs(ref: Sequence[str], ref_weights: Sequence[int],
                  cand: Sequence[str], cand_weights: Sequence[int]) -> int:
    """The largest total weight of a common subsequence; a matched pair weighs the smaller weight.

    The usual table L[i][j] (best over ref[:i] and cand[:j]) one row at a time, but only the
    cells where ref[i] matches are computed in Python: every other cell is the running maximum
    of the row (L[i][j] = max(L[i-1][j], L[i][j-1])), which ``accumulate(max)`` does in C. A
    reference token that matches nothing leaves the row as it was. 0.2 s for 1,000 x 1,000
    characters from an alphabet of 30 (many matches, the slow case); a few ms for real answers.
    """
    positions: dict[str, list[int]] = defaultdict(list)
    for j, tok in enumerate(cand):
        positions[tok].append(j)
    row = [0] * (len(cand) + 1)  # row[j] = L[i][j]
    for tok, w in zip(ref, ref_weights):
        matches = positions.get(tok)
        if not matches:
            continue
        new = row.copy()
        for j in matches:
            diagonal = row[j] + min(w, cand_weights[j])
            if diagonal > new[j + 1]:
                new[j + 1] = diagonal
        row = list(accumulate(new, max))
    return row[-1]


def weighted_rouge_l(reference: str, candidate: str, terms: TermDictionary,
                     term_weight: int = TERM_WEIGHT) -> Score:
    """Term-weighted ROUGE-L over character tokens (加权ROUGE-L; see the module docstring)."""
    ref, ref_weights = _weighted_tokens(reference, terms, term_weight)
    cand, cand_weights = _weighted_tokens(candidate, terms, term_weight)
    matched = _weighted_lcs(ref, ref_weights, cand, cand_weights)
    if not matched:  # also every empty side
        return Score(precision=0.0, recall=0.0, fmeasure=0.0)
    precision, recall = matched / sum(cand_weights), matched / sum(ref_weights)
    return Score(precision=precision, recall=recall, fmeasure=fmeasure(precision, recall))


# --- terms ----------------------------------------------------------------------------------------

def term_overlap(reference: str, candidate: str,
                 terms: TermDictionary) -> tuple[float | None, float | None]:
    """(recall, precision) of the dictionary terms, as sets; None where a side has no term."""
    ref, cand = set(terms.count_terms(reference)), set(terms.count_terms(candidate))
    common = len(ref & cand)
    return (common / len(ref) if ref else None), (common / len(cand) if cand else None)


# --- one record, many records ---------------------------------------------------------------------

def score_record(reference: str, generated: str, terms: TermDictionary) -> dict[str, Any]:
    """Every metric for one question: the generation is split and its answer is scored against
    the reference's answer.

    Keys: rouge_l_chars, rouge_l_words, rouge_l_weighted (F1 each), term_recall, term_precision
    (None when undefined), thinking_chars, answer_chars (lengths of the normalised parts, in
    characters), and ReasoningFormat's well_formed, has_answer, stray_tags, truncated. Every value
    is a number, a bool or None, so the dict goes to JSON as it is. An empty answer (a truncated
    generation) scores 0.
    """
    thinking, answer, shape = split_reasoning(generated)
    answer = normalize_text(answer)
    ref = normalize_text(reference_answer(reference))
    recall, precision = term_overlap(ref, answer, terms)
    return {
        "rouge_l_chars": rouge_l_chars(ref, answer).fmeasure,
        "rouge_l_words": rouge_l_words(ref, answer, terms).fmeasure,
        "rouge_l_weighted": weighted_rouge_l(ref, answer, terms).fmeasure,
        "term_recall": recall,
        "term_precision": precision,
        "thinking_chars": len(normalize_text(thinking)),
        "answer_chars": len(answer),
        **asdict(shape),
    }


def summarise(records: list[dict], key: str = "category",
              systems: Sequence[str] = ("base", "tuned")) -> dict[str, Any]:
    """Mean of every numeric metric, overall and per value of ``key``, each system side by side.

    Expects records such as ``{"category": "对称密码", "base": {...}, "tuned": {...}}``: the
    ``key`` field names the group, each of ``systems`` holds one ``score_record`` output; other
    fields are ignored. Booleans average to rates; None values (an undefined term recall or
    precision) are left out of their mean, and a mean of nothing is None. Returns::

        {"overall": {"n": 12, "base": {"rouge_l_chars": 0.31, ...}, "tuned": {...}},
         "by_category": {"对称密码": {"n": 5, "base": {...}, "tuned": {...}}, ...}}

    with the groups in name order ("by_" + key).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for i, record in enumerate(records):
        missing = [k for k in (key, *systems) if k not in record]
        if missing:
            raise ValueError(f"record {i} has no {', '.join(map(repr, missing))} field; every "
                             f"record needs {key!r} and the scores of {', '.join(systems)}")
        groups[str(record[key])].append(record)
    return {"overall": _means(records, systems),
            f"by_{key}": {name: _means(group, systems) for name, group in sorted(groups.items())}}


def _means(records: list[dict], systems: Sequence[str]) -> dict[str, Any]:
    """{"n": records, system: {metric: mean}} for one group."""
    result: dict[str, Any] = {"n": len(records)}
    for system in systems:
        values: dict[str, list[float]] = {}
        for record in records:
            for metric, value in record[system].items():
                if value is None or isinstance(value, (int, float)):
                    values.setdefault(metric, [])
                    if value is not None:
                        values[metric].append(value)
        result[system] = {m: statistics.fmean(v) if v else None for m, v in values.items()}
    return result
