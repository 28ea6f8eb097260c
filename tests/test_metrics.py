"""Scoring answers against references (metrics.py): values worked out by hand on Chinese strings."""

import random
from collections import Counter
from pathlib import Path

import pytest
from rouge_score import rouge_scorer, tokenizers

from qwen_daemon.train import readers
from qwen_daemon.train.metrics import (
    ReasoningFormat,
    char_tokens,
    reference_answer,
    rouge_l_chars,
    rouge_l_words,
    score_record,
    split_reasoning,
    summarise,
    term_overlap,
    weighted_rouge_l,
    word_tokens,
)
from qwen_daemon.train.text_zh import DEFAULT_TERMS_PATH, load_terms

TERMS_TSV = """\
name\tcategory\tenglish\taliases
分组密码\tblock_cipher\tblock cipher\t块密码
AES\tblock_cipher\tAdvanced Encryption Standard\t高级加密标准
DES\tblock_cipher\tData Encryption Standard\t
SM4\tblock_cipher\tSM4 block cipher\t
工作模式\tmode\tmode of operation\t
哈希函数\thash\thash function\t散列函数|杂凑函数
"""


@pytest.fixture(scope="module")
def terms(tmp_path_factory):
    """Six terms of our own, so that no test depends on the bundled dictionary's content."""
    path = tmp_path_factory.mktemp("terms") / "terms.tsv"
    path.write_text(TERMS_TSV, encoding="utf-8")
    return load_terms(path)


# --- tokens and plain ROUGE-L ---------------------------------------------------------------------

def test_default_rouge_tokenizer_sees_no_chinese_hence_our_tokenizers():
    text = "分组密码把明文分成固定长度的分组。"
    default = rouge_scorer.RougeScorer(["rougeL"])
    # rouge-score keeps only [a-z0-9]: no tokens at all, so an answer scores 0 against itself.
    assert tokenizers.DefaultTokenizer().tokenize(text) == []
    assert default.score(text, text)["rougeL"].fmeasure == 0
    assert rouge_l_chars(text, text).fmeasure == 1


def test_character_tokens():
    # one token per Chinese character, one per ASCII run (lower-cased), punctuation and spaces dropped
    assert char_tokens("AES-128 是分组密码。") == ["aes", "128", "是", "分", "组", "密", "码"]
    # on English text exactly rouge-score's own tokenizer
    english = "AES-128 in CBC mode, with a 16-byte IV."
    assert char_tokens(english) == tokenizers.DefaultTokenizer().tokenize(english)


def test_character_rouge_l_on_a_small_pair():
    # reference tokens: aes 是 一 种 分 组 密 码 (8); candidate: aes 是 分 组 密 码 (6)
    # LCS = the whole candidate = 6: P = 6/6 = 1, R = 6/8 = 3/4, F = 2*1*(3/4) / (7/4) = 6/7
    score = rouge_l_chars("AES是一种分组密码。", "AES 是分组密码")
    assert score.precision == 1
    assert score.recall == pytest.approx(3 / 4)
    assert score.fmeasure == pytest.approx(6 / 7)


def test_character_and_word_rouge_l_differ(terms):
    reference, candidate = "分组密码的安全性", "分组的密码安全性"
    # characters: 分组密码的安全性 (8) and 分组的密码安全性 (8); LCS 分组密码安全性 = 7 -> F = 7/8
    assert rouge_l_chars(reference, candidate).fmeasure == pytest.approx(7 / 8)
    # words: the term stays one token in the reference and is not written in the candidate
    assert word_tokens(reference, terms) == ["分组密码", "的", "安全性"]
    assert word_tokens(candidate, terms) == ["分组", "的", "密码", "安全性"]
    # LCS 的 安全性 = 2: P = 2/4, R = 2/3, F = 2*(1/2)*(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert rouge_l_words(reference, candidate, terms).fmeasure == pytest.approx(4 / 7)


def test_word_tokens_drop_punctuation_and_lower_case(terms):
    assert word_tokens("ＡＥＳ，是分组密码！", terms) == ["aes", "是", "分组密码"]


# --- term-weighted ROUGE-L ------------------------------------------------------------------------

