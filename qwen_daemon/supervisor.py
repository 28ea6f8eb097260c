"""The supervisor: owns one run, its sockets, its state and its worker; never runs the model.

    python -m qwen_daemon.supervisor RUN_DIR [--resume]

One thread, one poll loop (the ZeroMQ guide's style): client requests on the ROUTER socket,
worker telemetry (command replies included) on a PULL socket, commands to rank 0 on a PAIR socket
(frames: qwen_daemon/wire.py), and a tick every second for the `gpu` and `heartbeat` topics.
Everything published goes through `publish`, which also keeps the history that `snapshot`
returns, so a snapshot is exactly the messages up to its seq.

A worker that dies (killed, segfault) is restarted from the newest valid checkpoint up to
`daemon.max_restarts` times, each restart an event; then the run is `failed`. A worker that exits with
wire.EXIT_FAILED has reported why (bad data, an OOM at micro-batch 1) and is not restarted.
SIGTERM/SIGINT: the worker is told to stop at the next step boundary with a checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from shared import batchsize, protocol, runs
from shared.config import load_config
from qwen_daemon import gpu, launch, retained, wire

log = logging.getLogger("qwen_daemon.supervisor")

STATUS_FIGURES = ("total_steps", "epoch", "micro_batch_size", "grad_accum", "processes")
KEEP_LOGS = 500
KEEP_EVENTS = 500


def socket_dir(run_dir: Path) -> Path:
    """A private (0700) directory for the run's IPC sockets, with a short path (IPC paths are
    limited to ~100 bytes)."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"qwen-daemon-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    if base.stat().st_uid != os.getuid() or base.stat().st_mode & 0o077:
        raise RuntimeError(f"{base} is not a private directory of this user; remove it and start again")
    path = base / hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name or an interface: treat as exposed


def generate_keys(directory: Path, client: str = "client") -> dict[str, Path]:
    """CURVE keys for daemon.curve_keys_dir: the server's pair, one client's pair, and the client's
    public key in authorized/ (copy client.key_secret to the client machine; add more clients by
    putting their .key files into authorized/)."""
    from zmq import auth as zmq_auth

    authorized = directory / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    server_public, server_secret = zmq_auth.create_certificates(str(directory), "server")
    client_public, client_secret = zmq_auth.create_certificates(str(directory), client)
    (authorized / Path(client_public).name).write_bytes(Path(client_public).read_bytes())
    return {"server": Path(server_secret), "client": Path(client_secret)}


