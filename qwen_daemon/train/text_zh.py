"""Chinese text cleaning, near-duplicate keys and cryptography term statistics.

``normalize_text`` is the cleaning every record goes through before training (see its docstring for
the exact steps). ``simplify_chinese`` turns traditional Chinese into mainland simplified Chinese
(the Taiwan vocabulary of tw_vocabulary.tsv, then OpenCC "t2s" characters), ``has_traditional``
tells whether a text needs it and ``asks_for_traditional`` whether a prompt asks for an answer in
traditional Chinese. ``dedup_key`` turns a text into a key for near-duplicate detection.
``load_terms`` reads the term dictionary (``data/crypto_terms.tsv``; its format is in the file's
header) into a ``TermDictionary``.

How terms are counted (``TermDictionary.count_terms``)
-----------------------------------------------------
Counting does not depend on jieba's probabilistic segmentation, so it is exact and reproducible:

1. The text goes through ``normalize_text`` (so traditional characters, full-width letters and
   spacing variants match) and is lower-cased; hyphen-like dashes (‐ ‑ ‒ –) read as "-", so
   "Diffie–Hellman" with an en dash is Diffie-Hellman.
2. Every surface form of every term - its name, its English name and its aliases, each normalised
   and lower-cased the same way - is compiled into one regular expression shaped as a trie
   (a prefix tree), which is fast whatever the number of terms.
3. The expression is scanned left to right; at each position the longest surface form wins, and
   matches never overlap. So "TLS 1.3" counts once as TLS 1.3 (not also as TLS), "3DES" as 3DES
   (not DES), "伪随机数发生器" as itself (not also as 随机数发生器).
   A space between an ASCII letter or digit and a Chinese character is optional, in the text and
   in the surface forms alike: "S 盒", "SM4 算法" and "SM2 签名" (how the bundled data writes them)
   count as S盒, SM4算法 and SM2签名.
4. Surface forms that begin or end with an ASCII letter or digit must not continue an ASCII word
   there: "SM2" is not found in "SM23", "CA" not in "CBC" or "CAST", "DES" not in "3DES". Chinese
   text has no such boundaries, so Chinese edges have no guard ("CA证书" counts CA and 证书).
5. Surface forms that are English words (ASCII, with a lower-case letter, ending in a letter) also
   match with a plural "s": "block ciphers" counts as 分组密码.
6. Each match is counted for the canonical term name; categories are summed from those counts.

How a record's category is chosen (``TermDictionary.dominant_category_of``)
-------------------------------------------------------------------------
The category with the highest score, where each occurrence adds its term's weight (the
dictionary's optional weight column, 1 when empty) and an occurrence in the question, when the
question's counts are given, adds ``QUESTION_WEIGHT`` times that. Generic words that every topic
uses (公钥, 私钥, 证书) have a small weight, so that "ECDSA" in a record full of 私钥 still makes
it a signature record; a term of weight 0 never decides. Ties go to the alphabetically first
category; a record whose terms all weigh 0 has no category. Weights are exact fractions (read
from the decimal in the file), so ties are exact too. Weights only choose the category: term
counts, term metrics and the report's top terms count every occurrence once.

``TermDictionary.segment`` is separate: jieba segmentation with every surface form jieba can hold
(those containing a Chinese character or ASCII punctuation such as "SHA-256") added to a private
``jieba.Tokenizer``, so "分组密码" or "祖冲之算法" stay one token. The process-wide default jieba
tokenizer is never touched.

Processes: a ``TermDictionary`` pickles as (path, content hash). Unpickling calls ``load_terms``
in the receiving process, which caches one dictionary per file, so each worker process
(``datasets.map(num_proc=...)``, multiprocessing "spawn") parses the file once and builds its
jieba tokenizer once, lazily, on its first ``segment`` call.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import unicodedata
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "CATEGORIES",
    "DEFAULT_TERMS_PATH",
    "QUESTION_WEIGHT",
    "Term",
    "TermDictionary",
    "TermDictionaryError",
    "dedup_key",
    "VOCABULARY_PATH",
    "asks_for_traditional",
    "has_traditional",
    "load_terms",
    "normalize_text",
    "simplify_chinese",
]

# The bundled dictionary, relative to the repository root (it is not packaged in the wheel).
DEFAULT_TERMS_PATH = Path(__file__).resolve().parents[2] / "data" / "crypto_terms.tsv"

CATEGORIES = (
    "block_cipher", "mode", "hash", "mac", "stream_cipher", "randomness", "public_key",
    "signature", "key_exchange", "pki", "protocol", "post_quantum", "cryptanalysis", "fundamentals",
)
HEADER = ("name", "category", "english", "aliases")
WEIGHT_COLUMN = "weight"  # optional fifth column: a term's weight in choosing a record's category
# When the question's counts are given, an occurrence in the question weighs this many times one
# in the reasoning or answer: the question says what the record is about, the answer also names
# everything around it (a question on the timing attack on RSA answers with RSA and 私钥). On the
# bundled records, judged by hand, 3 was best: 2 left attack and signature questions under the
# algorithm they are about, 4 or more let a term the question names in passing decide.
QUESTION_WEIGHT = 3


class TermDictionaryError(ValueError):
    """A term dictionary file that cannot be used; the message names the file, line and fix."""


# --- normalize_text ------------------------------------------------------------------------------

# Step 2 and 3 in one table: invisible characters deleted, old Mac/Unicode line breaks to "\n",
# exotic spaces (no-break, thin, ...) to a plain space so the whitespace clean-up sees them.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"
_CONTROL_MAP = {
    **{ord(c): None for c in _INVISIBLE},
    ord("\r"): "\n", 0x85: "\n", 0x2028: "\n", 0x2029: "\n",
    **{cp: " " for cp in (0xA0, *range(0x2000, 0x200B), 0x202F, 0x205F)},
}
_CONTROL_RE = re.compile("[" + "".join(re.escape(chr(cp)) for cp in _CONTROL_MAP) + "]")

# Full-width forms that are Chinese punctuation in their full-width shape stay full-width.
_KEEP_FULLWIDTH = set("！（），：；？～")
# Variant punctuation to the form usual in simplified Chinese text.
_PUNCT_VARIANTS = {
    # small form variants
    "﹐": "，", "﹑": "、", "﹒": "。", "﹔": "；", "﹕": "：", "﹖": "？", "﹗": "！", "﹘": "—",
    "﹙": "（", "﹚": "）", "﹛": "{", "﹜": "}", "﹝": "〔", "﹞": "〕", "﹟": "#", "﹠": "&",
    "﹡": "*", "﹢": "+", "﹣": "-", "﹤": "<", "﹥": ">", "﹦": "=", "﹨": "\\", "﹩": "$",
    "﹪": "%", "﹫": "@",
    # vertical forms
    "︐": "，", "︑": "、", "︒": "。", "︓": "：", "︔": "；", "︕": "！", "︖": "？", "︗": "〖",
    "︘": "〗", "︙": "…", "︱": "—", "︵": "（", "︶": "）", "︹": "〔", "︺": "〕", "︻": "【",
    "︼": "】", "︽": "《", "︾": "》", "︿": "〈", "﹀": "〉", "﹁": "“", "﹂": "”", "﹃": "‘",
    "﹄": "’",
    # half-width CJK punctuation
    "｡": "。", "｢": "“", "｣": "”", "､": "、", "･": "·",
    # corner brackets and other quotation marks (traditional / Japanese style) to Chinese quotes
    "「": "“", "」": "”", "『": "‘", "』": "’", "〝": "“", "〞": "”", "〟": "”",
    # interpuncts and ellipses used in traditional text
    "‧": "·", "・": "·", "⋯": "…",
}


def _width_punct_map() -> dict[int, str]:
    """Full-width ASCII (U+FF01..U+FF5E) and U+3000 to half-width, plus the punctuation variants."""
    table = {0x3000: " "}
    for cp in range(0xFF01, 0xFF5F):
        if chr(cp) not in _KEEP_FULLWIDTH:
            table[cp] = chr(cp - 0xFEE0)
    table.update({ord(k): v for k, v in _PUNCT_VARIANTS.items()})
    return table


_WIDTH_MAP = _width_punct_map()
# Runs of mapped characters are translated one run at a time: str.translate over a whole text
# costs ~50 ns per character, and most texts have only a few characters to change.
_WIDTH_RUN = re.compile("[" + "".join(re.escape(chr(cp)) for cp in _WIDTH_MAP) + "]+")

# Characters between which a space is removed: Han (all blocks), kana, bopomofo, CJK symbols and
# punctuation, full-width forms. Hangul is left out on purpose: Korean separates words by spaces.
_CJK = ("\u2e80-\u2fdf\u3001-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3200-\u33ff"
        "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff01-\uff60"
        "\U00020000-\U0003134f")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
# Runs of spaces/tabs that need collapsing (single plain spaces are not matched, which keeps the
# pass cheap); _collapse_run keeps the ones that are a line's indentation (Markdown structure).
_INNER_WS = re.compile(r"[ \t]{2,}|\t")
# Patterns start with a literal space (not a lookbehind) so the regex engine can skip ahead fast.
_CJK_GAP = re.compile(f" (?<=[{_CJK}] )(?=[{_CJK}])")
_BLANK_LINES = re.compile(r"\n{3,}")
# A fenced code block: from an opening ``` or ~~~ line to the matching closing line, or to the end.
_FENCE_BLOCK = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,}).*?(?:^[ \t]*(?P=fence)[`~]*[ \t]*$|\Z)",
                          re.MULTILINE | re.DOTALL)


def normalize_text(text: str, *, to_simplified: bool = True) -> str:
    """Clean one text the way every training record is cleaned.

    Steps, in order: Unicode NFC; zero-width characters, BOM and soft hyphens removed; CR LF, CR
    and Unicode line separators to LF; full-width ASCII letters, digits and symbols and the
    ideographic space to half-width, except the full-width punctuation of Chinese text （），：；！？～
    which stays; punctuation variants to their usual Chinese form (﹐ -> ，, ｡ -> 。, 「」 -> “”,
    『』 -> ‘’, ⋯ -> …); whitespace: exotic spaces to a space, trailing spaces and tabs removed on
    each line, runs of spaces/tabs after a line's indentation collapsed to one space, a space
    between two CJK characters removed (a space between ASCII and Chinese, as in "SM4 算法", is
    kept), 3 or more newlines to 2, and the whole text stripped; last, when ``to_simplified`` and
    the text has traditional characters, ``simplify_chinese`` (to mainland simplified Chinese:
    Taiwan vocabulary, then characters); a simplified text is left as written.

    Left alone: ASCII punctuation, reasoning tags (<think>, </think>, <thinking>, </thinking>),
    line indentation and Markdown line starts (#, -, 1.); inside fenced code blocks only trailing
    whitespace is removed, so code keeps its alignment.
    """
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if _CONTROL_RE.search(text):
        text = text.translate(_CONTROL_MAP)
    text = _WIDTH_RUN.sub(_translate_width_run, text)
    text = _clean_whitespace(text)
    # Converted last: the clean-up only touches spaces and punctuation, and a vocabulary word
    # broken by a stray space ("金 鑰") is whole again by now.
    return simplify_chinese(text) if to_simplified and has_traditional(text) else text


def _translate_width_run(match: re.Match[str]) -> str:
    return match.group().translate(_WIDTH_MAP)


def _clean_whitespace(text: str) -> str:
    """Whitespace clean-up of a whole text, sparing the inside of fenced code blocks."""
    if "```" not in text and "~~~" not in text:
        return _clean_prose(text).strip()
    parts = []
    pos = 0
    for match in _FENCE_BLOCK.finditer(text):
        parts.append(_clean_prose(text[pos:match.start()]))
        parts.append(_TRAILING_WS.sub("", match.group()))
        pos = match.end()
    parts.append(_clean_prose(text[pos:]))
    return "".join(parts).strip()


def _clean_prose(text: str) -> str:
    """Whitespace clean-up of text outside code blocks (each pass skipped when it cannot apply)."""
    if " " in text or "\t" in text:
        text = _TRAILING_WS.sub("", text)
        if "  " in text or "\t" in text:
            text = _INNER_WS.sub(_collapse_run, text)
        if not text.isascii():
            text = _CJK_GAP.sub("", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text


def _collapse_run(match: re.Match[str]) -> str:
    """One space for a run inside a line; the run unchanged when it is the line's indentation."""
    start = match.start()
    if start == 0 or match.string[start - 1] == "\n":
        return match.group()
    return " "


# --- traditional to simplified ------------------------------------------------------------------

# Taiwan vocabulary -> mainland vocabulary; packaged next to this module (see its header).
VOCABULARY_PATH = Path(__file__).with_name("tw_vocabulary.tsv")
_VOCABULARY_HEADER = ("taiwan", "mainland", "note")


@functools.cache
def _opencc(config: str) -> Any:
    """An OpenCC converter, built once per process and configuration (a few ms)."""
    import opencc  # the official C++ binding; configs are named like "t2s"

    return opencc.OpenCC(config)


@functools.cache
def _vocabulary() -> tuple[re.Pattern[str], dict[str, tuple[str, str | None]]]:
    """One trie-shaped regex over the Taiwan words of VOCABULARY_PATH, and word -> (mainland word,
    its label for the data report, None for a guard line)."""
    t2s = _opencc("t2s")
    mapping: dict[str, tuple[str, str | None]] = {}
    lines = VOCABULARY_PATH.read_text(encoding="utf-8").split("\n")
    rows = [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(lines, start=1)
            if line.strip() and not line.startswith("#")]
    if not rows or tuple(rows[0][1]) != _VOCABULARY_HEADER:
        raise ValueError(f"{VOCABULARY_PATH}: the first line that is not a comment must be "
                         f"{'<TAB>'.join(_VOCABULARY_HEADER)!r}")
    for line_no, cols in rows[1:]:
        if len(cols) not in (2, 3) or not cols[0] or not cols[1]:
            raise ValueError(f"{VOCABULARY_PATH}:{line_no}: expected taiwan<TAB>mainland[<TAB>note], "
                             f"found {cols!r}")
        word, mainland = cols[0], cols[1]
        if word in mapping:
            raise ValueError(f"{VOCABULARY_PATH}:{line_no}: {word!r} is already mapped; keep one line")
        mapping[word] = (mainland, None if mainland == t2s.convert(word) else f"{word}->{mainland}")
    trie: dict[str, Any] = {}
    for word in mapping:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = ""  # the word may end here; _trie_regex tries longer words first
    return re.compile(_trie_regex(trie)), mapping


def has_traditional(text: str) -> bool:
    """Whether text has traditional Chinese characters (characters OpenCC "t2s" would change)."""
    return not text.isascii() and _opencc("t2s").convert(text) != text


def simplify_chinese(text: str, replaced: Counter[str] | None = None) -> str:
    """Traditional Chinese (Taiwan usage) to mainland simplified Chinese.

    First the Taiwan vocabulary of VOCABULARY_PATH (金鑰 -> 密钥, 位元 -> 比特), scanning left to
    right, the longest word at each position, never overlapping, so a guard line keeps a longer
    word whole (方程式 keeps its 程式); then OpenCC "t2s", which converts characters and nothing else
    (OpenCC's tw2sp also converted phrases and broke words: 橢圓曲線上 -> 椭圆曲在线). ``replaced``,
    when given, counts each vocabulary replacement as "金鑰->密钥" (guards are not counted).

    Applied to any text: the caller decides which texts are traditional (``has_traditional``;
    ``normalize_text`` converts only those, data preparation whole records). Words such as 程式 or
    互斥或 are written alike in both scripts, so this would rewrite them in a mainland text too.
    """
    if text.isascii():
        return text
    pattern, mapping = _vocabulary()

    def replace(match: re.Match[str]) -> str:
        mainland, label = mapping[match.group()]
        if replaced is not None and label is not None:
            replaced[label] += 1
        return mainland

    return _opencc("t2s").convert(pattern.sub(replace, text))


# An instruction to answer (or translate, or write) in traditional Chinese, in either script:
# 請用繁體中文回答, 请用繁体中文, 以正體中文回覆, 翻譯成繁體字, 改用台灣用語, 輸出語言：繁體中文,
# "answer in Traditional Chinese", zh-TW / zh-Hant / zh-HK. A verb (or "language:") must come
# first, so a question about the scripts (繁體字和簡體字有什麼不同？) is not an instruction.
_VERB = "(?:使用|採用|采用|改用|用|以|成|為|为|到)"
_SCRIPT = "(?:(?:繁|正)[體体]|繁中)"
_TAIWAN = "(?:(?:台|臺)[灣湾]|香港)"
_TRADITIONAL_REQUEST = re.compile(
    rf"{_VERB}\s*{_TAIWAN}?的?\s*{_SCRIPT}"
    rf"|{_VERB}\s*{_TAIWAN}的?\s*(?:用[語语]|[慣惯]用[語语])"
    rf"|{_SCRIPT}中文(?:回答|回覆|回复|作答|輸出|输出)"
    rf"|(?:語言|语言|language)\s*[:：]\s*(?:{_SCRIPT}|traditional chinese)"
    r"|\bzh[-_](?:tw|hk|hant)\b"
    r"|\b(?:in|into|to|using|use)\s+traditional\s+chinese\b",
    re.IGNORECASE,
)
# What just before such a phrase turns it around: 不要用繁體中文, 请勿使用繁体, "do not answer in ...".
_NEGATION_BEFORE = re.compile(r"(?:不|勿|別|别|免|禁止|不要|不得|无需|無需)$"
                              r"|\b(?:not|never|don't|no)\b[^.,;:!?]*$", re.IGNORECASE)


def asks_for_traditional(text: str) -> bool:
    """Whether text (a system prompt or a question) asks for an answer in traditional Chinese."""
    return any(not _NEGATION_BEFORE.search(text[max(0, m.start() - 30):m.start()])
               for m in _TRADITIONAL_REQUEST.finditer(text))


# --- dedup_key -----------------------------------------------------------------------------------

class _DropTable(dict):
    """str.translate table deleting punctuation, symbols, separators and controls.

    A dict with ``__missing__`` rather than a precomputed table: classifying all 1.1M code points
    would cost every process a fifth of a second; each character is classified on first sight.
    """

    def __missing__(self, cp: int) -> int | None:
        cat = unicodedata.category(chr(cp))
        value = None if cat[0] in "PSZ" or cat in ("Cc", "Cf") else cp
        self[cp] = value
        return value


_DROP_TABLE = _DropTable()


def dedup_key(text: str) -> str:
    """Key for near-duplicate detection.

    ``normalize_text(text, to_simplified=True)``, case-folded, with all whitespace, punctuation
    (P*), symbols (S*), separators (Z*) and control/format characters removed. Texts that differ
    only in punctuation, spacing, width, case or traditional/simplified characters get equal keys.
    """
    return normalize_text(text, to_simplified=True).casefold().translate(_DROP_TABLE)


# --- the term dictionary -------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    """One dictionary entry: the canonical Chinese (or algorithm) name and its other spellings."""

    name: str
    category: str
    english: str
    aliases: tuple[str, ...]
    weight: Fraction = Fraction(1)  # an occurrence's weight in choosing a record's category


# Characters jieba keeps inside one token (jieba's own re_han_default); other forms cannot be
# jieba words and are only found by the counting expression.
_JIEBA_WORD = re.compile(r"[\u4e00-\u9fd5A-Za-z0-9+#&._%\-]+")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Frequency for user words: high enough that a term is not split by neighbouring common words,
# low enough (the dictionary total is ~60M) that it does not swallow unrelated words around it.
_USER_WORD_FREQ = 100_000
_ASCII_ALNUM = "A-Za-z0-9"


# A space between an ASCII letter/digit and a Chinese character, which matching treats as optional.
_BOUNDARY_SPACE = re.compile(rf"(?<=[{_ASCII_ALNUM}]) (?={_HAN.pattern})"
                             rf"|(?<={_HAN.pattern}) (?=[{_ASCII_ALNUM}])")
_DASHES = re.compile("[\u2010-\u2013]")  # hyphen, non-breaking hyphen, figure dash, en dash
# Trie edge for that optional space (see _build_pattern); a character no surface form can hold.
_OPTIONAL_SPACE = "\x00"


def _surface_key(form: str) -> str:
    """The matching key of a surface form or a match: normalised like the text, lower-cased, and
    without the optional spaces between ASCII and Chinese ("SM4 算法" and "SM4算法" are one key)."""
    key = _matching_text(form)
    return _BOUNDARY_SPACE.sub("", key) if " " in key else key


def _matching_text(text: str) -> str:
    """What the counting expression scans: normalised, lower-cased, dashes folded to "-"."""
    return _DASHES.sub("-", normalize_text(text).lower())


def _with_optional_spaces(key: str) -> str:
    """The key with _OPTIONAL_SPACE wherever ASCII letters/digits and Chinese characters meet."""
    out = [key[0]]
    for prev, ch in zip(key, key[1:]):
        if (_is_ascii_alnum(prev) and _HAN.match(ch)) or (_HAN.match(prev) and _is_ascii_alnum(ch)):
            out.append(_OPTIONAL_SPACE)
        out.append(ch)
    return "".join(out)


def _surface_forms(term: Term) -> list[str]:
    """Name, English name and aliases of a term, in that order, without empty ones."""
    return [f for f in (term.name, term.english, *term.aliases) if f]


def _is_ascii_alnum(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _key_suffix(form: str) -> str:
    """What must follow a surface form in the text: the end guard, after an optional plural "s"
    for English words (ASCII with a lower-case letter, so not acronyms like "CA" or "IKE")."""
    if not _is_ascii_alnum(form[-1]):
        return ""
    english_word = form.isascii() and form[-1].isalpha() and any(c.islower() for c in form)
    return ("s?" if english_word else "") + f"(?![{_ASCII_ALNUM}])"


def _trie_regex(node: dict[str, Any]) -> str:
    """Regex source for one trie node: children first (longest match), then the end of a key."""
    branches = [(" ?" if ch == _OPTIONAL_SPACE else re.escape(ch)) + _trie_regex(child)
                for ch, child in sorted(node.items()) if ch]
    if "" in node:
        branches.append(node[""])
    if len(branches) == 1:
        return branches[0]
    return "(?:" + "|".join(branches) + ")"


def _build_pattern(forms: dict[str, str]) -> re.Pattern[str]:
    """One trie-shaped regex over the keys of ``forms`` (key -> the surface form as written),
    with ASCII word guards and optional spaces between ASCII and Chinese (see the module
    docstring)."""
    trie: dict[str, Any] = {}
    for key, form in forms.items():
        node = trie
        for ch in _with_optional_spaces(key):
            node = node.setdefault(ch, {})
        node[""] = _key_suffix(form)
    branches = []
    for ch, child in sorted(trie.items()):
        # The start guard comes after the first character (a two-character lookbehind) so every
        # branch still begins with a literal, which lets the regex engine skip ahead quickly.
        guard = f"(?<![{_ASCII_ALNUM}].)" if _is_ascii_alnum(ch) else ""
        branches.append(re.escape(ch) + guard + _trie_regex(child))
    return re.compile("|".join(branches) or r"(?!)")


def _import_jieba() -> Any:
    """jieba, imported without its noise."""
    with warnings.catch_warnings():
        # jieba 0.42 has invalid escape sequences: Python warns (DeprecationWarning before 3.12,
        # SyntaxWarning since) whenever it compiles the module without a cached .pyc.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        import jieba
        import jieba.analyse

    # jieba sets its logger to DEBUG on import and prints "Building prefix dict ..." through it.
    logging.getLogger("jieba").setLevel(logging.WARNING)
    return jieba


def _build_tokenizer(words: Iterable[str]) -> Any:
    """A private jieba tokenizer with the given user words (about 1 s: jieba's own dictionary)."""
    tokenizer = _import_jieba().Tokenizer()
    tokenizer.initialize()
    for word in words:
        tokenizer.add_word(word, freq=_USER_WORD_FREQ)
    return tokenizer


class TermDictionary:
    """Cryptography terms with segmentation and counting; build it with ``load_terms``."""

    def __init__(self, path: Path, terms: tuple[Term, ...], digest: str) -> None:
        self.path = path
        self.terms = terms
        self.digest = digest  # sha256 of the file; lets a worker process check it read the same file
        self._by_name = {t.name: t for t in terms}
        forms = {}  # key -> surface form as written; the first spelling of a key wins
        self._by_key = {}  # key -> canonical term name
        for term in terms:
            for form in _surface_forms(term):
                key = _surface_key(form)
                forms.setdefault(key, normalize_text(form))
                self._by_key.setdefault(key, term.name)
        self._pattern = _build_pattern(forms)
        self._tokenizer: Any = None

    def __repr__(self) -> str:
        return f"TermDictionary({str(self.path)!r}, {len(self.terms)} terms)"

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # Rebuilt from the file in the receiving process (cached there), never shipped in pieces.
        return _restore, (str(self.path), self.digest)

    def segment(self, text: str) -> list[str]:
        """jieba tokens of ``normalize_text(text)``, whitespace tokens left out."""
        if self._tokenizer is None:
            self._tokenizer = _build_tokenizer(self._jieba_words())
        return [tok for tok in self._tokenizer.cut(normalize_text(text)) if not tok.isspace()]

    def count_terms(self, text: str) -> Counter[str]:
        """Canonical term name -> occurrences in the text (see the module docstring for how)."""
        counts: Counter[str] = Counter()
        for match, n in Counter(self._pattern.findall(_matching_text(text))).items():
            counts[self._name_of(match)] += n
        return counts

    def _name_of(self, match: str) -> str:
        """The canonical name of a matched surface form (as matched: case, spaces, plural)."""
        key = _BOUNDARY_SPACE.sub("", match) if " " in match else match
        return self._by_key.get(key) or self._by_key[key[:-1]]  # key[:-1]: a plural "s"

    def find_terms(self, text: str) -> list[tuple[str, int, int]]:
        """The occurrences ``count_terms`` counts, as (canonical name, start, end), in text order.

        The spans index ``normalize_text(text)``, not ``text``: that is the text the matching sees
        (lower-cased, as in count_terms; a character whose lower-case form is longer, which only
        U+0130 "İ" has, stays as it is so that the spans remain valid).
        """
        normalized = normalize_text(text)
        lowered = normalized.lower()
        if len(lowered) != len(normalized):
            lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in normalized)
        lowered = _DASHES.sub("-", lowered)
        return [(self._name_of(m.group()), m.start(), m.end())
                for m in self._pattern.finditer(lowered)]

    def category_counts(self, text: str) -> Counter[str]:
        """Category slug -> occurrences of its terms in the text (unweighted)."""
        return self.categories_of(self.count_terms(text))

    def dominant_category(self, text: str, question: str | None = None) -> str | None:
        """The category of a text (the whole record; ``question``, when given, is its question,
        which weighs more), as the module docstring describes; None when no term decides."""
        return self.dominant_category_of(
            self.count_terms(text), None if question is None else self.count_terms(question))

    def categories_of(self, counts: Mapping[str, int]) -> Counter[str]:
        """Category occurrence counts from ``count_terms`` output (unweighted)."""
        result: Counter[str] = Counter()
        for name, n in counts.items():
            result[self._by_name[name].category] += n
        return result

    def category_scores(self, counts: Mapping[str, int],
                        question: Mapping[str, int] | None = None) -> dict[str, Fraction]:
        """Category -> weighted score, from ``count_terms`` output of the whole record and,
        optionally, of its question alone (whose occurrences are already in ``counts``; they get
        QUESTION_WEIGHT - 1 more); categories that score 0 are left out."""
        scores: dict[str, Fraction] = defaultdict(Fraction)
        for name, n in counts.items():
            term = self._by_name[name]
            extra = (QUESTION_WEIGHT - 1) * question.get(name, 0) if question else 0
            scores[term.category] += term.weight * (n + extra)
        return {c: s for c, s in scores.items() if s}

    def dominant_category_of(self, counts: Mapping[str, int],
                             question: Mapping[str, int] | None = None) -> str | None:
        """``dominant_category`` from ``count_terms`` output: of the whole record and, optionally,
        of its question alone (which then weighs QUESTION_WEIGHT times as much)."""
        scores = self.category_scores(counts, question)
        if not scores:
            return None
        return min(scores, key=lambda c: (-scores[c], c))

    def candidate_terms(self, texts: Iterable[str], k: int = 20) -> list[tuple[str, int]]:
        """Frequent words that are not in the dictionary: suggestions for terms to add.

        jieba segmentation (with the dictionary as user words) of the texts; words of two or more
        characters that contain a Chinese character and are no term's name or alias, ranked by
        count x jieba's inverse document frequency, so that everyday words (可以, 因此) sink.
        Returns (word, count) pairs, best first.
        """
        try:
            _import_jieba()
        except ImportError as e:  # a bare GPU box may lack it: the report just has no candidates
            log.warning("jieba is not installed (%s): no candidate terms in the report", e)
            return []
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(w for w in self.segment(text) if len(w) > 1 and _HAN.search(w)
                          and _surface_key(w) not in self._by_key)
        idf, median = _jieba_idf()
        ranked = sorted(counts, key=lambda w: (-counts[w] * idf.get(w, median), w))
        return [(w, counts[w]) for w in ranked[:k]]

    def _jieba_words(self) -> list[str]:
        """Surface forms jieba can keep as one token and would not keep whole by itself.

        Pure ASCII letters/digits ("AES", "SM4") are left out: jieba already keeps an ASCII run
        whole, and as dictionary words they would split longer runs ("CAST" into "CA" "ST").
        Single characters are left out so that they do not break up ordinary words.
        """
        words = set()
        for term in self.terms:
            for form in _surface_forms(term):
                word = normalize_text(form)
                if len(word) > 1 and _JIEBA_WORD.fullmatch(word) and (
                        _HAN.search(word) or not word.isalnum()):
                    words.add(word)
        return sorted(words)


@functools.lru_cache(maxsize=1)
def _jieba_idf() -> tuple[dict[str, float], float]:
    """jieba's bundled IDF table (word -> idf) and its median, for ranking candidate terms."""
    tfidf = _import_jieba().analyse.default_tfidf
    return tfidf.idf_freq, tfidf.median_idf


def _restore(path: str, digest: str) -> TermDictionary:
    """Unpickle a TermDictionary: load (or reuse) this process's copy and check it is the same."""
    terms = load_terms(path)
    if terms.digest != digest:
        raise TermDictionaryError(
            f"{path}: the term dictionary changed on disk after another process loaded it; "
            "run again so that all processes read the same file")
    return terms


# --- loading -------------------------------------------------------------------------------------

def load_terms(path: str | Path = DEFAULT_TERMS_PATH) -> TermDictionary:
    """Read a term dictionary file; one object per file and process (reloaded if the file changes).

    Raises TermDictionaryError naming the file (and line) for a missing or unreadable file, a
    wrong header, a wrong number of columns, an unknown category, an empty name or English name,
    a weight that is not a decimal number from 0 to 1, and a name, English name or alias used
    twice.
    """
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        raise TermDictionaryError(
            f"{path}: term dictionary not found (resolved to {resolved}); set data.terms to an "
            f"existing file, e.g. the bundled {DEFAULT_TERMS_PATH}") from None
    if not resolved.is_file():
        raise TermDictionaryError(f"{path}: is not a file; data.terms must name a .tsv file")
    return _load_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> TermDictionary:
    """Parse and build; the cache key includes mtime and size so an edited file is re-read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TermDictionaryError(f"{path}: cannot read the term dictionary ({e})") from None
    terms = _parse_terms(path, data)
    return TermDictionary(Path(path), terms, hashlib.sha256(data).hexdigest())


def _error(path: str, line_no: int, problem: str) -> TermDictionaryError:
    return TermDictionaryError(f"{path}:{line_no}: {problem}")


def _parse_terms(path: str, data: bytes) -> tuple[Term, ...]:
    """Parse the TSV bytes into terms, validating every line (see load_terms)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data[:e.start].count(b"\n") + 1
        raise _error(path, line_no, "not valid UTF-8; save the file as UTF-8") from None
    terms: list[Term] = []
    seen: dict[str, tuple[int, str]] = {}  # surface key -> (line, term name)
    header: tuple[str, ...] | None = None
    headers = (HEADER, (*HEADER, WEIGHT_COLUMN))
    for line_no, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = [c.strip() for c in line.split("\t")]
        if header is None:
            if tuple(cols) not in headers:
                raise _error(path, line_no, f"expected the header line {'<TAB>'.join(HEADER)!r} "
                             f"or {'<TAB>'.join(headers[1])!r} (tab-separated), found {line!r}; "
                             "make it the first line that is not a comment")
            header = tuple(cols)
            continue
        term = _parse_line(path, line_no, cols, header)
        _check_unique(path, line_no, term, seen)
        terms.append(term)
    if header is None:
        raise _error(path, 1, f"no header line; the file must start with {'<TAB>'.join(HEADER)!r}")
    if not terms:
        raise _error(path, line_no, "no terms after the header; add at least one term line")
    return tuple(terms)


def _parse_line(path: str, line_no: int, cols: list[str], header: tuple[str, ...]) -> Term:
    """One data line to a Term (columns already split and stripped). With a weight column in the
    header, the weight may be left out or empty (weight 1)."""
    if not len(HEADER) <= len(cols) <= len(header):
        expected = (f"{len(HEADER)} tab-separated columns ({', '.join(HEADER)})"
                    if len(header) == len(HEADER) else
                    f"{len(HEADER)} or {len(header)} tab-separated columns ({', '.join(header)})")
        hint = ("; to give weights, add a weight column to the header"
                if len(cols) == len(HEADER) + 1 and len(header) == len(HEADER) else "")
        raise _error(path, line_no, f"expected {expected}, found {len(cols)}; separate columns "
                     "with one tab (not spaces) and keep the tab before an empty aliases column"
                     + hint)
    name, category, english, aliases = cols[:len(HEADER)]
    if not name:
        raise _error(path, line_no, "empty name; every term needs a name in the first column")
    if category not in CATEGORIES:
        raise _error(path, line_no, f"unknown category {category!r} for {name!r}; use one of: "
                     f"{', '.join(CATEGORIES)}")
    if not english:
        raise _error(path, line_no, f"empty English name for {name!r}; fill in the third column")
    alias_list = tuple(a.strip() for a in aliases.split("|") if a.strip())
    weight = cols[len(HEADER)] if len(cols) > len(HEADER) else ""
    return Term(name, category, english, alias_list, _parse_weight(path, line_no, name, weight))


_WEIGHT = re.compile(r"\d+(?:\.\d+)?")


def _parse_weight(path: str, line_no: int, name: str, text: str) -> Fraction:
    """The weight column: empty for 1, else a decimal from 0 to 1, read exactly."""
    if not text:
        return Fraction(1)
    weight = Fraction(text) if _WEIGHT.fullmatch(text) else None
    if weight is None or weight > 1:
        raise _error(path, line_no, f"weight {text!r} for {name!r} is not a decimal number from 0 "
                     "to 1 (such as 0.25, or 0 for a term that never decides a category); leave "
                     "it empty for 1")
    return weight


def _check_unique(path: str, line_no: int, term: Term, seen: dict[str, tuple[int, str]]) -> None:
    """A surface form may belong to one term only (repeats within one term are harmless)."""
    for form in _surface_forms(term):
        key = _surface_key(form)
        if not key:
            raise _error(path, line_no, f"{form!r} in term {term.name!r} is empty after "
                         "normalisation; remove it")
        first = seen.get(key)
        if first is None:
            seen[key] = (line_no, term.name)
        elif first[1] != term.name or first[0] != line_no:
            raise _error(path, line_no, f"{form!r} (in term {term.name!r}) is already used by "
                         f"term {first[1]!r} on line {first[0]}; names, English names and aliases "
                         "must be unique - remove one or merge the two lines")