def test_term_weighting_changes_which_candidate_ranks_higher(terms):
    reference = "SM4是一种分组密码"   # sm4 是 一 种 分 组 密 码; weights 3 1 1 1 3 3 3 3 = 18
    prose = "它是一种密码"             # 它 是 一 种 密 码, no term: weights all 1 = 6
    term = "分组密码"                  # 分 组 密 码, one term: weights 3 3 3 3 = 12
    # plain: prose LCS 是一种密码 = 5: P = 5/6, R = 5/8, F = 2*(5/6)*(5/8) / (5/6 + 5/8) = 5/7
    #        term  LCS 分组密码 = 4:   P = 1,   R = 4/8, F = 2*1*(1/2) / (3/2) = 2/3
    assert rouge_l_chars(reference, prose).fmeasure == pytest.approx(5 / 7)
    assert rouge_l_chars(reference, term).fmeasure == pytest.approx(2 / 3)
    # weighted: prose matches 是一种 (1+1+1) and 密码, a term only in the reference (min(3, 1) = 1
    #   each): M = 5, P = 5/6, R = 5/18, F = 2*(5/6)*(5/18) / (5/6 + 5/18) = 5/12
    # term: M = 4*3 = 12, P = 12/12 = 1, R = 12/18 = 2/3, F = 2*1*(2/3) / (5/3) = 4/5
    prose_score = weighted_rouge_l(reference, prose, terms)
    term_score = weighted_rouge_l(reference, term, terms)
    assert prose_score == pytest.approx((5 / 6, 5 / 18, 5 / 12))
    assert term_score == pytest.approx((1, 2 / 3, 4 / 5))
    assert term_score.fmeasure > prose_score.fmeasure  # and plain ROUGE-L ranked them the other way


def test_weighted_rouge_l_of_identical_texts_is_one_and_weight_one_is_plain_rouge(terms):
    text = "SM4是一种分组密码，工作模式另算。"
    assert weighted_rouge_l(text, text, terms) == pytest.approx((1, 1, 1))
    reference, candidate = "分组密码的工作模式", "工作模式和分组的密码"
    assert weighted_rouge_l(reference, candidate, terms, term_weight=1) == pytest.approx(
        rouge_l_chars(reference, candidate))


def _weighted_lcs_by_the_book(ref, ref_w, cand, cand_w):
    """The full-table dynamic programme, the definition the fast version must agree with."""
    table = [[0] * (len(cand) + 1) for _ in range(len(ref) + 1)]
    for i in range(1, len(ref) + 1):
        for j in range(1, len(cand) + 1):
            table[i][j] = max(table[i - 1][j], table[i][j - 1])
            if ref[i - 1] == cand[j - 1]:
                table[i][j] = max(table[i][j], table[i - 1][j - 1] + min(ref_w[i - 1], cand_w[j - 1]))
    return table[-1][-1]


def test_fast_weighted_lcs_agrees_with_the_full_table():
    from qwen_daemon.train.metrics import _weighted_lcs

    rng = random.Random(0)
    for _ in range(200):
        ref = [rng.choice("分组密码模式") for _ in range(rng.randint(0, 30))]
        cand = [rng.choice("分组密码模式") for _ in range(rng.randint(0, 30))]
        ref_w = [rng.choice((1, 3)) for _ in ref]
        cand_w = [rng.choice((1, 3)) for _ in cand]
        assert _weighted_lcs(ref, ref_w, cand, cand_w) == _weighted_lcs_by_the_book(ref, ref_w, cand, cand_w)
        # with unit weights it is the LCS length rouge-score computes
        assert _weighted_lcs(ref, [1] * len(ref), cand, [1] * len(cand)) == \
            rouge_scorer._lcs_table(ref, cand)[-1][-1]


# --- terms ----------------------------------------------------------------------------------------

def test_term_recall_and_precision_count_each_term_once(terms):
    reference = "AES 和 DES，AES 更安全"
    candidate = "高级加密标准（AES）就是AES，SM4也是"
    assert terms.count_terms(reference) == Counter({"AES": 2, "DES": 1})
    assert terms.count_terms(candidate) == Counter({"AES": 3, "SM4": 1})  # the alias counts as AES
    # sets: reference {AES, DES}, candidate {AES, SM4}; common {AES}
    # recall = 1/2, precision = 1/2 (as multisets recall would be min(2, 3) / 3 = 2/3)
    assert term_overlap(reference, candidate, terms) == (0.5, 0.5)


