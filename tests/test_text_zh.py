"""Chinese text cleaning, duplicate keys and the cryptography term dictionary (real files, no mocks)."""

import multiprocessing
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from qwen_daemon.train.text_zh import (
    CATEGORIES,
    DEFAULT_TERMS_PATH,
    TermDictionaryError,
    dedup_key,
    load_terms,
    normalize_text,
)

REPO = Path(__file__).resolve().parents[1]
TERMS = REPO / "data" / "crypto_terms.tsv"
HEADER = "name\tcategory\tenglish\taliases\n"


@pytest.fixture(scope="module")
def terms():
    return load_terms(TERMS)


# --- normalize_text ------------------------------------------------------------------------------

@pytest.mark.parametrize("traditional, expected", [
    # default tw2sp: characters and Taiwan vocabulary to mainland usage
    ("區塊加密演算法", "区块加密算法"),
    ("數位簽章使用雜湊函數", "数字签章使用哈希函数"),
    ("資訊安全與金鑰管理", "信息安全与密钥管理"),
    ("橢圓曲線密碼學", "椭圆曲线密码学"),
    ("這個問題很難嗎？", "这个问题很难吗？"),
])
def test_traditional_to_simplified(traditional, expected):
    assert normalize_text(traditional) == expected


def test_simplified_text_is_never_rewritten_as_taiwan_vocabulary():
    # tw2sp on its own would turn the mainland term 序列密码 (stream cipher) into 串行密码.
    assert normalize_text("分组密码和序列密码") == "分组密码和序列密码"


def test_character_only_conversion_on_request():
    assert normalize_text("資訊安全與金鑰管理", to_simplified="t2s") == "资讯安全与金钥管理"


def test_to_simplified_false_keeps_traditional():
    assert normalize_text("區塊加密演算法", to_simplified=False) == "區塊加密演算法"
    # the other steps still run
    assert normalize_text("區塊  加密ＡＥＳ", to_simplified=False) == "區塊加密AES"


def test_full_width_letters_digits_and_space_to_half_width():
    assert normalize_text("ＡＥＳ－２５６\u3000ｋｅｙ") == "AES-256 key"
    assert normalize_text("TLS１．３") == "TLS1.3"


def test_chinese_punctuation_stays_full_width():
    text = "什么是分组密码？它（例如 AES）很常见：对称、快速；安全！"
    assert normalize_text(text) == text


def test_punctuation_variants_unified():
    assert normalize_text("「分组密码」和『序列密码』") == "“分组密码”和‘序列密码’"
    assert normalize_text("一﹐二｡三⋯") == "一，二。三…"


def test_ascii_punctuation_in_english_and_code_untouched():
    text = 'Use `os.urandom(16)`, then key = b"..."; done! (see RFC 5116: AEAD)'
    assert normalize_text(text) == text


def test_whitespace_cleanup():
    assert normalize_text("  分组 密码\t和  序列   密码  \n") == "分组密码和序列密码"
    # ASCII next to Chinese keeps its space; runs inside English collapse to one space
    assert normalize_text("SM4 算法  与 AES   加密") == "SM4 算法与 AES 加密"
    assert normalize_text("a\r\nb\rc\u200bd\ufeffe\u00a0f") == "a\nb\ncde f"
    assert normalize_text("段一\n\n\n\n\n段二") == "段一\n\n段二"


def test_reasoning_tags_and_markdown_untouched():
    text = ("<think>\n用户问 CBC 模式。\n</think>\n\n<thinking>\n再想想\n</thinking>\n\n"
            "# 标题\n\n- 列表\n  - 嵌套\n1. 第一步\n2. 第二步")
    assert normalize_text(text) == text


def test_fenced_code_keeps_alignment():
    text = "说明 如下\n\n```python\nkey  = os.urandom(32)   # 密钥 32 字节\n\n\n\niv   = b''\n```\n结 束"
    assert normalize_text(text) == (
        "说明如下\n\n```python\nkey  = os.urandom(32)   # 密钥 32 字节\n\n\n\niv   = b''\n```\n结束")


