"""Chinese text cleaning, duplicate keys and the cryptography term dictionary (real files, no mocks)."""

import multiprocessing
import pickle
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

import opencc
import pytest

from qwen_daemon.train.readers import read_file
from qwen_daemon.train.text_zh import (
    CATEGORIES,
    DEFAULT_TERMS_PATH,
    QUESTION_WEIGHT,
    VOCABULARY_PATH,
    TermDictionaryError,
    asks_for_traditional,
    dedup_key,
    has_traditional,
    load_terms,
    normalize_text,
    simplify_chinese,
)

REPO = Path(__file__).resolve().parents[1]
TERMS = REPO / "data" / "crypto_terms.tsv"
HEADER = "name\tcategory\tenglish\taliases\n"


@pytest.fixture(scope="module")
def terms():
    return load_terms(TERMS)


# --- normalize_text ------------------------------------------------------------------------------

@pytest.mark.parametrize("traditional, expected", [
    ("區塊加密演算法", "分组加密算法"),
    ("數位簽章使用雜湊函數", "数字签名使用哈希函数"),
    ("資訊安全與金鑰管理", "信息安全与密钥管理"),
    ("橢圓曲線密碼學", "椭圆曲线密码学"),
    ("這個問題很難嗎？", "这个问题很难吗？"),
])
def test_traditional_to_simplified(traditional, expected):
    assert normalize_text(traditional) == expected


def test_simplified_text_is_never_rewritten_as_taiwan_vocabulary():
    # tw2sp on its own would turn the mainland term 序列密码 (stream cipher) into 串行密码.
    assert normalize_text("分组密码和序列密码") == "分组密码和序列密码"
    # 程式 and 互斥或 are Taiwan words written alike in both scripts: a simplified text keeps them.
    assert normalize_text("方程式和程式") == "方程式和程式"


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


# --- traditional to simplified: Taiwan vocabulary, then characters --------------------------------

# Each Taiwan word in a phrase, and the phrases around the words that must not change.
@pytest.mark.parametrize("traditional, expected", [
    # OpenCC tw2sp converted phrases across word boundaries: 曲線上 -> 曲在线.
    ("橢圓曲線上的點", "椭圆曲线上的点"),
    ("數位簽章", "数字签名"),
    ("簽章者的私密金鑰", "签名者的私钥"),
    ("伺服器憑證", "服务器证书"),
    ("安全的亂數產生器", "安全的随机数生成器"),
    ("擬亂數", "伪随机数"),
    ("兩個值互斥或", "两个值异或"),
    ("256 位元的金鑰", "256 比特的密钥"),
    ("32 位元組", "32 字节"),
    ("逐位元互斥或", "按位异或"),
    ("應用程式", "应用程序"),
    ("程式碼", "代码"),
    ("區塊加密法", "分组密码"),
    ("公開金鑰基礎建設", "公钥基础设施"),
    ("訊息鑑別碼", "消息认证码"),
    ("從快取得到資料", "从缓存得到数据"),
    # guards: the Taiwan word inside an ordinary longer word
    ("群的單位元與反元素", "群的单位元与逆元"),
    ("橢圓曲線的方程式", "椭圆曲线的方程式"),
    ("兩位元首會面", "两位元首会面"),
    ("各位元旦快樂", "各位元旦快乐"),
    ("很快取得憑證", "很快取得证书"),
    ("這封包含附件", "这封包含附件"),
    ("事件互斥或獨立", "事件互斥或独立"),
    ("憑證明文件入場", "凭证明文件入场"),
    ("會計憑證", "会计凭证"),
    ("有限體上的運算", "有限域上的运算"),
    ("有限體積法", "有限体积法"),
    ("參考資料", "参考资料"),
    ("SM3 密碼雜湊算法", "SM3 密码杂凑算法"),
    # words that are not mapped: 數位 alone, 區塊鏈
    ("數位時代的區塊鏈", "数位时代的区块链"),
])
def test_taiwan_vocabulary_word_by_word(traditional, expected):
    assert simplify_chinese(traditional) == expected


def test_replacements_are_counted_and_guards_are_not():
    replaced = Counter()
    simplify_chinese("金鑰與金鑰，方程式與程式", replaced)
    assert replaced == {"金鑰->密钥": 2, "程式->程序": 1}


def test_a_stray_space_inside_a_word_does_not_hide_it():
    assert normalize_text("私密 金鑰") == "私钥"