def test_term_overlap_undefined_without_terms(terms):
    assert term_overlap("没有术语的回答", "AES", terms) == (None, 0.0)
    assert term_overlap("AES", "没有术语", terms) == (0.0, None)


def test_find_terms_spans_index_the_normalised_text(terms):
    # normalised: "AES 和分组密码" (full-width to half-width, traditional to simplified, the space
    # between two Chinese characters removed)
    assert terms.find_terms("ＡＥＳ 和 分組密碼") == [("AES", 0, 3), ("分组密码", 5, 9)]


def test_find_terms_agrees_with_count_terms_on_the_bundled_answers():
    bundled = load_terms(DEFAULT_TERMS_PATH)
    data = Path(DEFAULT_TERMS_PATH).parent / "crypto_qa"
    answers = [c.answer for f in sorted(data.iterdir()) for c in readers.read_file(f)[0]]
    assert len(answers) > 100
    for answer in answers:
        assert Counter(name for name, _, _ in bundled.find_terms(answer)) == bundled.count_terms(answer)


# --- thinking and answer --------------------------------------------------------------------------

def _shape(well_formed=True, has_answer=True, stray_tags=0, truncated=False):
    return ReasoningFormat(well_formed, has_answer, stray_tags, truncated)


@pytest.mark.parametrize("generated, thinking, answer, shape", [
    # the usual: the prompt opened <think>, the model closes it and answers, then ends its turn
    ("先比较分组长度。\n</think>\n\nSM4 的分组长度为 128 比特。<|im_end|>",
     "先比较分组长度。", "SM4 的分组长度为 128 比特。", _shape()),
    ("<think>\n想一想\n</think>\n\n答案", "想一想", "答案", _shape()),
    ("<thinking>想一想</thinking>答案", "想一想", "答案", _shape()),
    ("<think>\n\n</think>\n\n答案", "", "答案", _shape()),  # empty thinking is still well formed
    # cut off by max_new_tokens: all thinking, no answer
    ("想了很久还没有想完", "想了很久还没有想完", "", _shape(False, False, 0, True)),
    ("<think>想了很久", "想了很久", "", _shape(False, False, 0, True)),
    # ended its turn inside the thinking: no answer, but not cut off
    ("想完了<|im_end|>", "想完了", "", _shape(False, False, 0, False)),
    ("想完了</think>\n\n<|im_end|>", "想完了", "", _shape(True, False, 0, False)),
    # stray tags: removed, their text kept, counted
    ("想<think>再想</think>答案", "想再想", "答案", _shape(False, True, 1, False)),
    ("想</think>答案一</think>答案二", "想", "答案一答案二", _shape(False, True, 1, False)),
    ("想<think>再想</think>答<|im_start|>案</think>", "想再想", "答案", _shape(False, True, 3, False)),
    # end-of-turn and padding at the end are the normal stop; text after the end is dropped
    ("想</think>答案<|im_end|><|endoftext|><|endoftext|>", "想", "答案", _shape()),
    ("想</think>答案<|im_end|>\n<|im_start|>user\n下一个问题", "想", "答案", _shape(False, True, 1, False)),
])
def test_split_reasoning(generated, thinking, answer, shape):
    assert split_reasoning(generated) == (thinking, answer, shape)


@pytest.mark.parametrize("reference", [
    "答案是 128 比特。",
    "<thinking>\n推理过程\n</thinking>\n\n答案是 128 比特。",
    "<think>第一段</think><think>第二段<think>嵌套</think></think>\n答案是 128 比特。",
])
def test_reference_answer_drops_reasoning_blocks(reference):
    assert reference_answer(reference) == "答案是 128 比特。"


# --- score_record and summarise -------------------------------------------------------------------

