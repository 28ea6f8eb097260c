"""The data pipeline end to end: every input format reaches the model with exactly the right labels."""

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from shared.config import ConfigError, load_config
from qwen_daemon.train import data as data_mod
from qwen_daemon.train.data import labels_of, prepare_data, split_rows
from qwen_daemon.train.model import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("builtin:qwen3-tokenizer")


@pytest.fixture
def prepare(tokenizer, tmp_path):
    """prepare(paths, **overrides) -> PreparedData, with its own cache directory."""

    def run(paths, *overrides):
        cfg = load_config(None, [f"data.paths={json.dumps([str(p) for p in paths])}", "data.split.train=1.0",
                                 "data.split.validation=0", "data.split.test=0", *overrides])
        return prepare_data(cfg, tokenizer, cache_dir=tmp_path / "cache")

    return run


def all_samples(prepared):
    return {row["id"]: row for ds in prepared.splits.values() for row in ds}


def by_question(prepared):
    return {row["prompt"][-1]["content"]: row for row in all_samples(prepared).values()}


def decode_parts(tokenizer, row):
    ids, n = row["input_ids"], row["prompt_len"]
    labels = labels_of(ids, n)
    assert labels[:n] == [-100] * n
    assert labels[n:] == ids[n:]
    return tokenizer.decode(ids[:n]), tokenizer.decode(ids[n:])


# (question after normalisation, expected prompt tail, reasoning, answer) for each format in good/
EXPECTED = [
    # JSONL, seeds format
    ("SM4 的分组长度是多少？", "<|im_start|>user\nSM4 的分组长度是多少？<|im_end|>\n",
     "SM4 是国家标准分组密码。\n它的分组和密钥都是 128 位。", "SM4 的分组长度是 128 位。"),
    # seeds format with input and system, two <thinking> blocks
    ("比较下面两种工作模式。\n\nECB 与 CBC", "<|im_start|>system\n你是一名密码学专家。<|im_end|>\n<|im_start|>user\n",
     "ECB 独立加密每个分组。\nCBC 把前一个密文分组异或进来。", "CBC 能隐藏明文中的重复模式，ECB 不能。"),
    # nested <think> tags
    ("HMAC 为什么能抵抗长度扩展攻击？", "<|im_start|>user\nHMAC",
     "外层哈希再一次包住了内层结果。", "因为 HMAC 对内层哈希的结果再做一次带密钥的哈希。"),
    # chat messages with reasoning_content and a system turn
    ("什么是前向安全？", "<|im_start|>system\n你是一名密码学专家。<|im_end|>\n<|im_start|>user\n什么是前向安全？",
     "前向安全关心长期私钥泄露后的影响。", "长期私钥泄露后，过去的会话密钥仍然安全。"),
    # two-turn chat: history kept without its reasoning; only the last answer is trained
    ("0-RTT 有什么风险？", "<|im_start|>user\nTLS 1.3 有几次往返？<|im_end|>\n<|im_start|>assistant\n一次往返（1-RTT）。<|im_end|>\n"
     "<|im_start|>user\n0-RTT 有什么风险？",
     "0-RTT 数据没有握手的新鲜性保证。", "0-RTT 数据可能被重放。"),
    # ShareGPT conversations
    ("ZUC 用在哪里？", "<|im_start|>user\nZUC 用在哪里？", "ZUC 是祖冲之算法。", "ZUC 用于 LTE 的 128-EEA3 与 128-EIA3。"),
    # Markdown heading pairs
    ("SM3 的输出是多少位？", "<|im_start|>user\nSM3 的输出是多少位？", "SM3 是国家标准哈希函数。", "SM3 输出 256 位摘要。"),
    # CSV, traditional Chinese (Taiwan usage: 雜湊函數, 訊息) converted to mainland simplified
    ("什么是哈希函数？", "<|im_start|>user\n什么是哈希函数？", "哈希函数把任意长度输入映射为固定长度。",
     "哈希函数把任意长度的消息压缩为固定长度的摘要。"),
]


def test_every_format_is_labelled_exactly_on_the_assistant_output(prepare, tokenizer):
    prepared = prepare([FIXTURES / "good"])
    assert prepared.report.problems == []
    rows = by_question(prepared)
    assert len(rows) == len(EXPECTED)
    for question, prompt_part, reasoning, answer in EXPECTED:
        prompt, labelled = decode_parts(tokenizer, rows[question])
        # The <think> opening is the template's generation prompt: never trained.
        assert prompt.endswith("<|im_start|>assistant\n<think>\n"), prompt
        assert prompt_part in prompt
        assert labelled == f"{reasoning}\n</think>\n\n{answer}<|im_end|>"