def vocabulary_lines():
    """(line, taiwan, mainland) of the bundled vocabulary."""
    rows = []
    for n, line in enumerate(VOCABULARY_PATH.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.startswith("#") and not line.startswith("taiwan\t"):
            taiwan, mainland, *_ = line.split("\t")
            rows.append((n, taiwan, mainland))
    return rows


def test_vocabulary_file_is_consistent():
    rows = vocabulary_lines()
    t2s = opencc.OpenCC("t2s")
    words = {taiwan for _, taiwan, _ in rows}
    assert len(words) == len(rows) >= 100
    for n, taiwan, mainland in rows:
        assert not has_traditional(mainland), f"line {n}: {mainland!r} is not in simplified characters"
        if mainland == t2s.convert(taiwan):  # a guard must keep a shorter word of the file whole
            assert any(w != taiwan and w in taiwan for w in words), f"line {n}: guard {taiwan!r} guards nothing"


def texts_of(path):
    convs, problems = read_file(path)
    assert not problems
    for c in convs:
        yield from (t["content"] for t in c.prompt)
        yield from (c.reasoning or "", c.answer)


MAINLAND_FILES = sorted(p for p in (REPO / "data" / "crypto_qa").iterdir() if "traditional" not in p.name)
TRADITIONAL_FILES = sorted((REPO / "data" / "crypto_qa").glob("*traditional*"))
# Words of the vocabulary that mainland texts also use, with the same meaning: replacing them
# changes a word, not what it says (杂凑 and 哈希 are both mainland for "hash").
SYNONYMS_IN_MAINLAND_TEXT = {"雜湊->哈希", "使用者->用户", "用戶端->客户端"}


def test_bundled_simplified_data_is_left_exactly_as_written():
    for path in MAINLAND_FILES:
        for text in texts_of(path):
            assert normalize_text(text) == normalize_text(text, to_simplified=False)


@pytest.mark.parametrize("script", ["s2t", "s2tw", "s2hk"])
def test_no_false_hits_in_mainland_text_written_in_traditional_characters(script):
    """The bundled mainland texts in traditional characters: only the characters may change back.

    Any vocabulary word found there is a mainland phrase the vocabulary would rewrite, so a new
    word that shows up here needs a guard (or removal), or a place in SYNONYMS_IN_MAINLAND_TEXT.
    """
    to_traditional = opencc.OpenCC(script)
    replaced = Counter()
    for path in MAINLAND_FILES:
        for text in texts_of(path):
            simplify_chinese(to_traditional.convert(text), replaced)
    assert set(replaced) <= SYNONYMS_IN_MAINLAND_TEXT, replaced


def test_bundled_traditional_data_gets_mainland_vocabulary():
    replaced = Counter()
    converted = "\n".join(simplify_chinese(t, replaced) for path in TRADITIONAL_FILES for t in texts_of(path))
    for taiwan_word in ("金钥", "签章", "凭证", "乱数", "互斥或", "位元", "演算法", "杂凑", "资讯", "曲在线"):
        assert taiwan_word not in converted
    # What the vocabulary replaces in the bundled traditional files, for review when a word is added.
    assert set(replaced) == {
        "中繼資料->元数据", "串流加密法->序列密码", "亂數->随机数", "亂數產生器->随机数生成器", "互斥或->异或",
        "伺服器->服务器", "位元->比特", "位元組->字节", "作業系統->操作系统", "使用者->用户", "側通道->侧信道",
        "公開金鑰->公钥", "函式->函数", "區塊加密->分组加密", "區塊加密法->分组密码", "協定->协议", "字串->字符串",
        "實作->实现", "憑證->证书", "憑證機構->证书颁发机构", "搜尋->搜索", "支援->支持", "效能->性能",
        "數位簽章->数字签名", "晶片->芯片", "有限體->有限域", "模組->模块", "機率->概率", "欄位->字段",
        "演算法->算法", "用戶端->客户端", "登入->登录", "硬體->硬件", "磁碟->磁盘", "私密金鑰->私钥", "程式->程序",
        "程式碼->代码", "簽章->签名", "裝置->设备", "訊息->消息", "訊息鑑別碼->消息认证码", "記憶體->内存",
        "資料->数据", "資訊->信息", "身分鑑別->身份鉴别", "軟體->软件", "重送攻擊->重放攻击", "金鑰->密钥",
        "雜湊->哈希", "韌體->固件", "預設->默认",
    }


@pytest.mark.parametrize("text", [
    "請用繁體中文回答。",
    "你是一位密碼學專家，請以臺灣慣用的繁體中文精確回答。",
    "请用繁体中文回答",
    "回答時請使用正體中文",
    "以繁中回覆",
    "請把這段話翻譯成繁體字",
    "改用台灣用語",
    "輸出語言：繁體中文",
    "Please answer in Traditional Chinese.",
    "Translate into traditional chinese",
    "locale: zh-TW",
    "zh-Hant only",
])
def test_asks_for_traditional(text):
    assert asks_for_traditional(text)


@pytest.mark.parametrize("text", [
    "你是一名密码学专家。",
    "繁體字和簡體字有什麼不同？",
    "請用簡體中文回答。",
    "不要用繁體中文回答",
    "请勿使用繁体中文",
    "Do not answer in Traditional Chinese.",
    "What is the history of traditional Chinese characters?",
    "",
])
def test_does_not_ask_for_traditional(text):
    assert not asks_for_traditional(text)


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
        "SM2签名": 1, "SM3": 1, "哈希函数": 3, "TLS 1.3": 1, "TLS 1.2": 1, "TLS": 1, "CA": 2,
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


def test_space_between_ascii_and_chinese_is_optional(terms):
    """The bundled data writes "S 盒" and "SM2 签名"; the dictionary writes S盒 and SM2签名."""
    assert terms.count_terms("S 盒、S盒、Feistel 结构、Shor 算法") == Counter(
        {"S盒": 2, "Feistel结构": 1, "Shor算法": 1})
    assert terms.count_terms("SM2 签名与 SM2 加密") == Counter({"SM2签名": 1, "SM2": 1})
    assert terms.find_terms("用 S 盒") == [("S盒", 2, 5)]  # the span covers the space
    assert terms.count_terms("AES 盒") == Counter({"AES": 1})  # no "S盒" inside an ASCII word


def test_en_dash_reads_as_hyphen(terms):
    assert terms.count_terms("Diffie–Hellman 与 Merkle–Damgård 结构") == Counter(
        {"Diffie-Hellman": 1, "Merkle-Damgård结构": 1})


@pytest.mark.parametrize("text, expected", [
    # aliases that also named something else are gone
    ("Kerberos 的 SPN", {"Kerberos": 1}),
    ("TLS 1.3 的 key schedule（密钥调度）", {"TLS 1.3": 1}),
    ("CMAC 的子密钥 K1、K2（subkey）", {"CMAC": 1}),
    ("哈希签名", {}),
    ("PKCS#7", {}),
    # ... or are terms of their own
    ("Keccak-256 不是 SHA3-256，SHA-3 基于 Keccak-f", {"Keccak-256": 1, "SHA3-256": 1, "SHA-3": 1, "Keccak-f": 1}),
    ("DSS（FIPS 186-5）不只规定 DSA", {"DSS": 2, "DSA": 1}),
    ("PKCS#7 填充与 PKCS#7 签名（CMS）", {"PKCS#7填充": 1, "密码消息语法": 2}),
    ("SPN 结构", {"SPN结构": 1}),
])
def test_ambiguous_aliases_are_exact(terms, text, expected):
    assert terms.count_terms(text) == Counter(expected)


def test_new_terms_and_their_categories(terms):
    category = {t.name: t.category for t in terms.terms}
    assert category["心脏出血"] == "protocol"  # an implementation bug, not cryptanalysis
    expected = {
        "ECIES": "public_key", "HPKE": "public_key", "双证书": "pki", "签名证书": "pki",
        "加密证书": "pki", "密钥管理中心": "pki", "商用密码应用安全性评估": "fundamentals",
        "中华人民共和国密码法": "fundamentals", "智能密码钥匙": "fundamentals", "时间戳机构": "pki",
        "可信时间戳": "pki", "交叉证书": "pki", "ACME": "pki", "CAA": "pki", "0-RTT": "protocol",
        "会话恢复": "protocol", "Fiat-Shamir变换": "signature", "Fujisaki-Okamoto变换": "public_key",
        "EUF-CMA": "signature", "完善保密性": "fundamentals", "小子群攻击": "cryptanalysis",
        "非法曲线攻击": "cryptanalysis", "Pollard rho算法": "cryptanalysis", "GNFS": "cryptanalysis",
        "LLL算法": "cryptanalysis", "BKZ算法": "cryptanalysis", "128-EEA3": "stream_cipher",
        "128-EIA3": "mac", "可延展性": "fundamentals", "密码敏捷性": "fundamentals",
    }
    assert {name: category.get(name) for name in expected} == expected
    counts = terms.count_terms("KMC、密评、《密码法》、TSA、Fiat–Shamir 变换、FO 变换、Pollard ρ、EEA3")
    assert counts == Counter({"密钥管理中心": 1, "商用密码应用安全性评估": 1, "中华人民共和国密码法": 1,
                              "时间戳机构": 1, "Fiat-Shamir变换": 1, "Fujisaki-Okamoto变换": 1,
                              "Pollard rho算法": 1, "128-EEA3": 1})
    assert terms.count_terms("密码法律法规") == Counter()  # 《密码法》 only with its brackets


def test_generic_terms_weigh_less_in_the_category(terms):
    weight = {t.name: t.weight for t in terms.terms}
    assert weight["私钥"] < 1 and weight["公钥"] < 1 and weight["证书"] < 1 and weight["ECDSA"] == 1
    text = "ECDSA 签名用私钥，验签用公钥；私钥泄露则可伪造签名。"
    assert terms.category_counts(text) == Counter({"public_key": 3, "signature": 2})  # unweighted
    assert terms.dominant_category(text) == "signature"


def test_the_question_weighs_more(terms):
    question = "计时攻击是如何泄露密钥的？"
    answer = "RSA 的模幂运算随私钥比特变化，应当使用常数时间实现。"
    record = question + "\n" + answer
    assert terms.dominant_category(record) == "public_key"  # RSA + 模幂运算 + 私钥 outweigh 计时攻击
    assert terms.dominant_category(record, question=question) == "cryptanalysis"
    counts, question_counts = terms.count_terms(record), terms.count_terms(question)
    assert terms.category_scores(counts, question_counts)["cryptanalysis"] == QUESTION_WEIGHT
    assert terms.dominant_category_of(counts, question_counts) == "cryptanalysis"


def _weighted(tmp_path, lines, name="weighted.tsv"):
    return load_terms(_write(tmp_path, "name\tcategory\tenglish\taliases\tweight\n" + lines, name))


def test_weights_are_exact_and_zero_never_decides(tmp_path):
    terms = _weighted(tmp_path, "甲\tmac\talpha\t\t0.1\n乙\tmac\tbeta\t\t0.2\n"
                                "丙\thash\tgamma\t\t0.3\n丁\tpki\tdelta\t\t0\n戊\tmode\tepsilon\t\n")
    assert [t.weight for t in terms.terms] == [Fraction(1, 10), Fraction(1, 5), Fraction(3, 10), 0, 1]
    # 0.1 + 0.2 ties 0.3 exactly (not 0.30000000000000004), so the tie goes to "hash"
    assert terms.dominant_category("甲乙丙") == "hash"
    assert terms.dominant_category("丁丁丁丁") is None  # weight 0 only: no category
    assert terms.dominant_category("丁丁丁丁 甲") == "mac"
    assert terms.count_terms("丁丁") == Counter({"丁": 2})  # counted all the same
    assert terms.dominant_category("戊") == "mode"  # the weight column may be left out


def test_bundled_dictionary_weights_are_documented_in_its_header(terms):
    header = TERMS.read_text(encoding="utf-8").split("\nname\t")[0]
    for term in terms.terms:
        if term.weight != 1:
            assert term.name in header, f"{term.name} weighs {term.weight}: say why in the header"


def _record(path, question_start):
    convs, _ = read_file(REPO / "data" / "crypto_qa" / path)
    for c in convs:
        question = "\n".join(t["content"] for t in c.prompt if t["role"] != "system")
        if question.startswith(question_start):
            return question, "\n".join((question, c.reasoning or "", c.answer))
    raise AssertionError(f"{path}: no record asks {question_start!r}")


@pytest.mark.parametrize("path, question_start, expected, before", [
    ("symmetric.jsonl", "CMAC 的子密钥 K1、K2", "mac", "block_cipher (子密钥 = round key)"),
    ("public_key.jsonl", "如果 ECDSA 对两条不同消息", "signature", "public_key (私钥 x5)"),
    ("public_key.jsonl", "Heartbleed 漏洞", "protocol", "public_key"),
    ("protocols_chat.json", "什么是 Kerberoasting", "cryptanalysis", "block_cipher (SPN = SPN结构)"),
    ("protocols_chat.json", "IPsec 中的 AH 和 ESP", "protocol", "fundamentals (完整性 x5)"),
])
def test_bundled_records_that_were_miscategorised(terms, path, question_start, expected, before):
    question, record = _record(path, question_start)
    assert terms.dominant_category(record) == expected, before
    assert terms.dominant_category(record, question=question) == expected, before


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


@pytest.mark.parametrize("weight", ["abc", "1.5", "-1", "0,5", ".5", "1e-2"])
def test_load_terms_bad_weight(tmp_path, weight):
    path = _write(tmp_path, HEADER.replace("aliases", "aliases\tweight")
                  + f"AES\tblock_cipher\tAdvanced Encryption Standard\t\n公钥\tpublic_key\tpublic key\t\t{weight}\n")
    _assert_error(path, 3, f"weight {weight!r} for '公钥'", "from 0 to 1", "empty for 1")


def test_load_terms_weight_needs_its_header_column(tmp_path):
    path = _write(tmp_path, HEADER + "公钥\tpublic_key\tpublic key\t\t0.25\n")
    _assert_error(path, 2, "4 tab-separated columns", "found 5", "add a weight column to the header")
    path = _write(tmp_path, HEADER.replace("aliases", "aliases\tweight")
                  + "公钥\tpublic_key\tpublic key\t\t0.25\textra\n", "six.tsv")
    _assert_error(path, 2, "4 or 5 tab-separated columns", "found 6")
    path = _write(tmp_path, "name\tcategory\tenglish\taliases\tweights\n", "typo.tsv")
    _assert_error(path, 1, "header", "weight")


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
