"""Find question/answer records in Markdown files.

Users keep Q&A data in many Markdown shapes. This module recognises the common ones and turns
everything it cannot place into a `MarkdownProblem` with a line number, so nothing is dropped
silently. Pure standard library; a Markdown library would not help, because the layouts are about
labels and line order, not about rendering.

Layouts (one file may mix the label layouts 1-3):

1. Label headings, any level `#`..`######`: `## 问题 3：什么是SM4？`, `### 答案`, `## 思考过程`.
   The body runs until the next label, a `---`/`***` rule, or a heading of the same or a higher
   level (fewer `#`); deeper headings stay in the body.
2. Label lines: `Q: ...` / `A: ...`, `问：...` / `答：...`, `问题：...` / `答案：...`, also bold
   (`**Q:**`, `**问题**：`, `**答案：**`) or after a list marker (`1. 问：...`, `- A: ...`). The text
   after the label and the following lines belong to it, up to the next label, a rule or a heading.
   The colon may be `：`, `:` or the `︰`/`﹕` of Hong Kong and Taiwan input methods.
3. Bold labels on their own line (`**问题**`, then the paragraph): as 2 with no text on the line.
4. Numbered lists (no labels anywhere in the file): each item `1. ` / `1、` / `1) ` is a question,
   the lines after it (up to the next item of the same list, a heading or a rule) are the answer;
   an `答：`/`A:` line among them starts the answer instead.
5. Question headings (no question labels anywhere in the file): a heading ending in `？`/`?` is a
   question and its body, up to the next question heading, a heading of the same or a higher
   level or a rule, is the answer.

Every Chinese label also counts in traditional characters (`問：`, `## 問題`, `**思考過程**`,
`系統提示詞：`), so a file in traditional Chinese gives the same records as its simplified twin.

`parse_markdown_qa` has the precise rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# --- public API ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkdownQA:
    """One question/answer record found in a Markdown file."""

    line: int  # 1-based line of the question's start in the file
    question: str
    answer: str  # exactly as written, <think>/<thinking> tags included (not interpreted here)
    reasoning: str | None = None  # only from an explicit reasoning section (`思考`, `Reasoning`, ...)
    system: str | None = None


@dataclass(frozen=True)
class MarkdownProblem:
    """Something in the file that could not become a record: where, what, and what to do."""

    line: int
    reason: str


# --- labels -------------------------------------------------------------------------------------

LABELS: dict[str, tuple[str, ...]] = {
    "question": ("问题", "题目", "问", "question", "q"),
    "answer": ("答案", "回答", "解答", "答", "answer", "a"),
    "reasoning": ("思考过程", "推理过程", "思考", "推理", "reasoning", "thinking"),
    "system": ("系统提示词", "系统提示", "系统", "system prompt", "system"),
}
_KIND_OF_LABEL = {name: kind for kind, names in LABELS.items() for name in names}

# Labels are matched after folding the traditional characters they contain to simplified ones, so
# 問題/題目/問, 思考過程/推理過程, 系統提示詞/系統提示/系統 (and halfway mixes such as 問题, typed with two
# input methods) are the same labels. One character for one character: positions in the folded
# text are positions in the original, and the text after a label is taken from the original.
_TRADITIONAL_LABEL_CHARS = str.maketrans("問題過統詞", "问题过统词")

# `系统：`/`System:` start many ordinary lines ("系统：Ubuntu 22.04"), so as a plain line (not a
# heading, not bold) the system label must be one of the longer forms.
_PLAIN_SYSTEM_LABELS = {"系统提示词", "系统提示", "system prompt"}

# Longest names first so that `问题` wins over `问` and `question` over `q`.
_LABEL_NAMES = sorted(_KIND_OF_LABEL, key=len, reverse=True)
_LABEL_RE = re.compile(
    r"(?P<label>" + "|".join(re.escape(n) for n in _LABEL_NAMES) + r")"
    r"[ \t]*(?P<num>\d+|[一二三四五六七八九十百千]+)?[ \t]*",
    re.IGNORECASE,
)
# Full-width and ASCII colons, and the ones Hong Kong and Taiwan input methods also produce
# (U+FE30 `︰`, U+FE55 `﹕`).
_SEPARATORS = (":", "：", "︰", "﹕")
_AFTER_NUMBER_SEPARATORS = (".", "、", "．", ")", "）")  # `问题1、...`, `Q1. ...`
_BOLD_RE = re.compile(r"^(\*\*|__)(.+?)\1(.*)$")


@dataclass(frozen=True)
class _Label:
    """A recognised label at the start of a line or heading."""

    kind: str  # question | answer | reasoning | system
    name: str  # the label as written, lower-cased
    rest: str  # text after the label on the same line
    plain: bool  # a plain line (not heading, not bold): ordinary prose could look like this


def _match_label_start(text: str) -> tuple[str, str, bool] | None:
    """Match `label [number] [separator]` at the start of text: (name, rest, had_separator).

    The name is the simplified form, lower-cased (`問題` gives `问题`).
    """
    m = _LABEL_RE.match(text.translate(_TRADITIONAL_LABEL_CHARS))
    if m is None:
        return None
    name = m.group("label").lower()
    after = text[m.end():]
    if after.startswith(_SEPARATORS):
        return name, after[1:].strip(), True
    if m.group("num") and after.startswith(_AFTER_NUMBER_SEPARATORS):
        return name, after[1:].strip(), True
    return name, after.strip(), False


def _match_label(text: str, *, in_heading: bool) -> _Label | None:
    """The label that text (a line without list marker, or a heading's title) starts with, if any.

    A plain line needs the separator (`:`/`：`, or `.`/`、`/`)` after a number: `问题1、`). In a
    heading or in bold a label may stand alone (`## 答案`, `**问题**`), but whatever follows it needs
    the separator, so that `## A brief history` or `**答案**取决于...` stay ordinary text.
    """
    text = text.strip()
    bold = _BOLD_RE.match(text)
    if bold:
        found = _match_label_start(bold.group(2).strip())
        if found is None:
            return None
        name, rest, had_separator = found
        after = bold.group(3)
        if not had_separator:
            if rest:  # `**问题很多**`: a bold phrase, not a label
                return None
            if after.startswith(_SEPARATORS):  # `**问题**：...`
                after = after[1:]
            elif after and not after[0].isspace():  # `**答案**取决于...`: prose
                return None
        return _Label(_KIND_OF_LABEL[name], name, (rest + after).strip(), plain=False)
    found = _match_label_start(text)
    if found is None:
        return None
    name, rest, had_separator = found
    if had_separator:
        return _Label(_KIND_OF_LABEL[name], name, rest, plain=not in_heading)
    if in_heading and not rest:
        return _Label(_KIND_OF_LABEL[name], name, "", plain=False)
    return None


def _label_allowed(label: _Label, last_kind: str | None) -> bool:
    """Whether a label counts here; plain lines that often occur in prose need the right context.

    A plain `思考：`/`推理：` line only counts right after a question (before its answer); a plain
    `系统：`/`System:` line never counts (see _PLAIN_SYSTEM_LABELS). Headings and bold labels always count.
    """
    if not label.plain:
        return True
    if label.kind == "reasoning":
        return last_kind == "question"
    if label.kind == "system":
        return label.name in _PLAIN_SYSTEM_LABELS
    return True


# --- Markdown line shapes -----------------------------------------------------------------------

_HEADING_RE = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_CLOSING_HASHES_RE = re.compile(r"(?:^|[ \t]+)#+$")
_RULE_RE = re.compile(r"^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_ITEM_RE = re.compile(r"^(?P<indent>[ \t]*)(?P<num>\d{1,5})(?P<delim>[.、．)）])(?P<space>[ \t]*)(?P<content>\S.*)$")
_BULLET_RE = re.compile(r"^(?P<indent>[ \t]*)[-*+][ \t]+(?P<content>.*)$")
_FENCE_OPEN_RE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_NO_SPACE_HEADING_RE = re.compile(r"^#{1,6}[^#\s]")


def _width(whitespace: str) -> int:
    """Columns taken by leading whitespace (a tab counts as 4)."""
    return len(whitespace.expandtabs(4))


def _heading(text: str) -> tuple[int, str] | None:
    """(level, title) of an ATX heading; `#` must be followed by a space, as in CommonMark."""
    m = _HEADING_RE.match(text)
    if m is None:
        return None
    title = _CLOSING_HASHES_RE.sub("", m.group(2) or "")
    return len(m.group(1)), title.strip()


def _is_rule(text: str) -> bool:
    """A thematic break: `---`, `***`, `___` (also spaced, `- - -`)."""
    return _RULE_RE.match(text) is not None


@dataclass(frozen=True)
class _Item:
    """A numbered list item: `1. text`, `1、text`, `1) text`."""

    indent: int
    delim: str
    content: str
    column: int  # where the content starts; continuation lines are dedented by this much


def _list_item(text: str) -> _Item | None:
    """The numbered list item on this line, if any.

    After `.` or `)` a space is needed, except before Chinese text (`1.什么是...`), so that
    `1.5 版本` stays prose; `、` needs none.
    """
    m = _ITEM_RE.match(text)
    if m is None:
        return None
    delim, content = m.group("delim"), m.group("content")
    if delim in ".)" and not m.group("space") and content[0].isascii():
        return None
    column = _width(text[: m.start("content")])
    return _Item(_width(m.group("indent")), delim, content, column)


def _strip_list_marker(text: str) -> tuple[str, int]:
    """The line without indentation and list marker, and the column where that text starts."""
    item = _list_item(text)
    if item is not None:
        return item.content, item.column
    bullet = _BULLET_RE.match(text)
    if bullet is not None:
        return bullet.group("content"), _width(text[: bullet.start("content")])
    stripped = text.lstrip(" \t")
    return stripped, _width(text[: len(text) - len(stripped)])


def _line_label(text: str) -> tuple[_Label, int] | None:
    """The label a (non-heading) line starts with, and the column where its text starts."""
    content, column = _strip_list_marker(text)
    label = _match_label(content, in_heading=False)
    return (label, column) if label is not None else None


def _plain_title(title: str) -> str:
    """A heading title without bold markers around it and without a leading `1.` number."""
    bold = _BOLD_RE.match(title)
    if bold is not None and not bold.group(3).strip():
        title = bold.group(2).strip()
    item = _list_item(title)
    return item.content if item is not None else title


def _is_question_title(title: str) -> bool:
    """A heading that asks something: its text ends with `？` or `?`."""
    return _plain_title(title).endswith(("？", "?"))


# --- lines that are never structure: code fences, <think> blocks ---------------------------------

_THINK_TAG_RE = re.compile(r"<(/?)think(?:ing)?>", re.IGNORECASE)
_INLINE_CODE_RE = re.compile(r"`[^`\n]*`")


def _split_lines(text: str) -> list[str]:
    """Lines without line endings (\\r\\n, \\r or \\n), without a leading byte-order mark."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _fenced_lines(lines: list[str]) -> tuple[list[bool], int | None]:
    """Mark the lines of code fences (fence lines included); also the line of an unclosed fence.

    As in CommonMark, an unclosed fence runs to the end of the file.
    """
    fenced = [False] * len(lines)
    fence, opened_at = "", None
    for i, text in enumerate(lines):
        if fence:
            fenced[i] = True
            stripped = text.strip()
            if stripped.startswith(fence) and set(stripped) == {fence[0]}:
                fence, opened_at = "", None
            continue
        m = _FENCE_OPEN_RE.match(text)
        if m and not (m.group("fence")[0] == "`" and "`" in m.group("info")):
            fenced[i] = True
            fence, opened_at = m.group("fence"), i + 1
    return fenced, opened_at


def _think_lines(lines: list[str], fenced: list[bool]) -> list[bool]:
    """Mark the lines inside <think>/<thinking> blocks (after the opening line, up to the closing one).

    Model-written reasoning often contains headings, `---` and lines like `问题：...`; they belong
    to the answer, not to the file's structure. Tags are counted so nested blocks work, and a block
    that is never closed protects nothing (so a typo cannot swallow the rest of the file).
    """
    inside = [False] * len(lines)
    depth, opened_at = 0, 0
    for i, text in enumerate(lines):
        if fenced[i]:
            continue
        for tag in _THINK_TAG_RE.finditer(_INLINE_CODE_RE.sub("", text)):
            if not tag.group(1):
                if depth == 0:
                    opened_at = i
                depth += 1
            elif depth > 0:
                depth -= 1
                if depth == 0:
                    for j in range(opened_at + 1, i + 1):
                        inside[j] = True
    return inside


# --- choosing the layout ------------------------------------------------------------------------


def _choose_layout(lines: list[str], opaque: list[bool]) -> tuple[str | None, tuple[int, str] | None]:
    """Pick how the file marks its questions: ("labels" | "headings" | "list" | None, list style).

    Labels win: any question label (heading, line or bold) makes it a label file, and then
    question headings and numbered items are ordinary text. Without question labels, headings
    ending in `？`/`?` make it a question-heading file; failing those, a numbered list makes it a
    list file whose questions are the items with the first item's indentation and delimiter (so an
    answer's `1)` steps are not questions). Answer labels alone still make a label file, so that
    each answer is reported as having no question.
    """
    has_question = has_answer = question_headings = False
    list_style = None
    for text, hidden in zip(lines, opaque):
        if hidden or not text.strip() or _is_rule(text):
            continue
        heading = _heading(text)
        if heading is not None:
            label = _match_label(heading[1], in_heading=True)
            if label is None:
                question_headings = question_headings or _is_question_title(heading[1])
            has_question = has_question or (label is not None and label.kind == "question")
            has_answer = has_answer or (label is not None and label.kind == "answer")
            continue
        found = _line_label(text)
        if found is not None:
            has_question = has_question or found[0].kind == "question"
            has_answer = has_answer or found[0].kind == "answer"
            continue
        item = _list_item(text)
        if item is not None and list_style is None and item.indent < 4:
            list_style = (item.indent, item.delim)
    if has_question:
        return "labels", None
    if question_headings:
        return "headings", None
    if list_style is not None:
        return "list", list_style
    if has_answer:
        return "labels", None
    return None, None


def _no_layout_problem(lines: list[str], opaque: list[bool]) -> MarkdownProblem:
    """The problem for a non-empty file in which no Q&A layout was found."""
    first = next(i for i, text in enumerate(lines, 1) if text.strip())
    reason = ("no Q&A layout found: mark questions with '## 问题' headings or '问：'/'Q:' lines and answers "
              "with '## 答案' headings or '答：'/'A:' lines (or use '1. question' items with the answer "
              "indented below, or headings ending in '？')")
    if any(_NO_SPACE_HEADING_RE.match(text) and not hidden for text, hidden in zip(lines, opaque)):
        reason += "; note that a heading needs a space after '#', e.g. '## 问题' not '##问题'"
    return MarkdownProblem(first, reason)


# --- sections -----------------------------------------------------------------------------------


@dataclass
class _Section:
    """A labelled stretch of lines: a question, answer, reasoning or system prompt."""

    kind: str
    line: int
    head: str  # text on the label's own line
    level: int  # a heading with this many `#` or fewer ends the section (6: any heading)
    indent: int  # columns of indentation removed from body lines (list items)
    head_is_question: bool = False  # if no answer follows, head is the question and body the answer
    body: list[str] = field(default_factory=list)


def _section_start(text: str, number: int, layout: str, list_style: tuple[int, str] | None,
                   current: _Section | None, last_kind: str | None) -> _Section | None:
    """The section that starts on this line, if any."""
    heading = _heading(text)
    if heading is not None:
        level, title = heading
        label = _match_label(title, in_heading=True)
        if label is not None:
            # `## Q1: 什么是SM4？` followed by a body and no answer label: the body is the answer.
            return _Section(label.kind, number, label.rest, level, 0,
                            head_is_question=label.kind == "question" and bool(label.rest))
        if layout == "headings" and _is_question_title(title):
            return _Section("question", number, _plain_title(title), level, 0, head_is_question=True)
        return None
    if _is_rule(text):
        return None
    # Label lines end at headings as deep as the heading section they sit in (`## 问题` ... `答：`
    # keeps `### 步骤` in the answer); outside any heading section, any heading ends them.
    level = current.level if current is not None else 6
    found = _line_label(text)
    if found is not None and _label_allowed(found[0], last_kind):
        label, column = found
        return _Section(label.kind, number, label.rest, level, column)
    if layout == "list":
        item = _list_item(text)
        if item is not None and (item.indent, item.delim) == list_style:
            return _Section("question", number, item.content, level, item.column, head_is_question=True)
    return None


def _split_sections(lines: list[str], opaque: list[bool], layout: str,
                    list_style: tuple[int, str] | None) -> tuple[list[_Section], list[MarkdownProblem]]:
    """Cut the file into sections; text outside every section after the first one is a problem."""
    sections: list[_Section] = []
    problems: list[MarkdownProblem] = []
    current: _Section | None = None
    stray_reported = False  # one problem per stretch of stray text, not one per line
    for number, (text, hidden) in enumerate(zip(lines, opaque), 1):
        if not hidden:
            last_kind = sections[-1].kind if sections else None
            section = _section_start(text, number, layout, list_style, current, last_kind)
            if section is not None:
                sections.append(section)
                current, stray_reported = section, False
                continue
            heading = _heading(text)
            if heading is not None:
                if current is not None and heading[0] <= current.level:
                    current = None
                elif current is not None:
                    current.body.append(text)
                continue
            if _is_rule(text):
                current = None
                continue
        if current is not None:
            current.body.append(text)
        elif text.strip() and sections and not stray_reported:
            # Text before the first section is a title or an introduction; later it is most
            # likely part of an answer that a rule or heading cut off.
            problems.append(MarkdownProblem(number, (
                "text outside any question or answer is ignored: a '---' rule or a heading ended the "
                "section above it; move the text into a section, or remove the rule or heading")))
            stray_reported = True
    return sections, problems


def _dedent(text: str, columns: int) -> str:
    """Remove up to `columns` columns of leading whitespace (a tab counts as 4)."""
    removed = i = 0
    while i < len(text) and removed < columns and text[i] in " \t":
        removed += 4 if text[i] == "\t" else 1
        i += 1
    return text[i:]


def _join(lines: list[str]) -> str:
    """Join lines, dropping blank lines at the start and end but keeping the ones inside."""
    start, end = 0, len(lines)
    while start < end and not lines[start].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[start:end])


