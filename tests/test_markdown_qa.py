"""Tests for the Markdown Q&A parser: one fixture per layout, malformed files, and edge rules."""

import dataclasses
import functools
from pathlib import Path

import opencc
import pytest

from qwen_daemon.train.markdown_qa import LABELS, MarkdownProblem, MarkdownQA, parse_markdown_qa

FIXTURES = Path(__file__).parent / "fixtures" / "markdown"

NO_ANSWER = "question with no answer: add an '答案' section or an 'A:'/'答：' line after it"
NO_QUESTION = "answer with no question: add a '问题' section or a 'Q:'/'问：' line before it"


def parse_fixture(name: str) -> tuple[list[MarkdownQA], list[MarkdownProblem]]:
    """Parse one fixture file."""
    return parse_markdown_qa((FIXTURES / name).read_text(encoding="utf-8"))


def parse_clean(text: str) -> list[MarkdownQA]:
    """Parse text that must produce no problems."""
    records, problems = parse_markdown_qa(text)
    assert problems == []
    return records


# --- one fixture per layout ---------------------------------------------------------------------


def test_label_headings():
    records, problems = parse_fixture("label_headings.md")
    assert problems == []
    assert records == [
        MarkdownQA(5, "什么是SM4？", "SM4 是我国发布的分组密码标准，分组长度为 128 位。"),
        MarkdownQA(
            11,
            "请写出用 Python 进行 SM4 加密的示例。",
            "```python\n# 这一行不是标题\nfrom gmssl.sm4 import CryptSM4, SM4_ENCRYPT\nQ: 这一行也不是标签\n```\n"
            "\n#### 说明\n\n密钥必须是 16 字节。",
            reasoning="需要先安装第三方库 gmssl。",
        ),
        MarkdownQA(31, "What is the block size of SM4?", "<think>\nSM4 与 AES 的分组长度相同。\n</think>\n128 bits."),
    ]


def test_label_lines():
    records, problems = parse_fixture("label_lines.md")
    assert problems == []
    assert records == [
        MarkdownQA(5, "什么是分组密码？", "分组密码把明文切成固定长度的分组，\n再用同一个密钥逐组加密。"),
        MarkdownQA(11, "AES 的密钥可以有多长？", "<think>回忆 FIPS-197 的规定。</think>\n128、192 或 256 位。",
                   reasoning="AES 标准规定了三种密钥长度。"),
        MarkdownQA(16, "SM4 和 AES 的分组长度一样吗？", "一样，都是 128 位。"),
        MarkdownQA(19, "ECB 模式安全吗？", "不安全，相同的明文分组会得到相同的密文分组。"),
    ]


def test_bold_labels():
    records, problems = parse_fixture("bold_labels.md")
    assert problems == []
    assert records == [
        MarkdownQA(3, "什么是工作模式？", "工作模式规定了如何用分组密码处理多个分组，\n常见的有 ECB、CBC、CTR。",
                   reasoning="分组密码一次只能处理一个分组。"),
        MarkdownQA(16, "ECB 模式有什么问题？", "相同的明文分组会得到相同的密文分组，\n容易泄露数据的模式。"),
        MarkdownQA(21, "CTR 模式需要填充吗？", "<thinking>CTR 把分组密码当作流密码使用。</thinking>不需要。"),
    ]


def test_numbered_list():
    records, problems = parse_fixture("numbered_list.md")
    assert problems == []
    assert records == [
        MarkdownQA(5, "什么是SM4？", "SM4 是我国发布的分组密码标准，\n分组长度和密钥长度都是 128 位。"),
        MarkdownQA(9, "SM4 有多少轮？", "<think>每轮使用一个轮密钥。</think>32 轮。"),
        MarkdownQA(12, "如何用 Python 调用 SM4？",
                   "可以使用 gmssl 库：\n\n```python\nfrom gmssl.sm4 import CryptSM4\n1. 这不是新的问题\n```"),
    ]


def test_question_headings():
    records, problems = parse_fixture("question_headings.md")
    assert problems == []
    assert records == [
        MarkdownQA(5, "什么是分组密码？", "分组密码把明文分成固定长度的分组，逐组加密。\n\n### 常见算法\n\n1. AES\n2. SM4"),
        MarkdownQA(14, "AES 的分组长度是多少?",
                   "<think>\nAES 的分组固定为 128 位。\n## 这一行在思考里，不是标题\n</think>\n128 位。"),
        MarkdownQA(22, "CBC 模式为什么需要 IV？", "为了让相同的明文得到不同的密文。"),
    ]


