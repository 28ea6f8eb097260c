"""A real ZeroMQ server speaking docs/protocol.md, for the TUI's tests and its CPU benchmark.

It binds the daemon's two sockets (PUB telemetry, ROUTER control), publishes what the test tells
it to, keeps the history a snapshot returns, sends a heartbeat every second and answers commands
the way the daemon does (applied at once: there is no training loop). A test can drop a `seq`
(a gap), or close the server and start another with a new pid on the same endpoints (a restart).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import zmq

from shared import protocol


class ProtocolServer:
    def __init__(self, control: str, telemetry: str, pid: int = 1001, run: str = "fake-run",
                 heartbeat_s: float = protocol.HEARTBEAT_INTERVAL, curve_secret_key: bytes | None = None) -> None:
        """`curve_secret_key`: serve CURVE-encrypted (any client that knows the server key gets in)."""
        self.control, self.telemetry, self.pid, self.run = control, telemetry, pid, run
        self.curve_secret_key = curve_secret_key
        self.heartbeat_s = heartbeat_s
        self.seq = 0
        self.status = {"run": run, "state": "training", "step": 0, "total_steps": 100, "epoch": 0.0,
                       "micro_batch_size": 4, "grad_accum": 8, "processes": 1, "pid": pid,
                       "started_at": time.time()}
        self.metrics: list[dict] = []
        self.logs: list[dict] = []
        self.events: list[dict] = []
        self.requests: list[dict] = []
        self.request_times: list[float] = []
        self.snapshots = 0
        self.gpu: dict | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._bound = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @classmethod
    def in_directory(cls, directory: Path, **kwargs) -> ProtocolServer:
        return cls(f"ipc://{directory}/control", f"ipc://{directory}/telemetry", **kwargs)

    def start(self) -> ProtocolServer:
        self._thread.start()
        self._bound.wait(10)
        return self

    def close(self) -> None:
        self._closed.set()
        self._thread.join(10)

    # --- what a test does -------------------------------------------------------------------------

    def publish(self, topic: str, body: dict, skip: bool = False) -> None:
        """Publish one message; `skip` loses it on the wire (its seq is used, nobody receives it)."""
        self._jobs.put((topic, body, skip))

    def publish_raw(self, frames: list[bytes]) -> None:
        """Send frames as they are (garbage), without a seq."""
        self._jobs.put(frames)

    def train_step(self, step: int, loss: float, skip: bool = False, **extra) -> None:
        self.publish("metrics", {"kind": "train", "step": step, "ts": time.time(), "total_steps": 100,
                                 "epoch": step / 50, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens": 4096,
                                 "tokens_per_s": 2048.0, "step_time": 2.0, "samples_seen": step * 32,
                                 "micro_batch_size": self.status["micro_batch_size"],
                                 "grad_accum": self.status["grad_accum"], **extra}, skip=skip)

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until predicate(self) holds; it is checked after every request and publish."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout)

    def commands(self) -> list[str]:
        return [r["cmd"] for r in self.requests]

    # --- the server thread ------------------------------------------------------------------------

    def _serve(self) -> None:
        context = zmq.Context()
        pub, router = context.socket(zmq.PUB), context.socket(zmq.ROUTER)
        pub.linger = router.linger = 0
        for sock in (pub, router) if self.curve_secret_key else ():
            sock.curve_secretkey, sock.curve_server = self.curve_secret_key, True
        pub.bind(self.telemetry)
        router.bind(self.control)
        self._bound.set()
        next_beat = time.monotonic()
        try:
            while not self._closed.is_set():
                if router.poll(10):
                    route, frame = protocol.split_route(router.recv_multipart())
                    router.send_multipart(route + [self._answer(frame, pub)])
                while not self._jobs.empty():
                    job = self._jobs.get()
                    if isinstance(job, list):  # raw frames
                        pub.send_multipart(job)
                    else:
                        self._send(pub, *job)
                if time.monotonic() >= next_beat:
                    next_beat += self.heartbeat_s
                    self._send(pub, "heartbeat", {"state": self.status["state"], "step": self.status["step"],
                                                  "pid": self.pid}, False)
        finally:
            context.destroy(linger=0)

    def _send(self, pub: zmq.Socket, topic: str, body: dict, skip: bool) -> None:
        self.seq += 1
        ts = time.time()
        if topic == "metrics" and body.get("kind") == "train":
            self.metrics.append(body)
            self.status.update({k: body[k] for k in ("step", "epoch", "micro_batch_size", "grad_accum") if k in body})
        elif topic == "log":
            self.logs.append({**body, "ts": ts})
        elif topic == "event":
            self.events.append({**body, "ts": ts})
        elif topic == "state":
            self.status["state"] = body["state"]
        elif topic == "gpu":
            self.gpu = body
        if not skip:
            pub.send_multipart(protocol.encode_message(self.seq, self.run, topic, body, ts=ts))
        with self._changed:
            self._changed.notify_all()

    def _answer(self, frame: bytes, pub: zmq.Socket) -> bytes:
        try:
            request = protocol.decode_request(frame)
        except protocol.ProtocolError as e:
            return protocol.encode_reply(e.id, error=e)
        self.requests.append(request)
        self.request_times.append(time.perf_counter())
        cmd, args, status = request["cmd"], request.get("args") or {}, self.status
        result: dict
        if cmd == "ping":
            result = {"pong": True, "pid": self.pid}
        elif cmd == "status":
            result = dict(status)
        elif cmd == "snapshot":
            self.snapshots += 1
            result = {"seq": self.seq, "run": self.run, "state": status["state"], "status": dict(status),
                      "config": {"model": "builtin:tiny-qwen3"}, "gpu": self.gpu, "metrics": list(self.metrics),
                      "logs": list(self.logs), "events": list(self.events)}
        else:
            result = self._apply(cmd, args, pub)
            if "error" in result:
                return protocol.encode_reply(request["id"], error={"code": "command_failed", "message": result["error"]})
            self._send(pub, "event", {"kind": "command_applied", "command": cmd, **result}, False)
        with self._changed:
            self._changed.notify_all()
        return protocol.encode_reply(request["id"], result=result)

    def _apply(self, cmd: str, args: dict, pub: zmq.Socket) -> dict:
        status, step = self.status, self.status["step"]
        if cmd in ("pause", "resume"):
            previous = status["state"]
            self._send(pub, "state", {"state": "paused" if cmd == "pause" else "training", "previous": previous,
                                      "reason": f"{cmd} at step {step}"}, False)
            return {"step": step, "paused": cmd == "pause"}
        if cmd == "checkpoint":
            return {"step": step, "path": f"runs/{self.run}/checkpoints/checkpoint-{step}"}
        if cmd == "set_batch_size":
            size, per_step = args["micro_batch_size"], status["micro_batch_size"] * status["grad_accum"]
            if args.get("keep_global_batch", True):
                if per_step % size:
                    return {"error": f"micro-batch {size} does not divide the global batch {per_step}"}
                status["grad_accum"] = per_step // size
            status["micro_batch_size"] = size
            return {"step": step, "micro_batch_size": size, "grad_accum": status["grad_accum"],
                    "global_batch": size * status["grad_accum"]}
        if cmd == "stop":
            self._send(pub, "state", {"state": "stopped", "previous": status["state"], "reason": None}, False)
            return {"step": step, "stopping": True}
        return {"error": f"unknown command {cmd}"}


def sample_gpu(step: int = 0, gpus: int = 2, used_gib: float = 61.0) -> dict:
    """A `gpu` body for `gpus` H100s, the trainer's ranks on each."""
    gib = 1 << 30
    return {"has_gpu": True,
            "gpus": [{"index": i, "nvml_index": i, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{i}",
                      "memory_used": int((used_gib + 3 * i) * gib), "memory_total": int(79.6 * gib),
                      "utilization": 97 - 5 * i, "temperature": 71 + 6 * i, "power": 512.0 - 40 * i, "power_limit": 700.0}
                     for i in range(gpus)],
            "host": {"memory_used": 40 * gib, "memory_total": 1000 * gib, "cpu_percent": 230.0, "load_1m": 3.1},
            "ranks": [{"rank": i, "index": i, "allocated": int(38.5 * gib), "reserved": int(52 * gib),
                       "peak": int(50 * gib)} for i in range(gpus)]}


if __name__ == "__main__":  # a server to point `qwen-tui attach --endpoint` at by hand
    import math
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 5555
    server = ProtocolServer(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}", pid=os.getpid()).start()
    print(f"serving on tcp://127.0.0.1:{port}; qwen-tui attach --endpoint tcp://127.0.0.1:{port}", flush=True)
    for step in range(1, 10**6):
        server.train_step(step, 2.5 * math.exp(-step / 300) + 0.5)
        server.publish("gpu", sample_gpu(step))
        server.publish("log", {"level": "INFO", "logger": "qwen_daemon.train.loop", "rank": 0,
                               "message": f"第 {step} 步：损失下降，密钥交换正常 (step {step})"})
        time.sleep(0.5)
