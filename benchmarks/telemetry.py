"""Benchmark the telemetry and control path of the daemon.

    uv run python benchmarks/telemetry.py

1. latency: a real supervisor process with a synthetic worker (benchmarks/telemetry_worker.py)
   that sends 200 metrics a second for 10 s through the real worker path; a subscriber on the IPC
   PUB socket measures sent -> received. A second subscriber never reads (a stalled client).
2. overhead: the cost of one TelemetrySink.metrics() call in the training thread, against the
   step time of the 4B model on an H100 (docs/benchmarks.md: about 2.3 s per step at 4 x 2048
   tokens, accumulation 4).
3. snapshot: a supervisor holding a 100,000-step history (plus 1,000 evals, 500 logs, 500 events):
   time to build and encode the snapshot reply, and its size.
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared import protocol  # noqa: E402
from shared.config import load_config  # noqa: E402


def latency() -> dict:
    run = Path(tempfile.mkdtemp()) / "bench"
    run.mkdir()
    cfg = load_config(REPO / "configs" / "demo.yaml", ["run.name=bench"])
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "benchmarks")]),
           "QWEN_DAEMON_WORKER_MODULE": "telemetry_worker"}
    proc = subprocess.Popen([sys.executable, "-m", "qwen_daemon.supervisor", str(run)], env=env,
                            stdout=subprocess.PIPE, text=True)
    _, control, telemetry = proc.stdout.readline().split()
    context = zmq.Context()
    sub, stalled = context.socket(zmq.SUB), context.socket(zmq.SUB)
    for s in (sub, stalled):
        s.setsockopt(zmq.SUBSCRIBE, b"")
        s.connect(telemetry)
    latencies, seqs = [], []
    while True:
        if not sub.poll(30_000):
            break
        m = protocol.decode_message(sub.recv_multipart())
        seqs.append(m["seq"])
        if m["topic"] == "metrics":
            latencies.append((time.time() - m["body"]["sent"]) * 1000)
        if m["topic"] == "state" and m["body"]["state"] in protocol.FINAL_STATES:
            break
    proc.wait(60)
    context.destroy(linger=0)
    latencies.sort()
    gaps = sum(1 for a, b in zip(seqs, seqs[1:]) if b != a + 1)
    return {"metrics_received": len(latencies), "latency_ms_p50": statistics.median(latencies),
            "latency_ms_p99": latencies[int(0.99 * len(latencies))], "latency_ms_max": latencies[-1],
            "seq_gaps": gaps}


def overhead() -> dict:
    from qwen_daemon import worker

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    telemetry = worker.Telemetry(context, f"tcp://127.0.0.1:{port}")
    sink = worker.TelemetrySink(telemetry)
    record = {"kind": "train", "step": 1, "loss": 1.0, "lr": 1e-4, "grad_norm": 0.5, "tokens": 8192,
              "tokens_per_s": 1e4, "micro_batch_size": 4, "grad_accum": 4, "gpu_allocated": 5.6}
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        sink.metrics(record)
    per_call = (time.perf_counter() - start) / n
    telemetry.close()
    context.destroy(linger=0)
    step_s = 2.3  # 4B on an H100, docs/benchmarks.md
    return {"sink_call_us": per_call * 1e6, "per_step_overhead_fraction": per_call / step_s}


def snapshot() -> dict:
    from qwen_daemon.supervisor import Supervisor

    sup = Supervisor.__new__(Supervisor)  # the state a long run accumulates, without sockets
    sup.cfg = load_config(REPO / "configs" / "qwen3-4b-thinking.yaml", ["run.name=long"])
    sup.state, sup.step, sup.seq, sup.started_at = "training", 100_000, 500_000, time.time()
    sup.metrics = []
    for step in range(1, 100_001):
        sup.metrics.append({"kind": "train", "ts": 1.7e9 + step, "step": step, "total_steps": 100_000,
                            "epoch": step / 1000, "loss": 1.0 / step, "lr": 1e-4, "grad_norm": 0.5,
                            "tokens": 32768, "tokens_per_s": 14000.0, "step_time": 2.3,
                            "samples_seen": step * 64, "micro_batch_size": 4, "grad_accum": 4,
                            "gpu_allocated": 5.6, "gpu_reserved": 6.3, "gpu_peak": 6.0})
        if step % 100 == 0:
            sup.metrics.append({"kind": "eval", "ts": 1.7e9 + step, "step": step, "eval_loss": 1.0 / step})
    sup.logs = [{"level": "INFO", "logger": "x", "message": "step ..." * 10, "rank": 0}] * 500
    sup.events = [{"kind": "checkpoint", "step": s, "path": f"runs/long/checkpoints/checkpoint-{s}"}
                  for s in range(500)]
    start = time.perf_counter()
    reply = protocol.encode_reply(1, result=sup.read_only("snapshot"))
    elapsed = time.perf_counter() - start
    return {"snapshot_ms": elapsed * 1000, "snapshot_bytes": len(reply)}


if __name__ == "__main__":
    print(json.dumps({**snapshot(), **overhead(), **latency()}))