def test_parquet_and_arrow_read_like_json(prepare, tokenizer, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "什么是 CTR 模式？", "response": "<think>计数器加密。</think>\n\n把计数器加密后与明文异或。"}])
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    with datasets.arrow_writer.ArrowWriter(path=str(tmp_path / "qa.arrow")) as w:
        w.write_table(datasets.Dataset.from_list([{"query": "什么是 GCM？", "reasoning": "认证加密。",
                                                   "completion": "GCM 是带认证的计数器模式。"}]).data.table)
    rows = by_question(prepare([tmp_path / "qa.parquet", tmp_path / "qa.arrow"]))
    assert decode_parts(tokenizer, rows["什么是 CTR 模式？"])[1] == "计数器加密。\n</think>\n\n把计数器加密后与明文异或。<|im_end|>"
    assert decode_parts(tokenizer, rows["什么是 GCM？"])[1] == "认证加密。\n</think>\n\nGCM 是带认证的计数器模式。<|im_end|>"


def test_record_without_reasoning_gets_an_empty_think_block(prepare, tokenizer, tmp_path):
    (tmp_path / "plain.jsonl").write_text(json.dumps({"question": "DES 的密钥多长？", "answer": "56 位有效密钥。"},
                                                     ensure_ascii=False) + "\n", encoding="utf-8")
    prepared = prepare([tmp_path / "plain.jsonl"])
    (row,) = all_samples(prepared).values()
    assert decode_parts(tokenizer, row)[1] == "\n</think>\n\n56 位有效密钥。<|im_end|>"
    assert prepared.report.without_reasoning == 1


BAD = FIXTURES / "bad"
EXPECTED_PROBLEMS = [  # (file, line, reason pattern, action)
    ("broken_array.json", 3, r"broken JSON", "dropped"),
    ("gbk.jsonl", 2, r"not UTF-8 .*skipped: re-save it as UTF-8", "dropped"),
    ("records.jsonl", 2, r"broken JSON", "dropped"),
    ("records.jsonl", 3, r"unbalanced reasoning tags: <thinking> is never closed", "dropped"),
    ("records.jsonl", 4, r"unbalanced reasoning tags: </thinking>", "dropped"),
    ("records.jsonl", 5, r"empty reasoning", "dropped"),
    ("records.jsonl", 6, r"reasoning without an answer", "dropped"),
    ("records.jsonl", 7, r"empty question", "dropped"),
    ("records.jsonl", 8, r"empty answer", "dropped"),
    ("records.jsonl", 9, r"unrecognised record: .*found keys: text", "dropped"),
    ("records.jsonl", 10, r"expected a JSON object, got list", "dropped"),
    ("records.jsonl", 11, r"duplicate of .*records.jsonl:1 ", "dropped"),
    ("records.jsonl", 12, r"duplicate of .*records.jsonl:1 ", "dropped"),
    ("records.jsonl", 13, r"same question as .*records.jsonl:1 with a different answer", "kept"),
    ("records.jsonl", 14, r"reasoning given twice", "dropped"),
]


def check_problems(problems):
    got = [(Path(p["file"]).name, p["line"], p["reason"], p["action"]) for p in problems]
    assert len(got) == len(EXPECTED_PROBLEMS), "\n".join(map(str, got))
    for (file, line, pattern, action), (gfile, gline, greason, gaction) in zip(EXPECTED_PROBLEMS, got):
        assert (gfile, gline, gaction) == (file, line, action), greason
        assert re.search(pattern, greason), greason


def test_bad_input_every_problem_reported_with_file_line_reason(prepare):
    report = prepare([BAD]).report
    check_problems([vars(p) for p in report.problems])
    records = report.files[str(BAD / "records.jsonl")]
    assert records == {"records": 14, "kept": 2, "dropped": 12, "simplified": 1}  # :12, a traditional duplicate
    assert report.kept == 2  # records.jsonl:1 and :13; a file that is not UTF-8 is skipped whole
    assert report.ignored == [str(BAD / "notes.txt")]