def test_score_record_scores_the_answer_not_the_thinking(terms):
    reference = "<thinking>先回忆标准</thinking>\n\nSM4是一种分组密码"
    perfect = score_record(reference, "回忆标准</think>\n\nSM4是一种分组密码<|im_end|>", terms)
    assert perfect == {
        "rouge_l_chars": 1.0, "rouge_l_words": 1.0, "rouge_l_weighted": 1.0,
        "term_recall": 1.0, "term_precision": 1.0,
        "thinking_chars": 4, "answer_chars": 10,
        "well_formed": True, "has_answer": True, "stray_tags": 0, "truncated": False,
    }
    # the right text, but only in a thinking that never ends: no answer, nothing scores
    cut_off = score_record(reference, "SM4是一种分组密码", terms)
    assert cut_off["rouge_l_chars"] == cut_off["rouge_l_weighted"] == 0
    assert cut_off["term_recall"] == 0 and cut_off["term_precision"] is None
    assert cut_off["truncated"] and cut_off["thinking_chars"] == 10 and cut_off["answer_chars"] == 0


def test_empty_texts_score_zero(terms):
    for reference, candidate in [("", ""), ("", "分组密码"), ("分组密码", ""), ("。！", "，")]:
        assert rouge_l_chars(reference, candidate).fmeasure == 0
        assert rouge_l_words(reference, candidate, terms).fmeasure == 0
        assert weighted_rouge_l(reference, candidate, terms).fmeasure == 0
    record = score_record("", "", terms)
    assert record["rouge_l_weighted"] == 0 and record["term_recall"] is None
    assert record["truncated"] and record["answer_chars"] == 0


def test_traditional_and_full_width_score_like_simplified_half_width(terms):
    reference = "AES是分组密码，哈希函数另当别论"
    traditional = "想</think>ＡＥＳ是分組密碼，雜湊函數另當別論"  # 雜湊函數: Taiwan's word for 哈希函数
    simplified = "想</think>AES是分组密码，哈希函数另当别论"
    assert score_record(reference, traditional, terms) == score_record(reference, simplified, terms)
    assert score_record(reference, traditional, terms)["rouge_l_weighted"] == 1.0
    # the scoring functions normalise by themselves too
    answer = split_reasoning(traditional)[1]
    assert rouge_l_chars(reference, answer).fmeasure == 1
    assert rouge_l_words(reference, answer, terms).fmeasure == 1


def test_summarise_gives_base_and_tuned_side_by_side():
    def scores(rouge, recall, truncated):
        return {"rouge_l_chars": rouge, "term_recall": recall, "truncated": truncated}

    records = [
        {"category": "对称密码", "base": scores(0.2, 0.5, True), "tuned": scores(0.6, 1.0, False),
         "question": "不是指标", "generated": {"base": "…", "tuned": "…"}},
        {"category": "对称密码", "base": scores(0.4, None, False), "tuned": scores(0.8, None, False)},
        {"category": "哈希", "base": scores(0.3, 0.0, False), "tuned": scores(0.3, 0.5, False)},
    ]
    summary = summarise(records)
    # overall rouge: base (0.2 + 0.4 + 0.3) / 3 = 0.3, tuned (0.6 + 0.8 + 0.3) / 3 = 1.7/3
    # recall leaves out the None: base (0.5 + 0.0) / 2, tuned (1.0 + 0.5) / 2; truncated is a rate
    overall = summary["overall"]
    assert overall["n"] == 3 and set(overall) == {"n", "base", "tuned"}  # no "question", no "generated"
    assert overall["base"] == pytest.approx({"rouge_l_chars": 0.3, "term_recall": 0.25, "truncated": 1 / 3})
    assert overall["tuned"] == pytest.approx({"rouge_l_chars": 1.7 / 3, "term_recall": 0.75, "truncated": 0})
    assert list(summary["by_category"]) == ["哈希", "对称密码"]
    symmetric = summary["by_category"]["对称密码"]
    assert symmetric["n"] == 2
    assert symmetric["base"] == pytest.approx({"rouge_l_chars": 0.3, "term_recall": 0.5, "truncated": 0.5})
    assert symmetric["tuned"] == pytest.approx({"rouge_l_chars": 0.7, "term_recall": 1.0, "truncated": 0})


def test_summarise_mean_of_only_none_is_none_and_missing_fields_are_named():
    records = [{"category": "哈希", "base": {"term_recall": None}, "tuned": {"term_recall": None}}]
    assert summarise(records)["overall"]["tuned"] == {"term_recall": None}
    with pytest.raises(ValueError, match=r"record 1 has no 'tuned' field"):
        summarise([*records, {"category": "哈希", "base": {}}])