class Supervisor:
    def __init__(self, run_dir: Path, resume: bool = False, foreground: bool = False) -> None:
        self.run_dir = run_dir
        self.foreground = foreground  # echo the worker's log lines to this terminal
        self.cfg = load_config(run_dir / runs.CONFIG)
        self.resume = resume
        sockets = socket_dir(run_dir)
        self.endpoints = {name: f"ipc://{sockets / name}" for name in
                          ("control", "telemetry", "worker-telemetry", "worker-control")}
        self.context = zmq.Context()
        self.state = "starting"
        self.seq = 0
        self.gpu: dict | None = None  # the last `gpu` body, for snapshots
        self.step = 0
        self.metrics: list[dict] = []
        self.figures: dict[str, Any] = {}  # for `status`, see note_figures
        if resume:  # the history so far, so that a snapshot after `start --resume` shows the whole run
            for record in runs.read_jsonl(run_dir / runs.METRICS):
                self.add_metric(record)
        self.logs: collections.deque = collections.deque(maxlen=KEEP_LOGS)
        self.events: collections.deque = collections.deque(maxlen=KEEP_EVENTS)
        self.replies = retained.ReplyCache()
        self.forwarded: dict[int, tuple] = {}  # internal id -> (route, request id, cmd, client socket)
        self.next_id = 0
        self.restarts = 0
        self.processes, self.backend = launch.processes(self.cfg), launch.backend(self.cfg)
        self.reported: set[str] = set()  # what the current worker (group) said of its end: error, stopped
        self.stopping = False
        self.worker: subprocess.Popen | None = None
        self.started_at = time.time()
        self.sampler = gpu.Sampler()
        self.ranks: dict[int, dict] = {}  # rank -> torch memory figures from the workers
        self.before_detour = "training"

    # --- sockets and files ---------------------------------------------------------------------

    def bind(self) -> None:
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 10_000)  # a stalled subscriber loses messages, never blocks us
        self.pub.bind(self.endpoints["telemetry"])
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.bind(self.endpoints["control"])
        self.pull = self.context.socket(zmq.PULL)
        self.pull.bind(self.endpoints["worker-telemetry"])
        self.pair = None  # one per worker group: see spawn
        self.to_worker: list[bytes] = []  # requests rank 0 has not taken yet
        self.pubs, self.routers = [self.pub], [self.router]
        self.tcp = self.bind_tcp()

    def bind_tcp(self) -> list[dict[str, Any]]:
        """`daemon.listen` TCP endpoints, on sockets of their own (CURVE applies per socket, and the
        private IPC sockets stay open to local clients). tcp://HOST:PORT = control at PORT,
        telemetry at PORT+1. Loopback may go without keys; any other address needs CURVE."""
        listen, keys = self.cfg.daemon.listen, self.cfg.daemon.curve_keys_dir
        if not listen:
            return []
        hosts = [(e, *e.removeprefix("tcp://").rsplit(":", 1)) for e in listen]
        exposed = [e for e, host, _ in hosts if not is_loopback(host)]
        if exposed and not keys:
            raise RuntimeError(f"daemon.listen has non-loopback endpoints {exposed} but no daemon.curve_keys_dir: "
                               "anyone on the network could steer the run. Create keys with `qwen-daemon keys "
                               "generate DIR` and set daemon.curve_keys_dir, or listen on 127.0.0.1 only")
        pub, router = self.context.socket(zmq.PUB), self.context.socket(zmq.ROUTER)
        pub.setsockopt(zmq.SNDHWM, 10_000)
        router.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if keys:
            from zmq import auth as zmq_auth
            from zmq.auth.thread import ThreadAuthenticator

            keys = Path(keys)
            self.auth = ThreadAuthenticator(self.context)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(keys / "authorized"))
            public, secret = zmq_auth.load_certificate(str(keys / "server.key_secret"))
            for sock in (pub, router):
                sock.curve_server, sock.curve_publickey, sock.curve_secretkey = True, public, secret
        bound = []
        for _, host, port in hosts:
            router.bind(f"tcp://{host}:{port}")
            pub.bind(f"tcp://{host}:{int(port) + 1}")
            bound.append({"control": f"tcp://{host}:{port}", "telemetry": f"tcp://{host}:{int(port) + 1}",
                          "curve": bool(keys)})
        self.pubs.append(pub)
        self.routers.append(router)
        return bound

    def write_daemon_json(self) -> None:
        info = {"pid": os.getpid(), "state": self.state, "protocol": protocol.VERSION, "started_at": self.started_at,
                "run": self.cfg.run.name, "endpoints": {"control": self.endpoints["control"],
                                                        "telemetry": self.endpoints["telemetry"],
                                                        "tcp": getattr(self, "tcp", [])}}
        runs.write_text_atomic(self.run_dir / runs.DAEMON_JSON, json.dumps(info, indent=2))

    # --- publishing and state --------------------------------------------------------------------

    def publish(self, topic: str, body: dict[str, Any]) -> None:
        self.seq += 1
        now = time.time()
        if topic == "metrics":
            self.add_metric(body)
            self.step = body.get("step", self.step)
        elif topic == "log":
            self.logs.append({"ts": now, **body})  # the snapshot's lines carry their time
        elif topic == "event":
            self.events.append({"ts": now, **body})
            if body.get("kind") in batchsize.BATCH_EVENTS:
                self.note_figures(body)
        elif topic == "gpu":
            self.gpu = body
        try:
            frames = protocol.encode_message(self.seq, self.cfg.run.name or "", topic, body, ts=now)
        except protocol.ProtocolError as e:
            log.debug("not published (%s): %s", topic, e)
            return
        for pub in self.pubs:
            try:
                pub.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass

    def add_metric(self, record: dict[str, Any]) -> None:
        """Append to the history; a train record that redoes a step (after a restart or a resume
        from a checkpoint) first drops the records of that step and after."""
        if record.get("kind") == "train":
            while self.metrics and self.metrics[-1].get("step", 0) >= record.get("step", 0):
                self.metrics.pop()
            self.note_figures(record)
        self.metrics.append(record)

    def note_figures(self, body: dict[str, Any]) -> None:
        """What `status` reports: the last train record's figures, and a batch size as soon as a
        command or an OOM recovery changed it (the next record comes a step later)."""
        self.figures.update({k: body[k] for k in STATUS_FIGURES if body.get(k) is not None})

    def set_state(self, state: str, reason: str = "") -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        log.info("state %s -> %s %s", previous, state, reason)
        self.publish("state", {"state": state, "previous": previous, "reason": reason})
        self.events.append({"kind": "state", "state": state, "previous": previous, "reason": reason,
                            "ts": time.time()})
        self.write_daemon_json()

    # --- the worker --------------------------------------------------------------------------------

    def spawn(self, resume: bool) -> None:
        # A PAIR takes one peer at a time and only lets go of a dead one when its own thread
        # notices: each worker group gets a socket of its own, so a restarted rank 0 always gets in.
        if self.pair is not None:
            self.pair.close(linger=0)
        control = f"{self.endpoints['worker-control']}-{self.restarts}"
        self.pair = self.context.socket(zmq.PAIR)
        self.pair.bind(control)
        env = {**os.environ, wire.TELEMETRY_ENV: self.endpoints["worker-telemetry"],
               wire.CONTROL_ENV: control, "PYTHONUNBUFFERED": "1",
               launch.SUPERVISOR_ENV: str(os.getpid())}
        env[launch.BACKEND_ENV] = self.backend
        env[launch.RESTARTS_ENV] = str(self.restarts)
        # Another worker program speaking the same wire (the telemetry benchmark's synthetic one).
        module = os.environ.get(wire.MODULE_ENV, "qwen_daemon.worker")
        cmd = launch.worker_command(self.run_dir, resume, self.cfg, self.processes, module)
        self.reported = set()
        # The trainers end when this process does, however it ends (kill -9 too), and hold the run's
        # lock until they have.
        self.worker = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                       stdout=open(self.run_dir / runs.DAEMON_LOG, "ab"), stderr=subprocess.STDOUT,
                                       preexec_fn=launch.die_with_parent, pass_fds=(self.lock,))
        self.set_state("loading", f"worker pid {self.worker.pid}")

    def stop_worker(self) -> None:
        """Stop at the next step boundary with a checkpoint: a signal for one worker; for a group,
        the stop command to rank 0 (torchrun's agent would kill the ranks on a signal)."""
        if self.processes == 1:
            self.worker.send_signal(signal.SIGTERM)
            return
        try:
            self.pair.send(wire.command(0, "stop"), flags=zmq.NOBLOCK)
        except zmq.Again:  # rank 0 is not listening yet (still loading): nothing to save
            self.worker.send_signal(signal.SIGTERM)

    def on_worker_exit(self, code: int) -> bool:
        """Decide what a worker's exit means; False = the supervisor is done."""
        for route, id, cmd, sock in self.forwarded.values():  # they will never be applied: say so
            error = {"code": "command_failed", "message": f"the worker exited (code {code}) before applying {cmd}"}
            encoded = protocol.encode_reply(id, error=error)
            self.replies.put(route[0] if route else b"", id, encoded)
            sock.send_multipart(route + [encoded])
        self.forwarded.clear()
        self.to_worker.clear()
        if code == wire.EXIT_FINISHED:
            self.set_state("finished")
            return False
        if code == wire.EXIT_STOPPED or self.stopping or "stopped" in self.reported:
            self.set_state("stopped")  # (torchrun's agent turns a rank's exit code 10 into 1)
            return False
        from shared.checkpoints import latest_valid_checkpoint

        # An `error` event: the worker said why (bad data, OOM at micro-batch 1, ...); a restart
        # would fail the same way. Anything else (killed, a crash, a dead rank) is worth a restart.
        if "error" not in self.reported and self.restarts < self.cfg.daemon.max_restarts:
            self.restarts += 1
            checkpoint = latest_valid_checkpoint(self.run_dir)
            restarted = {"ts": time.time(), "kind": "worker_restarted", "exit_code": code, "restart": self.restarts,
                         "checkpoint": str(checkpoint) if checkpoint else None}
            self.publish("event", restarted)
            # Into the run's own record too (the workers write the rest; none is running now).
            with open(self.run_dir / runs.EVENTS, "a", encoding="utf-8") as out:
                out.write(json.dumps(restarted) + "\n")
            self.spawn(resume=checkpoint is not None)
            return True
        errors = [e["message"] for e in self.events if e.get("kind") in ("error", "crash")]
        self.set_state("failed", errors[-1] if errors else f"worker exited with code {code} "
                                                          f"after {self.restarts} restart(s)")
        return False

    def write_report(self) -> None:
        """report.html at the end of every run (finished, stopped or failed); a report that cannot
        be written is a warning, never a failure of the run."""
        try:
            from qwen_daemon.report import write_report

            path = write_report(self.run_dir)
        except Exception as e:  # noqa: BLE001 - the run is over either way
            log.warning("no report: %s: %s", type(e).__name__, e)
            return
        event = {"ts": time.time(), "kind": "report", "path": str(path)}
        self.publish("event", event)
        with open(self.run_dir / runs.EVENTS, "a", encoding="utf-8") as out:
            out.write(json.dumps(event) + "\n")
        log.info("report: %s", path)

    # --- requests --------------------------------------------------------------------------------

    def handle_request(self, frames: list[bytes], sock: zmq.Socket) -> None:
        try:
            route, frame = protocol.split_route(frames)
        except protocol.ProtocolError as e:
            log.warning("dropped a malformed control message: %s", e)
            return
        identity = route[0] if route else b""
        try:
            request = protocol.decode_request(frame)
        except protocol.ProtocolError as e:
            log.warning("bad request: %s", e)
            sock.send_multipart(route + [protocol.encode_reply(e.id, error=e)])
            return
        id, cmd = request["id"], request["cmd"]
        if cmd in protocol.READ_ONLY_COMMANDS:
            sock.send_multipart(route + [protocol.encode_reply(id, result=self.read_only(cmd))])
            return
        cached = self.replies.get(identity, id)
        if cached is not None:
            sock.send_multipart(route + [cached])
            return
        if self.replies.pending(identity, id):
            return  # the original's reply is coming
        if self.state in protocol.FINAL_STATES:
            error = {"code": "bad_state", "message": f"the run is {self.state}; nothing to {cmd}"}
            sock.send_multipart(route + [protocol.encode_reply(id, error=error)])
            return
        self.replies.begin(identity, id)
        self.next_id += 1
        self.forwarded[self.next_id] = (route, id, cmd, sock)
        if cmd == "stop":
            self.stopping = True
        self.to_worker.append(wire.command(self.next_id, cmd, request["args"]))
        self.send_to_worker()

    def send_to_worker(self) -> None:
        """Hand the queued requests to rank 0 without ever blocking: until it has connected (a
        worker still starting), they wait here and go at the next turn of the loop."""
        while self.to_worker:
            try:
                self.pair.send(self.to_worker[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.to_worker.pop(0)

    def read_only(self, cmd: str) -> dict[str, Any]:
        if cmd == "ping":
            return {"pong": True, "pid": os.getpid()}
        f = self.figures
        status = {"run": self.cfg.run.name, "state": self.state, "step": self.step,
                  "total_steps": f.get("total_steps"), "epoch": f.get("epoch"),
                  "micro_batch_size": f.get("micro_batch_size"), "grad_accum": f.get("grad_accum"),
                  "processes": f.get("processes", self.processes),
                  "pid": os.getpid(), "started_at": self.started_at, "seq": self.seq}
        if status["micro_batch_size"] is None and self.cfg.train.micro_batch_size != "auto":
            status["micro_batch_size"], status["grad_accum"] = self.cfg.train.micro_batch_size, self.cfg.train.grad_accum
        status["global_batch"] = (status["micro_batch_size"] * status["grad_accum"] * status["processes"]
                                  if status["micro_batch_size"] and status["grad_accum"] else None)
        if cmd == "status":
            return status
        return {"seq": self.seq, "state": self.state, "run": self.cfg.run.name, "status": status,
                "config": {"model": self.cfg.model.name_or_path, "max_seq_len": self.cfg.data.max_seq_len,
                           "lora_r": self.cfg.lora.r, "learning_rate": self.cfg.train.learning_rate},
                "gpu": self.gpu, "metrics": retained.downsample(self.metrics), "logs": list(self.logs),
                "events": list(self.events)}

    def handle_worker_reply(self, reply: dict[str, Any]) -> None:
        """A command's reply, which came on the telemetry stream after everything the worker sent
        before applying it: its `seq` is the last message published before it."""
        route, id, cmd, sock = self.forwarded.pop(reply["id"], (None, None, None, None))
        if route is None:
            return
        if reply["ok"]:
            encoded = protocol.encode_reply(id, result={**reply["result"], "seq": self.seq})
        else:
            encoded = protocol.encode_reply(id, error={"code": "command_failed", "message": reply["error"]})
        self.replies.put(route[0] if route else b"", id, encoded)
        sock.send_multipart(route + [encoded])

    def handle_telemetry(self, frame: bytes) -> None:
        try:
            topic, body = wire.read_telemetry(frame)
        except wire.WireError as e:
            log.warning("dropped a malformed message from the worker: %s", e)
            return
        if topic == "rank":  # a worker's own torch memory figures, merged into the gpu topic
            self.ranks[body["rank"]] = body
            return
        if topic == "reply":
            self.handle_worker_reply(body)
            return
        self.follow_state(topic, body)
        if topic == "event" and body.get("kind") in ("error", "stopped"):
            self.reported.add(body["kind"])
        if self.foreground and topic == "log":
            print(f"{body.get('level', '')} {body.get('logger', '')}: {body.get('message', '')}", file=sys.stderr)
        self.publish(topic, body)

    def follow_state(self, topic: str, body: dict[str, Any]) -> None:
        """The run's state from what the worker reports: evaluating and saving are brief detours
        that return to the state before them (training or paused)."""
        kind = body.get("kind") if topic == "event" else None
        if kind == "train_start" and self.state == "loading":
            self.set_state("training")
        elif kind == "command_applied" and "paused" in body and self.state in ("training", "paused", "evaluating",
                                                                               "saving"):
            # The loop's own word: it paused or resumed at this step (before the command's reply).
            self.set_state("paused" if body["paused"] else "training", f"{body['command']} at step {body.get('step')}")
        elif kind == "auto_paused" and self.state == "training":
            self.set_state("paused", f"repeated anomalies at step {body.get('step')} (train.on_anomaly pause)")
        elif kind in ("evaluating", "saving") and self.state in ("training", "paused"):
            self.before_detour = self.state
            self.set_state(kind)
        elif self.state in ("evaluating", "saving") and (topic == "metrics" or kind in ("checkpoint", "checkpoint_skipped", "command_applied")):
            self.set_state(self.before_detour)

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        self.lock = runs.lock_run(self.run_dir)  # RunLocked names the holder
        other = runs.live_daemon(self.run_dir)
        if other is not None:
            raise RuntimeError(f"{self.run_dir} already has a daemon (pid {other['pid']}, {other['state']}); "
                               f"stop it first: qwen-daemon stop {self.run_dir}")
        self.bind()
        self.write_daemon_json()
        stop_requested = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _: stop_requested.append(signum))
        self.spawn(self.resume)
        print(f"ready {self.endpoints['control']} {self.endpoints['telemetry']}", flush=True)
        if not self.foreground:
            # Whoever started us has read the line and may go away: nothing more goes to stdout.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        poller = zmq.Poller()
        for sock in (*self.routers, self.pull):  # (the pair only carries requests to the worker)
            poller.register(sock, zmq.POLLIN)
        next_tick = time.monotonic()
        while True:
            if stop_requested and not self.stopping:
                self.stopping = True
                log.warning("signal %d: stopping the run at the next step boundary", stop_requested[0])
                self.stop_worker()
            timeout = max(0.0, next_tick - time.monotonic())
            for sock, _ in poller.poll(timeout * 1000):
                if sock in self.routers:
                    self.handle_request(sock.recv_multipart(), sock)
                else:
                    self.handle_telemetry(self.pull.recv())
            self.send_to_worker()
            if time.monotonic() >= next_tick:
                next_tick += protocol.HEARTBEAT_INTERVAL
                self.publish("gpu", {**self.sampler.sample(), "ranks": [self.ranks[r] for r in sorted(self.ranks)]})
                self.publish("heartbeat", {"state": self.state, "step": self.step, "pid": os.getpid()})
            code = self.worker.poll()
            if code is not None:
                while self.pull.poll(0):  # what the worker sent before it exited
                    self.handle_telemetry(self.pull.recv())
                if not self.on_worker_exit(code):
                    break
        self.write_report()
        self.publish("heartbeat", {"state": self.state, "step": self.step, "pid": os.getpid()})
        for sock in (*self.pubs, *self.routers, self.pull, self.pair):
            if sock is not None:
                sock.close(linger=500)
        if getattr(self, "auth", None):
            self.auth.stop()
        self.context.term()
        return 0 if self.state != "failed" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen_daemon.supervisor")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.FileHandler(run / runs.DAEMON_LOG, encoding="utf-8")], force=True)
    try:
        return Supervisor(run, args.resume).run()
    except RuntimeError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