def run_cli(*args, cwd=REPO):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "qwen_daemon", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_data_check_cli_json_and_strict(capsys):
    """The real command in a real process (JSON report), then in this one: --strict turns
    problems into exit 1."""
    from qwen_daemon import cli

    out = run_cli("data", "check", str(BAD), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert (report["kept"], report["dropped"]) == (2, 14)
    check_problems(report["problems"])
    assert cli.main(["data", "check", str(BAD), "--strict"]) == 1
    assert "records.jsonl:3: unbalanced reasoning tags" in capsys.readouterr().out
    assert cli.main(["data", "check", str(FIXTURES / "good"), "--strict"]) == 0
    assert "no problems" in capsys.readouterr().out
    assert cli.main(["data", "check", "no/such/dir"]) == 1
    missing = capsys.readouterr()
    assert "no/such/dir: no such file or directory" in missing.out
    assert "no usable record" in missing.err


def test_bundled_data_set_has_no_problems():
    out = run_cli("data", "check", "data/", "--json", "--strict")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["problems"] == []
    assert report["kept"] >= 240
    categories = Counter()
    for split in report["splits"].values():
        categories.update(split["categories"])
    assert len([c for c in categories if c != "uncategorised"]) >= 10
    # Its traditional files are converted, except the record whose system prompt asks for 繁體中文.
    assert [Path(r).name for r in report["kept_traditional"]] == ["public_key_traditional.jsonl:3"]
    simplified = {Path(name).name: c["simplified"] for name, c in report["files"].items() if name.endswith(".jsonl")}
    assert simplified == {"public_key.jsonl": 0, "public_key_traditional.jsonl": 11, "symmetric.jsonl": 0,
                          "symmetric_traditional.jsonl": 12}
    assert report["vocabulary"]["金鑰->密钥"] > 0


def test_overlong_drop_and_truncate(prepare, tokenizer):
    dropped = prepare([FIXTURES / "good"], "data.max_seq_len=40")
    truncated = prepare([FIXTURES / "good"], "data.max_seq_len=40", "data.overlong=truncate")
    long_ones = [p for p in dropped.report.problems if "too long" in p.reason]
    assert long_ones and all(p.action == "dropped" and "data.overlong: truncate" in p.reason for p in long_ones)
    assert dropped.report.kept == len(EXPECTED) - len(long_ones)
    cut = [p for p in truncated.report.problems if p.action == "truncated"]
    assert truncated.report.truncated == len(cut) > 0
    assert all(len(r["input_ids"]) <= 40 for r in all_samples(truncated).values())
    # A prompt that alone does not fit is dropped even when truncating: nothing left to train on.
    assert all("prompt alone does not fit" in p.reason for p in truncated.report.problems if p.action == "dropped")


def test_preparation_is_cached(prepare, monkeypatch):
    first = prepare([FIXTURES / "good"])
    monkeypatch.setattr(data_mod, "_prepare", lambda *a: pytest.fail("cache not used"))
    again = prepare([FIXTURES / "good"])
    assert again.report.to_dict() == first.report.to_dict()
    assert list(all_samples(again)) == list(all_samples(first))


def test_changed_input_is_prepared_again(prepare, tmp_path):
    src = tmp_path / "d"
    shutil.copytree(FIXTURES / "good", src)
    assert prepare([src]).report.kept == len(EXPECTED)
    (src / "seeds.jsonl").write_text("", encoding="utf-8")
    assert prepare([src]).report.kept == len(EXPECTED) - 3


# --- traditional Chinese -------------------------------------------------------------------------

def write_traditional_data(root: Path) -> tuple[Path, Path]:
    """A JSONL file (a Taiwan record, one that asks for 繁體中文, a simplified one, one whose answer
    has no traditional character of its own) and a Markdown file with traditional labels."""
    records = [
        {"instruction": "什麼是橢圓曲線上的數位簽章？", "output": "用私密金鑰簽章，再以憑證中的公開金鑰驗證。"},
        {"system": "請用繁體中文回答。", "instruction": "什麼是亂數？", "output": "無法預測的數，例如金鑰。"},
        {"instruction": "SM4 的分组长度是多少？", "output": "128 位。"},
        {"instruction": "AES 的區塊長度是幾位元？", "output": "128 位元。"},
    ]
    jsonl = root / "tw.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    markdown = root / "tw.md"
    markdown.write_text("# 雜湊\n\n問：什麼是雜湊？\n答：單向函數。\n", encoding="utf-8")
    return jsonl, markdown


def test_traditional_records_are_converted_whole_unless_they_ask_for_traditional(prepare, tmp_path):
    jsonl, markdown = write_traditional_data(tmp_path)
    prepared = prepare([jsonl, markdown])
    answers = {q: row["answer"] for q, row in by_question(prepared).items()}
    assert answers == {
        "什么是椭圆曲线上的数字签名？": "用私钥签名，再以证书中的公钥验证。",  # tw2sp: 椭圆曲在线, 签章, 凭证
        "什麼是亂數？": "無法預測的數，例如金鑰。",  # asks for traditional: kept as written
        "SM4 的分组长度是多少？": "128 位。",
        "AES 的区块长度是几比特？": "128 比特。",  # the answer converted with its question
        "什么是哈希？": "单向函数。",
    }
    kept = by_question(prepared)["什麼是亂數？"]
    assert kept["prompt"][0] == {"role": "system", "content": "請用繁體中文回答。"}

    report = prepared.report
    assert report.files[str(jsonl)]["simplified"] == 2 and report.files[str(markdown)]["simplified"] == 1
    assert report.kept_traditional == [f"{jsonl}:2"]
    assert report.vocabulary == {"位元->比特": 2, "憑證->证书": 1, "數位簽章->数字签名": 1, "私密金鑰->私钥": 1,
                                 "簽章->签名": 1, "公開金鑰->公钥": 1, "雜湊->哈希": 1}
    text = report.format_text()
    assert f"{jsonl}: 4 records, 4 kept, 0 dropped, 2 converted to simplified" in text
    assert "Taiwan vocabulary replaced: 位元->比特 2, " in text
    assert f"1 record(s) kept in traditional Chinese, as they ask for it: {jsonl}:2" in text


def test_to_simplified_false_keeps_every_record_as_written(prepare, tmp_path):
    jsonl, _ = write_traditional_data(tmp_path)
    prepared = prepare([jsonl], "data.to_simplified=false")
    assert "什麼是橢圓曲線上的數位簽章？" in by_question(prepared)
    assert prepared.report.files[str(jsonl)]["simplified"] == 0
    assert prepared.report.vocabulary == {} and prepared.report.kept_traditional == []


def test_an_opencc_configuration_name_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"data\.to_simplified: OpenCC configuration names are no longer "
                                          r"accepted; write true .* or false .* \(got 'tw2sp'\)"):
        load_config(None, ["data.to_simplified=tw2sp"])