def _body_text(section: _Section) -> str:
    """The section's lines after its label line, dedented."""
    return _join([_dedent(line, section.indent) for line in section.body])


def _section_text(section: _Section) -> str:
    """The section's whole text: the label line's text, then the body."""
    head = [section.head] if section.head else []
    return _join(head + [_dedent(line, section.indent) for line in section.body])


# --- sections -> records ------------------------------------------------------------------------


@dataclass
class _Record:
    """A question with what has been found for it so far."""

    question: _Section
    system: str | None
    reasoning: _Section | None = None
    answer: _Section | None = None


def _finish(record: _Record | None, records: list[MarkdownQA], problems: list[MarkdownProblem]) -> None:
    """Turn a collected question into a MarkdownQA, or into a problem saying what is missing."""
    if record is None:
        return
    question_section = record.question
    if record.answer is not None:
        question, answer = _section_text(question_section), _section_text(record.answer)
    elif question_section.head_is_question and question_section.head and _body_text(question_section):
        question, answer = question_section.head, _body_text(question_section)
    else:
        problems.append(MarkdownProblem(question_section.line, (
            "question with no answer: add an '答案' section or an 'A:'/'答：' line after it")))
        return
    if not question:
        problems.append(MarkdownProblem(question_section.line,
                                        "empty question: write the question after the label, or remove the label"))
        return
    if not answer:
        problems.append(MarkdownProblem(record.answer.line,
                                        "empty answer: write the answer after the label, or remove the label"))
        return
    reasoning = _section_text(record.reasoning) if record.reasoning is not None else ""
    records.append(MarkdownQA(question_section.line, question, answer, reasoning or None, record.system))


