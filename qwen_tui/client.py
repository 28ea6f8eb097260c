"""What the TUI knows about a run, and the connection that keeps it current. No Textual here:
scripts and tests use it alone.

- `RunView`: plain state built from a snapshot plus the telemetry after it, or from the run's
  files when its daemon is gone. `version` grows with every change, so a UI redraws only then.
- `Connection`: a background thread that follows the daemon with the protocol's late-joiner
  recipe (docs/protocol.md: subscribe, snapshot, apply newer messages, resync on a gap or a new
  daemon pid) and queues what it learns; the UI applies the queue with `drain(view)` at its own
  pace, which coalesces any message rate into one redraw per frame. `call()` sends a command.
"""

from __future__ import annotations

import collections
import math
import queue
import re
import threading
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from shared import batchsize, protocol, runs
from shared.events import SMOOTHING, describe_event  # noqa: F401 - describe_event: the TUI's import

KEEP_LOGS = 5000
KEEP_EVENTS = 1000
SILENCE_S = 5.0          # no message at all for this long: the daemon is gone (heartbeats are 1 s)
SNAPSHOT_TIMEOUT_S = 5.0
SERIES = ("loss", "lr", "grad_norm", "tokens_per_s")
SCORES = ("rouge_l_chars", "term_recall", "rouge_l_weighted")  # eval.generate_every_steps' answer scores
DETOURS = {"evaluating", "saving"}
MARKED = {"anomaly", "loss_spike", "grad_norm_spike"}  # events the loss chart marks at their step


@dataclass
class LogLine:
    ts: float | None
    level: str
    logger: str
    message: str
    rank: int | None = None


@dataclass
class Endpoints:
    control: str
    telemetry: str

    @classmethod
    def from_tcp(cls, address: str) -> Endpoints:
        """tcp://HOST:PORT as `daemon.listen` gives it: control at PORT, telemetry at PORT+1."""
        match = re.fullmatch(r"tcp://(.+):(\d+)", address)
        if not match:
            raise ValueError(f"--endpoint must be tcp://HOST:PORT (the daemon's daemon.listen), got {address!r}")
        host, port = match.group(1), int(match.group(2))
        return cls(f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}")


@dataclass
class CurveKeys:
    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, directory: str | Path) -> CurveKeys:
        """server.key and this client's *.key_secret, as `qwen-daemon keys generate` writes them."""
        import zmq.auth

        directory = Path(directory)
        secrets = sorted(p for p in directory.glob("*.key_secret") if p.name != "server.key_secret")
        if not (directory / "server.key").exists() or not secrets:
            raise ValueError(f"{directory}: needs server.key and a client key pair (client.key_secret); "
                             "make them with `qwen-daemon keys generate DIR` on the server and copy them here")
        public, secret = zmq.auth.load_certificate(str(secrets[0]))
        server, _ = zmq.auth.load_certificate(str(directory / "server.key"))
        return cls(public, secret, server)


