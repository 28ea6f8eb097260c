"""Read training records from the files users bring, keeping file and line for every record.

Supported (docs/data-format.md has the details and examples):
- JSON Lines / JSON arrays of records in the seeds' shape `{instruction, input?, output, system?}`,
  the same with `question/answer`, `prompt/response` or `query/response` keys, or chat records
  `{messages: [{role, content, reasoning_content?}]}` (also ShareGPT `{conversations: [{from, value}]}`);
- Markdown Q&A files (see markdown_qa.py for the layouts);
- Parquet, CSV and Arrow files that `datasets` reads, with the same column names.

Every record becomes a `Conversation`: the prompt turns (system, history, the last user turn), the
final answer and its reasoning. Reasoning may come as `<thinking>`/`<think>` tags inside the answer
(several, or nested) or as a separate field; both end up in `Conversation.reasoning`, so the chat
template renders it the model's own way. Whatever cannot be read becomes a `Problem`, never a silent skip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_daemon.train.markdown_qa import parse_markdown_qa

JSON_SUFFIXES = {".json", ".jsonl"}
MARKDOWN_SUFFIXES = {".md", ".markdown"}
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
SUPPORTED_SUFFIXES = JSON_SUFFIXES | MARKDOWN_SUFFIXES | set(TABLE_SUFFIXES)

PROMPT_KEYS = ("instruction", "question", "prompt", "query")
ANSWER_KEYS = ("output", "answer", "response", "completion")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "system": "system", "tool": "tool", "observation": "tool"}


@dataclass(frozen=True)
class Problem:
    """Something wrong with the data, where it is, and what was done about it."""

    file: str
    line: int  # 1-based; 0 = the file as a whole
    reason: str
    action: str = "dropped"  # dropped | truncated | kept

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.reason} [{self.action}]"


@dataclass
class Conversation:
    """One training example: prompt turns, then the assistant's reasoning and answer."""

    file: str
    line: int
    prompt: list[dict[str, str]]  # [{role, content}], system/user/assistant/tool, ends with a user turn
    answer: str
    reasoning: str | None = None  # None = the record has no reasoning at all
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. difficulty


class RecordError(ValueError):
    """A record that cannot become a Conversation; the message is the report's reason."""


def find_files(paths: list[str | Path]) -> tuple[list[Path], list[Path], list[Problem]]:
    """Expand files and directories (recursively, sorted) into (data files, ignored files, problems).

    In a directory, files of other types (a README, a term dictionary) are ignored and listed in
    the report; a file named explicitly must be of a supported type.
    """
    files: list[Path] = []
    ignored: list[Path] = []
    problems: list[Problem] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                (files if f.suffix.lower() in SUPPORTED_SUFFIXES else ignored).append(f)
            if not any(f.is_relative_to(p) for f in files):
                problems.append(Problem(str(p), 0, f"no data files found (looked for {', '.join(sorted(SUPPORTED_SUFFIXES))})"))
        elif p.is_file():
            if p.suffix.lower() in SUPPORTED_SUFFIXES:
                files.append(p)
            else:
                problems.append(Problem(str(p), 0, f"unsupported file type {p.suffix or '(none)'}; "
                                        f"use one of {', '.join(sorted(SUPPORTED_SUFFIXES))}"))
        else:
            problems.append(Problem(str(p), 0, "no such file or directory"))
    return files, ignored, problems


def read_file(path: Path) -> tuple[list[Conversation], list[Problem]]:
    """All conversations in one file, plus a problem for everything that could not be read."""
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        rows = _table_rows(path, TABLE_SUFFIXES[suffix])
    else:
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = e.object[: e.start].count(b"\n") + 1
            return [], [Problem(str(path), line, f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); the file was "
                                "skipped: re-save it as UTF-8, e.g. iconv -f GB18030 -t UTF-8")]
        rows = _markdown_rows(text) if suffix in MARKDOWN_SUFFIXES else _json_rows(text)

    conversations, problems = [], []
    for line, obj in rows:
        if isinstance(obj, Problem):
            problems.append(Problem(str(path), line, obj.reason))
            continue
        try:
            conversations.append(to_conversation(obj, str(path), line))
        except RecordError as e:
            problems.append(Problem(str(path), line, str(e)))
    return conversations, problems


# --- file formats -> (line, dict | Problem) -------------------------------------------------

def _json_rows(text: str) -> Iterator[tuple[int, Any]]:
    """JSON array, a single object, or JSON Lines; each value with the line it starts on."""
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            yield e.lineno, Problem("", e.lineno, f"broken JSON: {e.msg} (column {e.colno}); the whole file was skipped")
            return
        # Re-walk the text to find where each element starts, for line numbers in the report.
        pos = text.index("[") + 1
        for value in values:
            while text[pos] in " \t\r\n,":
                pos += 1
            _, end = decoder.raw_decode(text, pos)
            yield text.count("\n", 0, pos) + 1, value
            pos = end
        return
    if stripped.startswith("{"):  # one pretty-printed object, or JSON Lines
        try:
            yield text.count("\n", 0, text.index("{")) + 1, json.loads(text)
            return
        except json.JSONDecodeError:
            pass
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, Problem("", lineno, f"broken JSON: {e.msg} (column {e.colno})")


