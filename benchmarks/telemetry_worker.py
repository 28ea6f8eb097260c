"""A synthetic trainer worker for benchmarks/telemetry.py: floods the supervisor with metrics
through the real worker telemetry path (queue -> sender thread -> PUSH), each stamped with the
time it was handed to the sink, at RATE per second for SECONDS, then exits as finished."""

import os
import sys
import time

import zmq

from qwen_daemon import wire, worker

RATE, SECONDS = int(os.environ.get("BENCH_RATE", 200)), float(os.environ.get("BENCH_SECONDS", 10))

context = zmq.Context()
telemetry = worker.Telemetry(context, os.environ[wire.TELEMETRY_ENV])
sink = worker.TelemetrySink(telemetry)
sink.event("train_start", step=0)
start = time.perf_counter()
for step in range(1, int(RATE * SECONDS) + 1):
    while time.perf_counter() - start < step / RATE:
        pass  # keep the rate without sleeping past it
    sink.metrics({"kind": "train", "step": step, "total_steps": int(RATE * SECONDS), "loss": 1.0, "lr": 1e-4,
                  "grad_norm": 0.5, "tokens": 8192, "tokens_per_s": 10000.0, "sent": time.time()})
telemetry.close()
context.term()
sys.exit(wire.EXIT_FINISHED)