@dataclass
class RunView:
    """Everything one screen of the TUI shows."""

    run: str = ""
    model: str = ""
    state: str = "starting"
    reason: str | None = None
    connection: str = "connecting"   # connecting | live | reconnecting | offline
    note: str = ""                   # why, for reconnecting and offline
    pid: int | None = None
    started_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    processes: int = 1
    # Float arrays, not lists: numpy reads them without a copy, so a 100,000-step chart costs what a
    # 100-step one does.
    train: dict[str, array] = field(default_factory=lambda: {k: array("d") for k in ("step", "ts", "smoothed", *SERIES)})
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    scores: dict[str, list] = field(default_factory=dict)  # score -> [(step, value)], from `eval` records
    marks: list[int] = field(default_factory=list)  # steps of MARKED events
    logs: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP_LOGS))
    logs_total: int = 0               # lines ever added: widgets append the ones they have not seen
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP_EVENTS))
    events_total: int = 0
    gpu: dict | None = None
    gpu_peak: float | None = None     # GiB, the trainer's peak from the last metrics record
    last_ts: float | None = None      # newest telemetry or record time
    version: int = 0                  # grows with every change
    generation: int = 0               # grows when the whole view is replaced (snapshot, files)

    # --- building it ------------------------------------------------------------------------------

    def replace(self, other: RunView) -> None:
        """Become `other`, keeping the connection's word and the counters monotonic."""
        keep = {"connection": self.connection, "note": self.note, "version": self.version + 1,
                "generation": self.generation + 1}
        self.__dict__.update({**other.__dict__, **keep})

    def apply_snapshot(self, snap: dict) -> None:
        self.replace(RunView(gpu=snap.get("gpu") or self.gpu))
        status = snap.get("status") or {}
        self.run, self.state = snap.get("run", ""), snap.get("state", "starting")
        self.model = (snap.get("config") or {}).get("model", "")
        self.pid, self.started_at = status.get("pid"), status.get("started_at")
        self._apply_status(status)
        for record in snap.get("metrics", ()):
            self._add_metric(record)
        for line in snap.get("logs", ()):
            self._add_log(line, line.get("ts"))
        for event in snap.get("events", ()):
            self._add_event(event, event.get("ts"))
        self._apply_status(status)  # the live figures win over the history's last record
        self.version += 1

    def apply(self, topic: str, body: dict, ts: float | None = None) -> None:
        """One telemetry message (docs/protocol.md, "Bodies")."""
        if topic == "metrics":
            self._add_metric(body)
        elif topic == "gpu":
            self.gpu = body
        elif topic == "log":
            self._add_log(body, ts)
        elif topic == "event":
            self._add_event(body, ts)
        elif topic == "state":
            self.state, self.reason = body.get("state", self.state), body.get("reason")
            self._add_event({"kind": "state", "step": self.step, **body}, ts)
        elif topic == "heartbeat":
            self.state, self.step = body.get("state", self.state), body.get("step", self.step)
        self.last_ts = ts or self.last_ts
        self.version += 1

    def set_connection(self, connection: str, note: str = "") -> None:
        if (connection, note) != (self.connection, self.note):
            self.connection, self.note = connection, note
            self.version += 1

    def _apply_status(self, status: dict) -> None:
        for key in ("step", "total_steps", "epoch", "micro_batch_size", "grad_accum", "processes"):
            if status.get(key) is not None:
                setattr(self, key, status[key])

    def _add_metric(self, record: dict) -> None:
        self.last_ts = record.get("ts", self.last_ts)
        if record.get("kind") == "eval":
            if _finite(record.get("eval_loss")):
                self.eval_steps.append(record["step"])
                self.eval_losses.append(record["eval_loss"])
            for name in SCORES:
                if _finite(record.get(name)):
                    self.scores.setdefault(name, []).append((record["step"], float(record[name])))
            return
        if record.get("kind") != "train":
            return
        if self.train["step"] and record.get("step", 0) <= self.train["step"][-1]:
            self._rewind(record.get("step", 0))  # a resume or a restart redoes steps after its checkpoint
        self._apply_status(record)
        self.gpu_peak = record.get("gpu_peak", self.gpu_peak)
        t = self.train
        t["step"].append(record.get("step", 0))
        t["ts"].append(record.get("ts", 0.0))
        for key in SERIES:
            value = record.get(key)
            t[key].append(float(value) if _finite(value) else math.nan)
        # Exponential moving average with TensorBoard's debiasing; non-finite losses skipped.
        loss, n = t["loss"][-1], len(t["smoothed"])
        previous = next((v for v in reversed(t["smoothed"]) if _finite(v)), None)
        if not _finite(loss):
            t["smoothed"].append(previous if previous is not None else math.nan)
        elif previous is None:
            t["smoothed"].append(loss)
        else:
            weight = SMOOTHING * (1 - SMOOTHING ** n) / (1 - SMOOTHING ** (n + 1))
            t["smoothed"].append(weight * previous + (1 - weight) * loss)

    def _rewind(self, step: int) -> None:
        """Forget the records of `step` and after: they are being redone."""
        keep = next(i for i, s in enumerate(self.train["step"]) if s >= step)
        for series in self.train.values():
            del series[keep:]
        kept_evals = sum(1 for s in self.eval_steps if s < step)
        del self.eval_steps[kept_evals:], self.eval_losses[kept_evals:]
        for points in self.scores.values():
            points[:] = [p for p in points if p[0] < step]
        self.marks[:] = [s for s in self.marks if s < step]

    def _add_log(self, body: dict, ts: float | None) -> None:
        self.logs.append(LogLine(ts, str(body.get("level", "INFO")), str(body.get("logger", "")),
                                 str(body.get("message", "")), body.get("rank")))
        self.logs_total += 1

    def _add_event(self, body: dict, ts: float | None) -> None:
        if body.get("kind") in DETOURS or body.get("kind") == "state" and {body.get("state"), body.get("previous")} & DETOURS:
            return  # evaluations and saves come and go every few steps; the header shows them
        self.events.append({**body, "ts": ts if ts is not None else body.get("ts")})
        self.events_total += 1
        if body.get("kind") in MARKED and isinstance(body.get("step"), int):
            self.marks.append(body["step"])
        if body.get("kind") in batchsize.BATCH_EVENTS:
            # The new batch size shows before the next metrics record (not the event's step: a
            # run's files are read metrics first, then events).
            self._apply_status({k: body.get(k) for k in ("micro_batch_size", "grad_accum", "total_steps")})

    def since(self, shown: tuple[int, int], which: str) -> tuple[bool, list]:
        """What a pane that has shown `shown` = (generation, total) of `which` ("logs" or "events")
        lacks, and whether it must start afresh (the view was replaced since)."""
        items, total = getattr(self, which), getattr(self, f"{which}_total")
        fresh = shown[0] != self.generation
        new = min(len(items), total - (total - len(items) if fresh else shown[1]))
        return fresh, list(items)[len(items) - new:] if new > 0 else []

    # --- what the header shows -----------------------------------------------------------------------

    @property
    def global_batch(self) -> int | None:
        if self.micro_batch_size is None or self.grad_accum is None:
            return None
        return self.micro_batch_size * self.grad_accum * self.processes

    def tokens_per_s(self, window: int = 5) -> float | None:
        """Median real tokens/s of the last few steps (one slow step does not swing it)."""
        recent = sorted(v for v in self.train["tokens_per_s"][-window:] if _finite(v))
        return recent[len(recent) // 2] if recent else None

    def seconds_per_step(self, window: int = 20) -> float | None:
        """Wall time per step over the last few steps, evaluations and checkpoints included."""
        steps, stamps = self.train["step"][-window:], self.train["ts"][-window:]
        if len(steps) < 2 or steps[-1] <= steps[0]:
            return None
        return (stamps[-1] - stamps[0]) / (steps[-1] - steps[0])

    def eta_s(self) -> float | None:
        per_step = self.seconds_per_step()
        if per_step is None or self.total_steps is None or self.state in protocol.FINAL_STATES \
                or self.connection == "offline":
            return None
        return max(0, self.total_steps - self.step) * per_step

    def elapsed_s(self, now: float) -> float | None:
        if self.started_at is None:
            return None
        end = now if self.connection != "offline" else (self.last_ts or self.started_at)
        return max(0.0, end - self.started_at)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the run's files, when its daemon is gone --------------------------------------------------------

_LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) ([\w.]+): (.*)")


