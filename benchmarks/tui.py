"""Benchmark the TUI: CPU under a metric storm, key latency, chart drawing at 100 and 100,000 steps.

    uv run python benchmarks/tui.py [--seconds 30]

1. cpu: `qwen-tui attach --endpoint tcp://127.0.0.1:PORT` runs in a real terminal (tmux, 160x48)
   against a server speaking the protocol (tests/protocol_server.py) that publishes 20 metric
   records, 5 log lines, one `gpu` sample and one heartbeat a second; the TUI process's CPU time
   (/proc/PID/stat) over the window, as a share of one core. Also with heartbeats only (idle).
2. keys: `p` sent through tmux 40 times (pause, resume, ...): time from the key to the command's
   arrival at the server.
3. chart: MetricChart's replot plus render in a 160x48 screen for 100, 10,000 and 100,000 steps of
   the same noisy curve (headless app).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from protocol_server import ProtocolServer, sample_gpu  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storm(server: ProtocolServer, seconds: float, rate: int, start_step: int) -> int:
    """Publish `rate` metric records a second (plus logs and gpu) for `seconds`."""
    step, began = start_step, time.monotonic()
    while (elapsed := time.monotonic() - began) < seconds:
        step += 1
        server.train_step(step, 2.0 * math.exp(-step / 2000) + 0.5 + 0.1 * math.sin(step))
        if step % max(1, rate // 5) == 0:
            server.publish("log", {"level": "INFO", "logger": "qwen_daemon.train.loop", "rank": 0,
                                   "message": f"第 {step} 步：损失正常 step {step}"})
        if step % rate == 0:
            server.publish("gpu", sample_gpu(step))
        time.sleep(max(0.0, (step - start_step) / rate - elapsed))
    return step


def measure_terminal(seconds: float) -> dict:
    port = free_port()
    server = ProtocolServer(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}", pid=os.getpid()).start()
    server.status["total_steps"] = 10**6
    tmux = ["tmux", "-L", f"qwen-bench-{os.getpid()}"]
    command = f"{sys.executable} -m qwen_tui attach --endpoint tcp://127.0.0.1:{port}"
    try:
        subprocess.run([*tmux, "new-session", "-d", "-s", "tui", "-x", "160", "-y", "48", "-e", f"PYTHONPATH={REPO}",
                        command], check=True)
        server.wait_for(lambda s: "snapshot" in s.commands(), timeout=60)
        pid = int(subprocess.run(["pgrep", "-f", command], capture_output=True, text=True).stdout.split()[0])
        step = storm(server, 5, 20, 0)  # warm up: imports, first layout, a filled chart

        before, wall = cpu_seconds(pid), time.monotonic()
        step = storm(server, seconds, 20, step)
        busy = (cpu_seconds(pid) - before) / (time.monotonic() - wall)

        before, wall = cpu_seconds(pid), time.monotonic()
        time.sleep(seconds / 2)  # heartbeats only
        idle = (cpu_seconds(pid) - before) / (time.monotonic() - wall)

        latencies, tmux_cost = [], []
        for i in range(40):
            count = len(server.requests)
            sent = time.perf_counter()
            subprocess.run([*tmux, "send-keys", "-t", "tui", "p"], check=True)
            tmux_cost.append(time.perf_counter() - sent)
            assert server.wait_for(lambda s: len(s.requests) > count, timeout=10), "no command arrived"
            latencies.append(server.request_times[count] - sent)
            wanted = "paused" if i % 2 == 0 else "training"
            deadline = time.monotonic() + 5
            while f"● {wanted}" not in subprocess.run([*tmux, "capture-pane", "-p", "-t", "tui"],
                                                      capture_output=True, text=True).stdout:
                assert time.monotonic() < deadline, f"the TUI did not show {wanted}"
                time.sleep(0.05)
        return {"metrics_per_s": 20, "steps_published": step, "cpu_core_share_storm": round(busy, 4),
                "cpu_core_share_idle": round(idle, 4), "key_to_command_ms_median": round(1000 * statistics.median(latencies), 1),
                "key_to_command_ms_p95": round(1000 * statistics.quantiles(latencies, n=20)[-1], 1),
                "key_to_command_ms_max": round(1000 * max(latencies), 1),
                "tmux_send_keys_ms_median": round(1000 * statistics.median(tmux_cost), 1)}
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        server.close()


def measure_chart() -> dict:
    from qwen_tui.app import QwenTUI
    from qwen_tui.client import RunView
    from qwen_tui.widgets.chart import MetricChart

    async def draw(steps: int) -> float:
        noise, view = random.Random(0), RunView(connection="live")
        for s in range(1, steps + 1):  # the same curve whatever the length: a decay with noise
            loss = 2 * math.exp(-3 * s / steps) + 0.5 + 0.2 * noise.random()
            view.apply("metrics", {"kind": "train", "step": s, "ts": float(s), "loss": loss,
                                   "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1e4})
        app = QwenTUI(view=view)
        async with app.run_test(size=(160, 48)):
            chart = app.query_one(MetricChart)
            times = []
            for _ in range(20):
                began = time.perf_counter()
                chart.replot(force=True)
                chart._drawn = None
                chart.render()
                times.append(time.perf_counter() - began)
        return 1000 * statistics.median(times)

    return {f"chart_draw_ms_{n}_steps": round(asyncio.run(draw(n)), 1) for n in (100, 10_000, 100_000)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    result = measure_chart()
    if shutil.which("tmux"):
        result.update(measure_terminal(args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
