"""Reasoning-trace quality: short traces, traces that miss the answer's facts, copies, boilerplate."""

import json

from qwen_daemon.train import traces
from qwen_daemon.train.data import prepare_data
from qwen_daemon.train.model import load_tokenizer
from shared.config import load_config


def row(i, reasoning, answer, tokens, answer_tokens, facts=0, missing=(), file="a.jsonl"):
    return {"id": f"{file}:{i}", "file": file, "reasoning": reasoning, "answer": answer, "thinking_tokens": tokens,
            "answer_tokens": answer_tokens, "facts": facts, "missing": list(missing)}


def test_the_section_says_why_each_trace_is_worth_rewriting():
    shared = "这是一个在很多记录里重复出现的开场白句子"
    rows = [row(1, "简短。", "答", 10, 12),                                      # short
            row(2, "长" * 300, "答" * 900, 300, 900),                             # under half the answer
            row(3, "推导" * 100, "SM4 128", 200, 50, facts=4, missing=["128", "SM4", "32"]),  # 1 of 4 facts
            row(4, "推导" * 100, "SM4 128", 200, 50, facts=4, missing=["128"]),  # fine, but a copy of 3
            row(5, None, "没有推理", None, 10),                                    # no trace: not "short"
            *[row(6 + i, f"{shared}。然后第{i}步的推导，核对结果{i}。" * 8, "答", 200, 50) for i in range(3)]]
    section = traces.quality_section(rows, min_tokens=128)
    why = {w["id"]: " | ".join(w["why"]) for w in section["warnings"]}
    assert "< data.min_thinking_tokens 128" in why["a.jsonl:1"] and "under half" not in why["a.jsonl:1"]
    assert "under half the answer's 900" in why["a.jsonl:2"]
    assert "reaches 1 of the answer's 4 key facts (missing: 128, SM4, 32)" in why["a.jsonl:3"]
    assert why["a.jsonl:4"] == "same trace as a.jsonl:3"
    assert "a.jsonl:5" not in why and section["warned"] == 4
    f = section["files"]["a.jsonl"]
    assert (f["records"], f["with_trace"], f["short"], f["facts_missing"], f["copies"]) == (8, 7, 2, 1, 1)
    assert section["boilerplate"] == [[shared, "a.jsonl:6", 3]]


def test_key_facts_are_numbers_and_terms_not_list_markers():
    assert traces.numbers_of("1. 分组 128 比特，2. 共 32 轮，版本 1.3，第 3 步") == {"128", "32", "1.3"}
    figures = traces.record_figures("回忆：分组 128 比特", "SM4 分组 128 比特，32 轮", {"分组"}, {"SM4", "分组"})
    assert figures == {"facts": 4, "missing": ["32", "SM4"]}


def test_data_check_reports_a_short_trace_by_file_and_line(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"instruction": "SM4 的分组长度？", "output": "<think>\n想想。\n</think>\n\nSM4 分组长度 128 比特，32 轮。"},
        {"instruction": "SM3 的输出？", "output": "256 比特。"}]), encoding="utf-8")
    cfg = load_config(None, [f"data.paths=[{data}]", "data.split.train=1.0", "data.split.validation=0",
                             "data.split.test=0", "data.min_thinking_tokens=16"])
    report = prepare_data(cfg, load_tokenizer("builtin:qwen3-tokenizer"), cache_dir=tmp_path / "cache").report
    text = report.format_text()
    assert "reasoning traces (data.min_thinking_tokens 16):" in text
    assert f"{data}: 1 of 2 with a trace" in text and "1 short" in text
    assert f"{data}:1: trace of 2 tokens < data.min_thinking_tokens 16" in text
    assert "key facts (missing: 128, 32, SM4, 分组长度)" in text
    assert report.to_dict()["thinking"]["warned"] == 1