def load_run_files(run_dir: Path) -> RunView:
    """A read-only view of a run from metrics.jsonl, events.jsonl, daemon.log, daemon.json and
    config.yaml; a missing or damaged file leaves its part empty (a crashed run may have any)."""
    import yaml

    view = RunView(run=run_dir.name, connection="offline")
    info = runs.read_json(run_dir / runs.DAEMON_JSON) or {}
    view.state, view.pid, view.started_at = info.get("state", "unknown"), info.get("pid"), info.get("started_at")
    try:
        config = yaml.safe_load((run_dir / runs.CONFIG).read_text(encoding="utf-8")) or {}
        view.model = str((config.get("model") or {}).get("name_or_path", ""))
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        pass
    for record in runs.read_jsonl(run_dir / runs.METRICS):
        view._add_metric(record)
    for event in runs.read_jsonl(run_dir / runs.EVENTS):
        view._add_event(event, event.get("ts"))
        if event.get("kind") == "error" and view.reason is None:
            view.reason = event.get("message")
    for line in runs.tail_lines(run_dir / runs.DAEMON_LOG, KEEP_LOGS):
        match = _LOG_LINE.match(line)
        if match:
            ts = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) + int(match.group(2)) / 1000
            view._add_log({"level": match.group(3), "logger": match.group(4), "message": match.group(5)}, ts)
        elif view.logs:  # a traceback's continuation lines
            last = view.logs[-1]
            view._add_log({"level": last.level, "logger": last.logger, "message": line}, last.ts)
    if view.state not in protocol.FINAL_STATES:
        view.reason = "the daemon is not running (it was killed or crashed); its last state was " + view.state
    elif view.state == "failed" and view.reason is None:
        view.reason = next((line.message for line in reversed(view.logs) if line.level in ("ERROR", "CRITICAL")), None)
    return view


# --- the connection ---------------------------------------------------------------------------------

class CommandError(RuntimeError):
    """A command the daemon refused or did not answer; the message says why."""


