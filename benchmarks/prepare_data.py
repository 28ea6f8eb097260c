"""Benchmark: prepare N synthetic Chinese Q&A records (read, check, normalise, split, tokenise).

    uv run python benchmarks/prepare_data.py [--records 100000] [--num-proc auto]

Writes the records as JSONL into a temporary directory, then times `prepare_data` with an empty
cache (cold) and again with the cache it wrote (warm). Prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

from shared.config import load_config

TOPICS = ["SM4", "AES", "SM3", "SHA-256", "HMAC", "ZUC", "RSA", "SM2", "ECDSA", "TLS 1.3", "GCM", "CBC",
          "ML-KEM", "X.509", "Diffie-Hellman", "差分分析", "侧信道攻击", "随机数发生器", "分组密码", "哈希函数"]
PHRASES = ["它的安全性依赖于", "在实际部署中需要注意", "标准规定了", "与传统方案相比", "常见的错误用法是",
           "攻击者可以利用", "密钥长度决定了", "工作模式影响", "国家密码管理局发布了", "证书链校验时"]


def synthetic_record(i: int, rng: random.Random) -> dict:
    topic = rng.choice(TOPICS)
    other = rng.choice(TOPICS)

    def sentences(n: int) -> str:
        return "".join(f"{rng.choice(PHRASES)}{rng.choice(TOPICS)}的第{rng.randint(1, 999)}项性质，"
                       f"这与{other}不同。" for _ in range(n))

    return {
        "instruction": f"问题 {i}：请说明 {topic} 与 {other} 的区别（场景 {rng.randint(1, 10**6)}）。",
        "output": f"<thinking>\n{sentences(rng.randint(3, 8))}\n</thinking>\n\n{sentences(rng.randint(2, 6))}",
        "difficulty": rng.randint(1, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--num-proc", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from qwen_daemon.train.data import prepare_data
    from qwen_daemon.train.model import load_tokenizer

    tokenizer = load_tokenizer("builtin:qwen3-tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic.jsonl"
        rng = random.Random(0)
        with data.open("w", encoding="utf-8") as f:
            for i in range(args.records):
                f.write(json.dumps(synthetic_record(i, rng), ensure_ascii=False) + "\n")
        cfg = load_config(None, [f"data.paths=[{data}]", "data.max_seq_len=2048", f"data.num_proc={args.num_proc}"])
        t0 = time.perf_counter()
        prepared = prepare_data(cfg, tokenizer, cache_dir=Path(tmp) / "cache")
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepare_data(cfg, tokenizer, cache_dir=Path(tmp) / "cache")
        warm = time.perf_counter() - t0
        report = prepared.report
        print(json.dumps({
            "records": args.records, "bytes": data.stat().st_size, "cores": os.cpu_count(),
            "kept": report.kept, "problems": len(report.problems),
            "tokens": sum(s["tokens"] for s in report.splits.values()),
            "cold_s": round(cold, 1), "warm_s": round(warm, 2),
            "records_per_s": round(args.records / cold),
        }))


if __name__ == "__main__":
    main()