def test_mixed_labels_with_system_prompt():
    records, problems = parse_fixture("mixed_labels.md")
    assert problems == []
    system = "你是一名密码学助教，回答要简洁。"
    assert records == [
        MarkdownQA(7, "什么是对称加密？", "加密和解密使用同一个密钥。\n\n### 例子\n\nAES、SM4。", system=system),
        MarkdownQA(19, "什么是非对称加密？", "使用公钥加密、私钥解密。", system=system),
        MarkdownQA(22, "RSA 基于什么数学难题？", "大整数分解。", system=system),
        MarkdownQA(24, "ECC 的优势是什么？", "同等安全强度下，\nECC 的密钥更短。",
                   reasoning="与 RSA 比较密钥长度。", system=system),
    ]


# --- malformed files ----------------------------------------------------------------------------


def test_question_without_answer_at_end():
    records, problems = parse_fixture("question_without_answer.md")
    assert records == [MarkdownQA(1, "什么是哈希函数？", "把任意长度的输入映射成固定长度输出的函数。")]
    assert problems == [MarkdownProblem(4, NO_ANSWER)]


def test_answer_without_question():
    records, problems = parse_fixture("answer_without_question.md")
    assert records == [MarkdownQA(5, "什么是 MAC？", "消息认证码。")]
    assert problems == [MarkdownProblem(3, NO_QUESTION)]


def test_prose_without_layout():
    records, problems = parse_fixture("prose_only.md")
    assert records == []
    assert [p.line for p in problems] == [1]
    assert problems[0].reason.startswith("no Q&A layout found")


@pytest.mark.parametrize("text", ["", "\n\n", "  \n\t\n"])
def test_empty_file(text):
    assert parse_fixture("empty.md") == ([], [])
    assert parse_markdown_qa(text) == ([], [])


# --- label recognition --------------------------------------------------------------------------


@pytest.mark.parametrize("question_line, answer_line", [
    ("Q: 问题文本", "A: 答案文本"),
    ("q：问题文本", "a ： 答案文本"),
    ("Question 1: 问题文本", "Answer 1: 答案文本"),
    ("问：问题文本", "答：答案文本"),
    ("问题 2、问题文本", "解答：答案文本"),
    ("题目：问题文本", "回答：答案文本"),
    ("**Q:** 问题文本", "**A:** 答案文本"),
    ("**问题**：问题文本", "**答案：** 答案文本"),
    ("- 问：问题文本", "- 答：答案文本"),
    ("问︰问题文本", "答﹕答案文本"),  # the colons of Hong Kong and Taiwan input methods
])
def test_label_line_forms(question_line, answer_line):
    assert parse_clean(f"{question_line}\n{answer_line}\n") == [MarkdownQA(1, "问题文本", "答案文本")]


@pytest.mark.parametrize("heading", ["## 问题", "# Q", "###### 问题一", "## **问题 3**", "## Question 12："])
def test_label_heading_forms(heading):
    assert parse_clean(f"{heading}\n问题文本\n\n## 答案\n答案文本\n") == [MarkdownQA(1, "问题文本", "答案文本")]


def test_lookalikes_are_not_labels():
    text = ("# 问题\n问题文本\n# 答案\n第一行\nQuantum: 不是标签\n## A brief history\n**答案**取决于情况。\n"
            "**问题很多**。\nA. 选项\n")
    assert parse_clean(text) == [MarkdownQA(
        1, "问题文本", "第一行\nQuantum: 不是标签\n## A brief history\n**答案**取决于情况。\n**问题很多**。\nA. 选项")]


def test_plain_reasoning_and_system_lines_inside_an_answer_stay_text():
    text = "问：问题文本\n答：第一步。\n思考：这只是答案里的一行。\n系统：Ubuntu 22.04\nSystem: Linux\n"
    assert parse_clean(text) == [MarkdownQA(
        1, "问题文本", "第一步。\n思考：这只是答案里的一行。\n系统：Ubuntu 22.04\nSystem: Linux")]


def test_label_heading_with_question_text_and_no_answer_label():
    text = "### Q1: 什么是SM4？\nSM4 是分组密码。\n\n### Q2: 什么是AES？\n\n### A2\nAES 也是。\n"
    assert parse_clean(text) == [
        MarkdownQA(1, "什么是SM4？", "SM4 是分组密码。"),
        MarkdownQA(4, "什么是AES？", "AES 也是。"),
    ]


def test_label_line_section_keeps_deeper_headings_of_its_heading_section():
    text = "## 问题\n问题文本\n答：第一段\n### 步骤\n第二段\n## 其他\n"
    records, problems = parse_markdown_qa(text)
    assert records == [MarkdownQA(1, "问题文本", "第一段\n### 步骤\n第二段")]
    assert problems == []