def test_normalize_is_idempotent():
    text = "區塊加密  演算法「ＡＥＳ」\n\n\n\n<think>x</think>"
    once = normalize_text(text)
    assert normalize_text(once) == once


# --- dedup_key -----------------------------------------------------------------------------------

def test_dedup_key_equal_for_variants():
    variants = [
        "什么是分组密码？",
        "什麼是分組密碼?",
        "什么是 分组密码 ！",
        "「什么是分组密码」",
    ]
    assert len({dedup_key(v) for v in variants}) == 1
    assert dedup_key("What is AES-GCM?") == dedup_key("what is ＡＥＳ ＧＣＭ")


def test_dedup_key_differs_for_different_questions():
    assert dedup_key("什么是分组密码？") != dedup_key("什么是序列密码？")
    assert dedup_key("SM2 和 SM3 的区别") != dedup_key("SM2 和 SM4 的区别")


# --- the bundled dictionary ----------------------------------------------------------------------

def test_bundled_dictionary_contents(terms):
    assert DEFAULT_TERMS_PATH == TERMS
    assert len(terms.terms) >= 150
    assert set(Counter(t.category for t in terms.terms)) == set(CATEGORIES)
    names = {t.name for t in terms.terms}
    assert {"SM2", "SM3", "SM4", "SM9", "祖冲之算法", "AES", "TLS 1.3", "ML-KEM"} <= names


def test_segment_keeps_terms_whole(terms):
    tokens = terms.segment("祖冲之算法是一种序列密码，而分组密码如 SM4 使用 S盒 和 Feistel结构。")
    for word in ("祖冲之算法", "序列密码", "分组密码", "SM4", "S盒", "Feistel结构"):
        assert word in tokens
    assert " " not in tokens
    # traditional input is normalised first
    assert "分组密码" in terms.segment("分組密碼")


def test_segment_leaves_default_jieba_alone(terms):
    import jieba

    terms.segment("分组密码")
    assert terms._tokenizer is not jieba.dt
    assert "祖冲之算法" not in jieba.dt.FREQ


def test_count_terms_exact(terms):
    text = ("SM2 签名配合 SM3 杂凑函数；SM23 不是算法。TLS 1.3 取代了 TLS 1.2，TLS 仍很常见。"
            "CA 签发证书，CBC 和 CAST-128 与 CA 无关。3DES 比 DES 慢。散列函数也叫 hash function。"
            "Block ciphers such as AES; 區塊加密。")
    counts = terms.count_terms(text)
    assert counts == Counter({
        "SM2": 1, "SM3": 1, "哈希函数": 3, "TLS 1.3": 1, "TLS 1.2": 1, "TLS": 1, "CA": 2,
        "证书": 1, "CBC": 1, "CAST-128": 1, "3DES": 1, "DES": 1, "分组密码": 2, "AES": 1,
    })


def test_every_surface_form_counts_once_for_its_term(terms):
    for term in terms.terms:
        for form in (term.name, term.english, *term.aliases):
            for text in (form, f"中{form}文", f"x {form}, y"):
                assert terms.count_terms(text) == Counter({term.name: 1}), (term.name, text)


def test_count_terms_plural_only_for_english_words(terms):
    assert terms.count_terms("block ciphers and public keys") == Counter({"分组密码": 1, "公钥": 1})
    assert terms.count_terms("CAS IKES") == Counter()  # acronyms take no plural "s"


def test_count_terms_aliases_and_case(terms):
    counts = terms.count_terms("Kyber 即 ML-KEM；流密码即序列密码；iv 即初始化向量；ＨＭＡＣ与hmac。")
    assert counts == Counter({"ML-KEM": 2, "序列密码": 2, "初始化向量": 2, "HMAC": 2})


