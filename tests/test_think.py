"""data think: traces by the model, kept when its answer agrees, in the file's own format, resumable."""

import json
from pathlib import Path

import pytest

from qwen_daemon.cli import main
from qwen_daemon.train.model import load_tokenizer
from qwen_daemon.train.readers import read_file
from qwen_daemon.train.think import ThinkError, think
from shared.config import load_config

REPO = Path(__file__).resolve().parents[1]
TRACE = "先回忆 SM4 的参数：国家标准 GB/T 32907-2016 规定分组长度 128 比特，密钥长度 128 比特，32 轮。核对：与 AES-128 的分组长度相同。"

RECORDS = {  # question -> answer
    "SM4 的分组长度是多少？": "SM4 的分组长度为 128 比特，密钥长度也是 128 比特，共 32 轮。",
    "SM3 的输出长度是多少？": "SM3 的输出长度为 256 比特。",
    "AES 有几种密钥长度？": "AES 有 128、192 和 256 比特三种密钥长度。",
}


def write_inputs(root: Path) -> dict[str, bytes]:
    """Three formats, each with a record that has no trace and one whose trace is short."""
    (root / "in").mkdir()
    q = list(RECORDS)
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [
        {"instruction": q[0], "output": f"<thinking>\n看参数。\n</thinking>\n\n{RECORDS[q[0]]}", "difficulty": 1},
        {"instruction": q[1], "output": RECORDS[q[1]]}])
    chat = json.dumps([{"messages": [{"role": "user", "content": q[2]},
                                     {"role": "assistant", "content": RECORDS[q[2]]}]},
                       {"messages": [{"role": "user", "content": q[0]},
                                     {"role": "assistant", "content": RECORDS[q[0]], "reasoning_content": "短。"}]}],
                      ensure_ascii=False, indent=2)
    md = f"# 题集\n\n## 问题\n{q[1]}\n\n## 答案\n{RECORDS[q[1]]}\n\n---\n\n## 问题\n{q[2]}\n\n## 答案\n" \
         f"<think>\n想想。\n</think>\n\n{RECORDS[q[2]]}\n"
    files = {"a.jsonl": jsonl, "b.json": chat, "sub/c.md": md}
    for name, text in files.items():
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "in" / name).write_text(text, encoding="utf-8")
    return {name: (root / "in" / name).read_bytes() for name in files}


class StandIn:
    """The model's part: a long trace, then the record's own answer (or a wrong one for SM3)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts):
        self.calls += len(prompts)
        out = []
        for p in prompts:
            question = p[-1]["content"]
            answer = "不知道。" if question.startswith("SM3") else RECORDS[question]
            out.append(f"{TRACE}\n</think>\n\n{answer}<|im_end|>")
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:qwen3-tokenizer")


def test_accepted_traces_land_in_each_format_and_a_second_call_continues(tmp_path, tokenizer):
    originals = write_inputs(tmp_path)
    cfg = load_config(None, ["data.min_thinking_tokens=20", "eval.batch_size=2"])
    model = StandIn()
    first = think(cfg, [str(tmp_path / "in")], tmp_path / "out", generate=model, tokenizer=tokenizer, limit=3)
    assert first["needed"] == 6 and first["generated"] == 3 and first["remaining"] == 3 and model.calls == 3
    second = think(cfg, [str(tmp_path / "in")], tmp_path / "out", generate=model, tokenizer=tokenizer)
    assert second["generated"] == 3 and second["remaining"] == 0 and model.calls == 6  # only the rest
    assert second["accepted"] == 4 and second["review"] == 2  # the two SM3 answers disagree

    for name, data in originals.items():  # the user's files are untouched
        assert (tmp_path / "in" / name).read_bytes() == data
    for name in originals:
        convs, problems = read_file(tmp_path / "out" / name)
        assert not problems and len(convs) == 2
        for c in convs:
            question = c.prompt[-1]["content"]
            assert c.answer == RECORDS[question]  # the record's own answer stays
            assert (c.reasoning == TRACE) == (not question.startswith("SM3")), (name, c)
    jsonl = [json.loads(line) for line in (tmp_path / "out" / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert jsonl[0]["difficulty"] == 1 and jsonl[0]["output"].startswith("<thinking>\n")  # its own tag, fields kept
    assert "reasoning_content" in json.loads((tmp_path / "out" / "b.json").read_text(encoding="utf-8"))[0]["messages"][1]
    md = (tmp_path / "out" / "sub" / "c.md").read_text(encoding="utf-8")
    assert md.startswith("# 题集\n\n## 问题\n") and md.count("<think>") == 1  # SM3's record (no trace) left as it was

    review = [json.loads(line) for line in (tmp_path / "out" / "review.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["question"] for r in review} == {"SM3 的输出长度是多少？"}
    assert all("disagrees" in " ".join(r["why"]) and r["answer"] == "不知道。" for r in review)


def test_data_think_runs_on_the_tiny_model(tmp_path, capsys):
    """The real path: the demo's tiny model generates (nonsense, so every record goes to review)."""
    originals = write_inputs(tmp_path)
    args = ["data", "think", str(tmp_path / "in" / "a.jsonl"), "--out", str(tmp_path / "out"),
            "--config", str(REPO / "configs" / "demo.yaml"), "--set", "eval.max_new_tokens=8"]
    assert main(args) == 0
    assert "2 needing a trace; generated 2 now, 0 accepted, 2 for review" in capsys.readouterr().out
    review = [json.loads(line) for line in (tmp_path / "out" / "review.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(review) == 2 and all(r["thinking"] or r["answer"] for r in review)  # something was generated
    assert (tmp_path / "out" / "a.jsonl").read_bytes() == originals["a.jsonl"]  # nothing accepted: a plain copy
    assert (tmp_path / "in" / "a.jsonl").read_bytes() == originals["a.jsonl"]
    assert main(args) == 0  # again: all done, nothing generated
    assert "generated 0 now" in capsys.readouterr().out


def test_data_think_refuses_to_write_over_the_inputs_or_an_unsupported_format(tmp_path, tokenizer):
    write_inputs(tmp_path)
    cfg = load_config(None, [])
    with pytest.raises(ThinkError, match="would overwrite the input file"):
        think(cfg, [str(tmp_path / "in" / "a.jsonl")], tmp_path / "in", generate=StandIn(), tokenizer=tokenizer)
    with pytest.raises(ThinkError, match="is inside the input directory"):
        think(cfg, [str(tmp_path / "in")], tmp_path / "in" / "thought", generate=StandIn(), tokenizer=tokenizer)
    (tmp_path / "in" / "d.csv").write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(ThinkError, match="d.csv: data think writes JSON, JSON Lines and Markdown"):
        think(cfg, [str(tmp_path / "in")], tmp_path / "out", generate=StandIn(), tokenizer=tokenizer)