# --- fences, <think> blocks, front matter, line endings ----------------------------------------


def test_think_block_content_is_never_structure():
    text = "问：问题文本\n答：<think>\n问题：用户问的是什么\n---\n## 分析\n</think>\n结论。\n"
    assert parse_clean(text) == [MarkdownQA(1, "问题文本", "<think>\n问题：用户问的是什么\n---\n## 分析\n</think>\n结论。")]


def test_unclosed_think_protects_nothing():
    text = "问：X？\n答：<think>没有关闭\n问：Y？\n答：y\n"
    assert parse_clean(text) == [MarkdownQA(1, "X？", "<think>没有关闭"), MarkdownQA(3, "Y？", "y")]


def test_unclosed_fence_is_reported():
    records, problems = parse_markdown_qa("问：X？\n答：\n~~~\n问：Y？\n答：y\n")
    assert records == [MarkdownQA(1, "X？", "~~~\n问：Y？\n答：y")]
    assert [p.line for p in problems] == [3]
    assert "never closed" in problems[0].reason


def test_front_matter_is_ignored_text_before_the_first_question_with_crlf_and_bom():
    text = "\ufeff---\r\ntitle: 笔记\r\nsystem: 不是系统提示\r\n---\r\n\r\nQ: a?\r\nA: b\r\n"
    assert parse_clean(text) == [MarkdownQA(6, "a?", "b")]


def test_rules_around_records_lose_nothing():
    text = "---\n问：X？\n答：x\n---\n问：Y？\n答：y\n---\n"
    assert parse_clean(text) == [MarkdownQA(2, "X？", "x"), MarkdownQA(5, "Y？", "y")]


# --- pairing rules ------------------------------------------------------------------------------


def test_system_prompt_applies_until_the_next_one():
    text = ("系统提示：你是助教。\n问：A？\n答：a\n问：B？\n答：b\n"
            "**系统**\n\n## 问题\nC？\n## 系统\n只给 C。\n## 答案\nc\n")
    assert parse_clean(text) == [
        MarkdownQA(2, "A？", "a", system="你是助教。"),
        MarkdownQA(4, "B？", "b", system="你是助教。"),
        MarkdownQA(8, "C？", "c", system="只给 C。"),
    ]


def test_system_prompt_with_no_question_after_it():
    records, problems = parse_markdown_qa("问：A？\n答：a\n## 系统\n多余的系统提示\n")
    assert records == [MarkdownQA(1, "A？", "a")]
    assert [p.line for p in problems] == [3]
    assert problems[0].reason.startswith("system prompt with no question")


def test_reasoning_after_answer_attaches_and_a_second_one_is_reported():
    records, problems = parse_markdown_qa("## 问题\nX？\n## 答案\nx\n## 思考\nr\n## 推理\nr2\n")
    assert records == [MarkdownQA(1, "X？", "x", reasoning="r")]
    assert [p.line for p in problems] == [7]
    assert "second reasoning" in problems[0].reason


def test_reasoning_with_no_question():
    records, problems = parse_markdown_qa("## 思考\nr\n问：X？\n答：x\n")
    assert records == [MarkdownQA(3, "X？", "x")]
    assert [p.line for p in problems] == [1]


def test_empty_answer_and_second_answer_are_reported():
    records, problems = parse_markdown_qa("问：X？\n答：\n\n问：Y？\n答：y\n答：又一个\n")
    assert records == [MarkdownQA(4, "Y？", "y")]
    assert [(p.line, p.reason.split(":")[0]) for p in problems] == [(2, "empty answer"), (6, "answer with no question")]


def test_text_cut_off_by_a_rule_is_reported():
    records, problems = parse_markdown_qa("问：X？\n答：x\n\n---\n\n补充说明。\n更多。\n\n问：Y？\n答：y\n")
    assert records == [MarkdownQA(1, "X？", "x"), MarkdownQA(9, "Y？", "y")]
    assert [p.line for p in problems] == [6]
    assert problems[0].reason.startswith("text outside any question or answer")


# --- implicit layouts ---------------------------------------------------------------------------


def test_question_heading_starts_a_question_at_any_level():
    assert parse_clean("# 标题\n## 什么是X？\nx\n### 为什么？\n因为。\n## 其他\n") == [
        MarkdownQA(2, "什么是X？", "x"),
        MarkdownQA(4, "为什么？", "因为。"),
    ]


def test_question_headings_ignored_when_the_file_has_labels():
    assert parse_clean("## 问题\nX？\n## 答案\n### 为什么？\n因为。\n") == [MarkdownQA(1, "X？", "### 为什么？\n因为。")]