def _assemble(sections: list[_Section]) -> tuple[list[MarkdownQA], list[MarkdownProblem]]:
    """Pair questions with their reasoning and answers; report every section that does not fit.

    A system prompt applies to every question after it, until the next system section (an empty
    one clears it); written between a question and its answer, it applies to that question too.
    Reasoning belongs to the current question, before or after its answer.
    """
    records: list[MarkdownQA] = []
    problems: list[MarkdownProblem] = []
    record: _Record | None = None
    system: str | None = None
    unused_system: _Section | None = None  # a system prompt no question has used yet
    for section in sections:
        if section.kind == "question":
            _finish(record, records, problems)
            record, unused_system = _Record(section, system), None
        elif section.kind == "answer":
            if record is None or record.answer is not None:
                problems.append(MarkdownProblem(section.line, (
                    "answer with no question: add a '问题' section or a 'Q:'/'问：' line before it")))
            else:
                record.answer = section
        elif section.kind == "reasoning":
            if record is None:
                problems.append(MarkdownProblem(section.line, (
                    "reasoning with no question: put the reasoning section after a question, before its answer")))
            elif record.reasoning is not None:
                problems.append(MarkdownProblem(section.line, (
                    f"second reasoning section for the question at line {record.question.line}: "
                    "merge the two into one")))
            else:
                record.reasoning = section
        else:  # system
            if unused_system is not None:
                problems.append(MarkdownProblem(unused_system.line, (
                    "system prompt replaced by the next one before any question used it: remove one")))
            system = _section_text(section) or None
            unused_system = section if system else None  # an empty one only clears; nothing to lose
            if record is not None and record.answer is None:
                # Written between a question and its answer: clearly meant for that question too.
                record.system, unused_system = system, None
    _finish(record, records, problems)
    if unused_system is not None:
        problems.append(MarkdownProblem(unused_system.line, (
            "system prompt with no question after it: system prompts apply to the questions that follow")))
    return records, problems