def test_category_counts_and_dominant_category(terms):
    text = "AES 和 SM4 都是分组密码，常用 GCM 模式。"
    assert terms.category_counts(text) == Counter({"block_cipher": 3, "mode": 1})
    assert terms.dominant_category(text) == "block_cipher"
    # a tie goes to the alphabetically first category
    assert terms.dominant_category("CBC 与 SHA-256") == "hash"
    assert terms.dominant_category("今天天气很好") is None


# --- load_terms errors ---------------------------------------------------------------------------

def _write(tmp_path, body, name="terms.tsv"):
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def _assert_error(path, line, *fragments):
    with pytest.raises(TermDictionaryError) as info:
        load_terms(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_load_terms_missing_file(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(TermDictionaryError, match="not found") as info:
        load_terms(missing)
    assert str(missing) in str(info.value)


def test_load_terms_wrong_header(tmp_path):
    path = _write(tmp_path, "# comment\nname\tcategory\tenglish\n")
    _assert_error(path, 2, "header")


def test_load_terms_wrong_column_count(tmp_path):
    path = _write(tmp_path, HEADER + "AES\tblock_cipher\tAdvanced Encryption Standard\t\nDES\tblock_cipher\n")
    _assert_error(path, 3, "4 tab-separated columns", "found 2")


def test_load_terms_unknown_category(tmp_path):
    path = _write(tmp_path, HEADER + "AES\tblockcipher\tAdvanced Encryption Standard\t\n")
    _assert_error(path, 2, "'blockcipher'", ", ".join(CATEGORIES))


def test_load_terms_empty_name(tmp_path):
    path = _write(tmp_path, HEADER + "\tblock_cipher\tAdvanced Encryption Standard\t\n")
    _assert_error(path, 2, "empty name")


def test_load_terms_duplicates(tmp_path):
    path = _write(tmp_path, HEADER + "AES\tblock_cipher\tAES cipher\t\n\nAES\tmode\tanother\t\n",
                  "dup_name.tsv")
    _assert_error(path, 4, "'AES'", "line 2")
    path = _write(tmp_path, HEADER + "分组密码\tblock_cipher\tblock cipher\t块密码\n"
                  "序列密码\tstream_cipher\tstream cipher\t流密码|塊密碼\n", "dup_alias.tsv")
    _assert_error(path, 3, "'塊密碼'", "'分组密码' on line 2")


def test_load_terms_cache_and_reload(tmp_path):
    path = _write(tmp_path, HEADER + "AES\tblock_cipher\tAdvanced Encryption Standard\t\n")
    first = load_terms(path)
    assert load_terms(str(path)) is first
    _write(tmp_path, HEADER + "AES\tblock_cipher\tAdvanced Encryption Standard\tRijndael\n")
    second = load_terms(path)
    assert second is not first
    assert second.count_terms("Rijndael") == Counter({"AES": 1})


# --- processes -----------------------------------------------------------------------------------

def test_pickle_round_trip(terms, tmp_path):
    assert pickle.loads(pickle.dumps(terms)) is terms  # rebuilt through this process's cache
    path = _write(tmp_path, HEADER + "AES\tblock_cipher\tAdvanced Encryption Standard\t\n")
    blob = pickle.dumps(load_terms(path))
    _write(tmp_path, HEADER + "DES\tblock_cipher\tData Encryption Standard\t\n")
    with pytest.raises(TermDictionaryError, match="changed on disk"):
        pickle.loads(blob)


def test_works_in_spawned_workers(terms):
    texts = ["SM4 是分组密码", "TLS 1.3 使用 ECDHE 实现前向安全", "祖冲之算法"]
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        counted = pool.map(terms.count_terms, texts)
        segmented = pool.map(terms.segment, texts)
    assert counted == [terms.count_terms(t) for t in texts]
    assert segmented == [terms.segment(t) for t in texts]


def test_jieba_is_quiet():
    code = ("from qwen_daemon.train.text_zh import load_terms; "
            f"print(load_terms({str(TERMS)!r}).segment('分组密码'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            timeout=60, check=True)
    assert result.stdout.strip() == "['分组密码']"
    assert "prefix dict" not in result.stderr and "Loading model" not in result.stderr, result.stderr