def test_list_with_answer_labels_and_unindented_answers():
    text = "1、什么是X？\n答：x\n2、什么是Y？\nY 也是。\n1) 不是问题\n"
    assert parse_clean(text) == [MarkdownQA(1, "什么是X？", "x"), MarkdownQA(3, "什么是Y？", "Y 也是。\n1) 不是问题")]


def test_numbered_list_without_answers_is_prose():
    records, problems = parse_markdown_qa("# 步骤\n1. 下载\n2. 安装\n")
    assert records == []
    assert [p.line for p in problems] == [1]
    assert problems[0].reason.startswith("no Q&A layout found")


def test_heading_without_space_gets_a_hint():
    _, problems = parse_markdown_qa("##问题\n什么？\n##答案\n这个。\n")
    assert len(problems) == 1
    assert "space after '#'" in problems[0].reason


# --- traditional Chinese ------------------------------------------------------------------------


@functools.cache
def _opencc(config: str) -> opencc.OpenCC:
    return opencc.OpenCC(config)


def to_traditional(text: str, config: str = "s2t") -> str:
    """Simplified text in traditional characters (OpenCC, characters only: no vocabulary change)."""
    return _opencc(config).convert(text)


def traditional_records(records: list[MarkdownQA], config: str) -> list[MarkdownQA]:
    """What the traditional twin of a file must give: the same records, their text converted."""
    def convert(value):
        return to_traditional(value, config) if isinstance(value, str) else value
    return [dataclasses.replace(r, **{f.name: convert(getattr(r, f.name)) for f in dataclasses.fields(r)})
            for r in records]


@pytest.mark.parametrize("config", ["s2t", "s2tw", "s2hk"])
@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.md")))
def test_traditional_twin_of_every_fixture_gives_the_same_records(fixture, config):
    simplified = (FIXTURES / fixture).read_text(encoding="utf-8")
    records, problems = parse_markdown_qa(simplified)
    assert parse_markdown_qa(to_traditional(simplified, config)) == (traditional_records(records, config), problems)


def test_traditional_label_lines_from_the_bug_report():
    text = "問：什麼是金鑰？\n答：用來加密的秘密值。\n\n問題: 什麼是雜湊？\n答案: 單向函數。\n"
    assert parse_clean(text) == [MarkdownQA(1, "什麼是金鑰？", "用來加密的秘密值。"),
                                 MarkdownQA(4, "什麼是雜湊？", "單向函數。")]


# Every shape a label can take; {label} is the label under test, the other sections use plain labels.
LABEL_SHAPES = {
    "line, full-width colon": "{label}：文本一",
    "line, ASCII colon": "{label}: 文本一",
    "line, numbered": "{label} 2、文本一",
    "heading": "## {label}\n文本一",
    "numbered heading": "### {label}三：文本一",
    "bold alone": "**{label}**\n\n文本一",
    "bold, colon after": "**{label}**：文本一",
    "bold, colon inside": "**{label}：** 文本一",
    "numbered list item": "1. {label}：文本一",
    "bullet": "- {label}：文本一",
}
# Where a section of each kind goes in a file; {section} is one of LABEL_SHAPES.
KIND_CONTEXT = {
    "question": "{section}\n答：答案",
    "answer": "问：问题\n{section}",
    "reasoning": "问：问题\n{section}\n答：答案",
    "system": "{section}\n问：问题\n答：答案",
}
CHINESE_LABELS = [(kind, name) for kind, names in LABELS.items() for name in names if not name.isascii()]


@pytest.mark.parametrize("shape", LABEL_SHAPES)
@pytest.mark.parametrize("kind, label", CHINESE_LABELS)
def test_every_chinese_label_is_also_recognised_in_traditional_characters(kind, label, shape):
    def parse(name):
        return parse_markdown_qa(KIND_CONTEXT[kind].format(section=LABEL_SHAPES[shape].format(label=name)))

    simplified = parse(label)
    for config in ("s2t", "s2tw", "s2hk"):
        assert parse(to_traditional(label, config)) == simplified, to_traditional(label, config)
    if kind != "system" or label != "系统" or not shape.startswith(("line", "numbered list", "bullet")):
        # The label is one (a plain `系统：` line never is): make sure the comparison above meant something.
        assert simplified[1] == [] and len(simplified[0]) == 1


def test_traditional_labels_mixed_with_simplified_characters():
    # Typed with two input methods: 問题, 系統提示词.
    text = "系統提示词：你是助教。\n問题：X？\n思考過程：先想。\n答：x\n"
    assert parse_clean(text) == [MarkdownQA(2, "X？", "x", reasoning="先想。", system="你是助教。")]
