"""Shared pytest fixtures."""

import json
import os
from pathlib import Path

import pytest

from shared.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def builtin_cache_dir():
    """Point the builtin model/tokenizer cache at ``<repo>/.cache/test-builtins``.

    The builds take seconds, so they are shared by all tests of a session and kept between
    runs (``.cache/`` is git-ignored). An explicitly set ``QWEN_DAEMON_CACHE`` wins.
    """
    from qwen_daemon.train.builtin import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    if not previous:
        os.environ[CACHE_ENV] = str(REPO_ROOT / ".cache" / "test-builtins")
    yield Path(os.environ[CACHE_ENV])
    if not previous:
        os.environ.pop(CACHE_ENV, None)


def make_run_dir(tmp_path: Path, *settings: str) -> Path:
    """A run directory for the tiny model on 40 Chinese records: 40 steps, eval and checkpoints
    every 5, with `settings` on top."""
    data = tmp_path / "qa.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"instruction": f"第 {i} 题：SM4 与 AES 有何不同？",
                                "output": f"<thinking>\n比较分组长度和轮数，第 {i} 次。\n</thinking>\n\n都用 128 位分组 {i}。"},
                               ensure_ascii=False) + "\n")
    cfg = load_config(REPO_ROOT / "configs" / "demo.yaml", [
        f"run.runs_root={tmp_path}", "run.name=d", f"data.paths=[{data}]", "data.max_seq_len=128",
        f"data.terms={REPO_ROOT / 'data' / 'crypto_terms.tsv'}",
        "train.max_steps=40", "train.micro_batch_size=2", "train.grad_accum=2", "train.eval_every_steps=5",
        "checkpoint.every_steps=5", "train.inference_check_tokens=8", "eval.at_end=false", *settings])
    run = tmp_path / "d"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    return run


@pytest.fixture
def run_dir(tmp_path):
    return make_run_dir(tmp_path)