# --- split ------------------------------------------------------------------------------------

def synthetic_rows(n=600):
    cats = ["hash", "block_cipher", "mode", "pki", "protocol", "uncategorised"]
    rows = [{"question_key": f"q{i}", "category": cats[i % len(cats)] if i % 7 else "hash"} for i in range(n)]
    rows += [{"question_key": f"q{i}", "category": rows[i]["category"]} for i in range(0, n, 10)]  # repeated questions
    return rows


def test_split_is_seeded_and_deterministic():
    rows = synthetic_rows()
    ratios = {"train": 0.8, "validation": 0.1, "test": 0.1}
    assert split_rows(rows, ratios, 1) == split_rows(rows, ratios, 1)
    assert split_rows(rows, ratios, 1) != split_rows(rows, ratios, 2)


def test_split_ratios_strata_and_no_question_in_two_splits():
    rows = synthetic_rows()
    ratios = {"train": 0.8, "validation": 0.1, "test": 0.1}
    assignment = split_rows(rows, ratios, 7)
    totals = Counter(assignment)
    for s, r in ratios.items():
        assert abs(totals[s] - r * len(rows)) <= 2, totals
    where = {}
    for row, s in zip(rows, assignment):
        assert where.setdefault(row["question_key"], s) == s
    for cat in {r["category"] for r in rows}:
        n = sum(r["category"] == cat for r in rows)
        per = Counter(s for r, s in zip(rows, assignment) if r["category"] == cat)
        for s, r in ratios.items():
            assert abs(per[s] - r * n) <= 2, (cat, per)


def test_zero_ratio_split_is_empty():
    assignment = split_rows(synthetic_rows(50), {"train": 0.9, "validation": 0.1, "test": 0.0}, 0)
    assert "test" not in assignment


def test_report_shows_distribution_per_split(tokenizer, tmp_path):
    cfg = load_config(None, ["data.paths=[data/crypto_qa]", "data.max_seq_len=1024"])
    report = prepare_data(cfg, tokenizer, cache_dir=tmp_path).report
    for name in ("train", "validation", "test"):
        s = report.splits[name]
        assert s["records"] > 0 and sum(s["categories"].values()) == s["records"]
        assert s["label_tokens"] < s["tokens"]
    assert report.splits["train"]["top_terms"]
    # Per-record statistics travel with the prepared samples.
    prepared = prepare_data(cfg, tokenizer, cache_dir=tmp_path)
    sm4 = [r for r in prepared.splits["train"] if "SM4" in r["prompt"][-1]["content"]]
    assert sm4 and all(any(t["term"] == "SM4" and t["count"] >= 1 for t in r["terms"]) for r in sm4)
    assert "validation:" in report.format_text()
    # The bundled traces recall, derive and check: none short, none missing the answer's facts.
    thinking = report.thinking
    assert thinking["warned"] == 0 and not thinking["boilerplate"], thinking["warnings"][:3]
    assert all(f["with_trace"] == f["records"] and f["facts_reached"] > 0.9 for f in thinking["files"].values())
    assert "no short trace" in report.format_text()