class Connection:
    """Follows one run's daemon from a background thread.

    Give `run_dir` (endpoints from its daemon.json; when the daemon is gone, the run's files are
    shown read-only and the thread waits for a new daemon, e.g. `start --resume`) or explicit
    `endpoints` (a remote daemon over TCP: when it is gone the view says "reconnecting").
    """

    def __init__(self, run_dir: Path | None = None, endpoints: Endpoints | None = None,
                 keys: CurveKeys | None = None, silence_s: float = SILENCE_S) -> None:
        if (run_dir is None) == (endpoints is None):
            raise ValueError("give either run_dir or endpoints")
        self.run_dir, self.keys, self.silence_s = run_dir, keys, silence_s
        self.endpoints = endpoints  # from daemon.json each time the thread (re)connects, with run_dir
        self.context = zmq.Context()
        self.updates: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = threading.Event()
        self.resyncs = 0  # snapshots taken after the first: gaps and new daemons
        self._thread = threading.Thread(target=self._follow_forever, name="qwen-tui-connection", daemon=True)

    def start(self) -> Connection:
        self._thread.start()
        return self

    def close(self) -> None:
        self.closed.set()
        self._thread.join(timeout=5)
        self.context.destroy(linger=0)

    def drain(self, view: RunView, wait: float = 0) -> bool:
        """Apply everything queued since the last call; True if anything was. With `wait`, first
        wait up to that many seconds for something to arrive."""
        changed = False
        while True:
            try:
                kind, *item = self.updates.get(timeout=wait) if wait and not changed else self.updates.get_nowait()
            except queue.Empty:
                return changed
            changed = True
            if kind == "snapshot":
                view.apply_snapshot(item[0])
            elif kind == "message":
                view.apply(*item)
            elif kind == "files":
                view.replace(item[0])
            elif kind == "connection":
                view.set_connection(*item)

    def call(self, cmd: str, args: dict | None = None, timeout: float = 600) -> dict:
        """Send one command and wait for its reply (sent once the command is applied); the result,
        or CommandError. Safe from any thread: each call has its own socket."""
        endpoints = self.endpoints
        if endpoints is None:
            raise CommandError("the run's daemon is not running (this is a read-only view of its files)")
        keys = self.keys and (self.keys.public, self.keys.secret, self.keys.server)
        try:
            reply = protocol.request(self.context, endpoints.control, cmd, args, timeout, curve=keys)
        except TimeoutError:
            raise CommandError(f"no reply within {timeout:g} s; is the daemon alive? (qwen-daemon list)") from None
        except protocol.ProtocolError as e:
            raise CommandError(f"unreadable reply: {e}") from None
        if not reply["ok"]:
            raise CommandError(f"{reply['error']['code']}: {reply['error']['message']}")
        return reply["result"]

    # --- the thread ----------------------------------------------------------------------------------

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.linger = 0
        if self.keys:
            sock.curve_publickey, sock.curve_secretkey = self.keys.public, self.keys.secret
            sock.curve_serverkey = self.keys.server
        return sock

    def _say(self, connection: str, note: str = "") -> None:
        self.updates.put(("connection", connection, note))

    def _follow_forever(self) -> None:
        offline_shown = False
        while not self.closed.is_set():
            if self.run_dir is not None:
                info = runs.live_daemon(self.run_dir)
                if info is None:
                    self.endpoints = None
                    if not offline_shown:
                        self.updates.put(("files", load_run_files(self.run_dir)))
                        self._say("offline", "read-only, daemon not running")
                        offline_shown = True
                    self.closed.wait(1.0)  # a `start --resume` brings a new daemon: attach to it
                    continue
                self.endpoints = Endpoints(info["endpoints"]["control"], info["endpoints"]["telemetry"])
            offline_shown = False
            try:
                self._follow(self.endpoints)
            except zmq.ZMQError as e:
                self._say("reconnecting", f"socket error: {e}")
            if not self.closed.is_set():
                self.closed.wait(0.5)  # do not spin against a daemon that answers and vanishes

    def _follow(self, endpoints: Endpoints) -> None:
        """Subscribe, snapshot, apply newer messages; return when the daemon falls silent."""
        sub = self._socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # everything, so that a seq jump is a real gap
        sub.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME + 4096)
        sub.connect(endpoints.telemetry)
        try:
            seq, pid = self._snapshot()
            if seq is None:
                return
            last_heard = time.monotonic()
            while not self.closed.is_set():
                if not sub.poll(250):
                    if time.monotonic() - last_heard > self.silence_s:
                        self._say("reconnecting", f"no telemetry for {self.silence_s:g} s")
                        return
                    continue
                frames = sub.recv_multipart()
                last_heard = time.monotonic()
                try:
                    msg = protocol.decode_message(frames)
                except protocol.ProtocolError:
                    continue  # one bad message is not worth a resync
                new_daemon = msg["topic"] == "heartbeat" and msg["body"].get("pid") not in (None, pid)
                if not new_daemon and msg["seq"] <= seq:
                    continue  # already in the snapshot
                if new_daemon or msg["seq"] > seq + 1:
                    self.resyncs += 1
                    seq, pid = self._snapshot()
                    if seq is None:
                        return
                    continue
                seq = msg["seq"]
                self.updates.put(("message", msg["topic"], msg["body"], msg["ts"]))
        finally:
            sub.close(linger=0)

    def _snapshot(self) -> tuple[int | None, int | None]:
        try:
            snap = self.call("snapshot", timeout=SNAPSHOT_TIMEOUT_S)
        except CommandError as e:
            self._say("reconnecting", f"snapshot: {e}")
            return None, None
        self.updates.put(("snapshot", snap))
        self._say("live")
        return snap.get("seq", 0), (snap.get("status") or {}).get("pid")