# --- entry point --------------------------------------------------------------------------------


def parse_markdown_qa(text: str) -> tuple[list[MarkdownQA], list[MarkdownProblem]]:
    """All Q&A records of a Markdown file, and a problem for everything that could not be placed.

    Rules, in order:
    - Lines inside code fences (``` or ~~~) and inside matched <think>/<thinking> blocks are never
      labels, headings or rules; they stay in the text they belong to. (A YAML front matter block
      needs no special case: it comes before the first question, so it is ignored.)
    - The layout is chosen once per file (see _choose_layout): labels, else question headings,
      else a numbered list; a non-empty file with none of them gets one problem.
    - A section (question, answer, reasoning, system) starts at a label (or, in the implicit
      layouts, a question heading or list item) and runs to the next label, a `---`/`***`/`___`
      rule, or a heading of the same or higher level as the one it sits under (any heading, when
      it sits under none). Text before the first section is ignored; text after it that is in no
      section is reported.
    - Fields are stripped of blank lines around them; inner line breaks, Markdown and tags stay;
      list-item bodies lose the item's indentation.
    - A question without an answer, an answer without a question, empty questions or answers,
      stray reasoning and unused system prompts are reported, each with its line.
    """
    lines = _split_lines(text)
    if not any(line.strip() for line in lines):
        return [], []
    fenced, unclosed_fence = _fenced_lines(lines)
    think = _think_lines(lines, fenced)
    opaque = [f or t for f, t in zip(fenced, think)]

    problems: list[MarkdownProblem] = []
    if unclosed_fence is not None:
        problems.append(MarkdownProblem(unclosed_fence, (
            "code fence is never closed, so everything after it was read as code: add the closing fence line")))

    layout, list_style = _choose_layout(lines, opaque)
    if layout is None:
        return [], sorted(problems + [_no_layout_problem(lines, opaque)], key=lambda p: p.line)
    sections, stray = _split_sections(lines, opaque, layout, list_style)
    records, pairing = _assemble(sections)
    if layout == "list" and not records:
        # A numbered list with no answers under any item is ordinary prose, not a Q&A file.
        return [], sorted(problems + [_no_layout_problem(lines, opaque)], key=lambda p: p.line)
    return records, sorted(problems + stray + pairing, key=lambda p: p.line)