def _markdown_rows(text: str) -> Iterator[tuple[int, Any]]:
    items, problems = parse_markdown_qa(text)
    for p in problems:
        yield p.line, Problem("", p.line, p.reason)
    for item in items:
        row = {"question": item.question, "answer": item.answer}
        if item.reasoning is not None:
            row["reasoning"] = item.reasoning
        if item.system:
            row["system"] = item.system
        yield item.line, row


def _table_rows(path: Path, builder: str) -> Iterator[tuple[int, Any]]:
    import datasets  # heavy; only for table formats

    try:
        table = datasets.Dataset.from_file(str(path)) if builder == "arrow" else \
            datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - any reader failure is reported against the file
        yield 0, Problem("", 0, f"cannot read as {builder}: {type(e).__name__}: {e}")
        return
    first_line = 2 if builder == "csv" else 1  # CSV: line 1 is the header; others: row numbers
    for i, row in enumerate(table):
        yield i + first_line, row


# --- one record -> Conversation -------------------------------------------------------------

def to_conversation(obj: Any, file: str, line: int) -> Conversation:
    """Normalise one record of any supported shape; raises RecordError with the reason."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    turns = obj.get("messages", obj.get("conversations"))
    if turns is not None:
        prompt, answer, reasoning = _from_turns(turns)
    else:
        prompt, answer, reasoning = _from_fields(obj)
    meta = {k: obj[k] for k in ("difficulty", "category") if obj.get(k) is not None}
    if reasoning is None:
        reasoning, answer = split_reasoning(answer)
    elif TAG_RE.search(answer):
        raise RecordError("reasoning given twice: a reasoning field and <think>/<thinking> tags in the answer; keep one")
    if reasoning is not None and not reasoning.strip():
        raise RecordError("empty reasoning: the <thinking> block (or reasoning field) has no text; fill it or remove it")
    if not answer.strip():
        raise RecordError("reasoning without an answer: add the final answer after </thinking>" if reasoning
                          else "empty answer")
    if not any(t["role"] == "user" and t["content"].strip() for t in prompt):
        raise RecordError("empty question")
    return Conversation(file, line, prompt, answer, reasoning, meta)


def _from_fields(obj: dict) -> tuple[list[dict[str, str]], str, str | None]:
    question = _first(obj, PROMPT_KEYS)
    answer = _first(obj, ANSWER_KEYS)
    if question is None and answer is None:
        raise RecordError("unrecognised record: expected instruction/output, question/answer, prompt/response "
                          f"or messages (found keys: {', '.join(sorted(map(str, obj))) or 'none'})")
    question = _text(question, "question")
    if obj.get("input"):  # the seeds' optional extra context goes after the instruction
        question = f"{question}\n\n{_text(obj['input'], 'input')}"
    prompt = [{"role": "user", "content": question}]
    if obj.get("system"):
        prompt.insert(0, {"role": "system", "content": _text(obj["system"], "system")})
    reasoning = _first(obj, REASONING_KEYS)
    return prompt, _text(answer, "answer"), None if reasoning is None else _text(reasoning, "reasoning")


def _from_turns(turns: Any) -> tuple[list[dict[str, str]], str, str | None]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("messages must be a non-empty list of {role, content}")
    parsed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"messages[{i}] must be an object with role and content")
        role = ROLE_ALIASES.get(str(turn.get("role", turn.get("from", ""))).lower())
        if role is None:
            raise RecordError(f"messages[{i}]: unknown role {turn.get('role', turn.get('from'))!r}; "
                              "use system, user, assistant or tool")
        parsed.append((role, _text(turn.get("content", turn.get("value")), f"messages[{i}].content"), turn))
    if parsed[-1][0] != "assistant":
        raise RecordError("the last message must be the assistant's answer")
    if any(role == "system" for role, _, _ in parsed[1:]):
        raise RecordError("a system message may only come first")
    *history, (_, answer, last) = parsed
    # Earlier assistant turns are context: their reasoning is not rendered (Qwen3 drops it too).
    prompt = [{"role": r, "content": split_reasoning(c)[1] if r == "assistant" and TAG_RE.search(c) else c}
              for r, c, _ in history]
    reasoning = _first(last, REASONING_KEYS)
    return prompt, answer, None if reasoning is None else _text(reasoning, "reasoning_content")


def _first(obj: dict, keys: tuple[str, ...]) -> Any:
    return next((obj[k] for k in keys if obj.get(k) is not None), None)


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{name} must be text, got {type(value).__name__}")
    return value


# --- reasoning tags ---------------------------------------------------------------------------

TAG_RE = re.compile(r"<(/?)(think|thinking)\s*>", re.IGNORECASE)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split `<thinking>..</thinking> answer` (or <think>) into (reasoning, answer).

    Several blocks and nested blocks are allowed: the reasoning is everything up to the last
    closing tag with the tags removed, the answer is what follows it. No tags: (None, text).
    Unbalanced tags raise RecordError.
    """
    stack: list[str] = []
    last_close = -1
    for m in TAG_RE.finditer(text):
        closing, name = m.group(1) == "/", m.group(2).lower()
        if not closing:
            stack.append(name)
        elif not stack or stack.pop() != name:
            raise RecordError(f"unbalanced reasoning tags: </{name}> at character {m.start()} has no matching <{name}>")
        else:
            last_close = m.end()
    if stack:
        raise RecordError(f"unbalanced reasoning tags: <{stack[-1]}> is never closed")
    if last_close < 0:
        return None, text
    reasoning = TAG_RE.sub("", text[:last_close])
    return reasoning.strip(), text[last_close:].strip()
