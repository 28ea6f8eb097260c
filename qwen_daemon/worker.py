"""A trainer worker: `train()` in a process of its own, wired to its supervisor over ZeroMQ IPC.

    python -m qwen_daemon.worker RUN_DIR [--resume]      (started by the supervisor, not by hand)

Telemetry (metrics, events, log records) goes to the supervisor's PULL socket through one sender
thread fed by a bounded queue: training never waits for the supervisor, and when the queue is
full messages are dropped (counted). Commands arrive on a PAIR socket, owned by a command thread
that hands each to `Controls.submit`; the reply goes out when the loop has applied it.

The frames, the environment it is started with and its exit codes are qwen_daemon/wire.py's.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from qwen_daemon import gpu, launch, wire
from shared import runs
from shared.config import load_config

RANK = int(os.environ.get("RANK", 0))
QUEUE_SIZE = 10_000

log = logging.getLogger("qwen_daemon.worker")


class Telemetry:
    """Queue -> PUSH socket, in a thread of its own; `send` never blocks."""

    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self._queue: queue.Queue = queue.Queue(QUEUE_SIZE)
        self.dropped = 0
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 2000)  # flush the last messages on exit
        self._socket.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def send(self, topic: str, body: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((topic, body))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            topic, body = item
            self._socket.send(wire.telemetry(topic, body))
        self._socket.close()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


class TelemetrySink:
    """The training loop's sink that forwards to the supervisor."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def metrics(self, record: dict[str, Any]) -> None:
        self.telemetry.send("metrics", record)

    def event(self, kind: str, **data: Any) -> None:
        self.telemetry.send("event", {"kind": kind, **data})

    def close(self) -> None:
        pass


class TelemetryLogHandler(logging.Handler):
    """Log records to the `log` topic."""

    def __init__(self, telemetry: Telemetry) -> None:
        super().__init__(logging.INFO)
        self.telemetry = telemetry

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.telemetry.send("log", {"level": record.levelname, "logger": record.name,
                                        "message": record.getMessage()[:4000], "rank": RANK, "ts": record.created})
        except Exception:  # noqa: BLE001 - logging must never raise into the loop
            self.handleError(record)


def torch_device_index() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def serve_commands(context: zmq.Context, endpoint: str, controls, stop: threading.Event,
                   telemetry: Telemetry) -> None:
    """Command thread: requests from the supervisor -> Controls.submit (rank 0 only: the loop
    broadcasts commands to the other ranks). A command's reply goes out on the telemetry stream,
    from the loop's thread the moment it applies the command, so it follows every record of the
    step it was applied at (docs/protocol.md). Also sends this process's torch memory figures once
    a second (every rank)."""
    sock = context.socket(zmq.PAIR)
    if RANK == 0:
        sock.connect(endpoint)

    def reply(id: int, future) -> None:
        error = future.exception()
        telemetry.send("reply", wire.reply(id, error=str(error)) if error else wire.reply(id, future.result()))

    next_memory = 0.0
    supervisor = int(os.environ.get(launch.SUPERVISOR_ENV, 0))
    orphaned = False
    while not stop.is_set():
        if time.monotonic() >= next_memory:  # this process's torch memory, once a second, for the gpu topic
            next_memory = time.monotonic() + 1.0
            if memory := gpu.torch_memory(torch_device_index()):
                telemetry.send("rank", {"rank": RANK, "index": torch_device_index(), "pid": os.getpid(), **memory})
            if supervisor and not orphaned and not runs.pid_alive(supervisor):
                # Where the parent-death signal could not be set (or the agent in between lives on):
                # nobody steers this run any more, so end it at the next step, with a checkpoint.
                orphaned = True
                log.warning("the daemon (pid %d) is gone: stopping at the next step boundary", supervisor)
                controls.stop()
        if RANK != 0:
            stop.wait(0.1)
        elif sock.poll(100):
            try:
                id, cmd, args = wire.read_command(sock.recv())
                future = controls.submit(cmd, **args)
            except (wire.WireError, ValueError, TypeError) as e:  # (the supervisor validated it: a bug)
                log.error("dropped a command from the daemon: %s", e)
                continue
            future.add_done_callback(lambda f, id=id: reply(id, f))
    sock.close(linger=1000)


def main(argv: list[str] | None = None) -> int:
    from qwen_daemon.train.controls import Controls
    from qwen_daemon.train.loop import train
    from qwen_daemon.train.model import ModelLoadError
    from qwen_daemon.train.run import TrainingError
    from qwen_daemon.train.text_zh import TermDictionaryError

    p = argparse.ArgumentParser(prog="qwen_daemon.worker")
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    run = Path(args.run_dir)
    cfg = load_config(run / runs.CONFIG)
    launch.die_with_parent()  # (a rank under torchrun: its parent is the agent, which has it too)

    context = zmq.Context()
    telemetry = Telemetry(context, os.environ[wire.TELEMETRY_ENV])
    handlers = [logging.FileHandler(run / runs.DAEMON_LOG, encoding="utf-8"), TelemetryLogHandler(telemetry)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    controls = Controls()
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        # SIGTERM/SIGINT: checkpoint at the next step boundary, then exit (the supervisor forwards
        # them). Under torchrun a SIGTERM is the agent tearing the group down: it just ends us.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: controls.stop())
    stop = threading.Event()
    commands = threading.Thread(target=serve_commands, args=(context, os.environ[wire.CONTROL_ENV], controls, stop,
                                                             telemetry),
                                name="commands", daemon=True)
    commands.start()
    code = wire.EXIT_FAILED
    try:
        state = train(cfg, run, controls, resume=args.resume, sinks=(TelemetrySink(telemetry),))
        code = wire.EXIT_FINISHED if state.finished else wire.EXIT_STOPPED  # what train() did, on every rank
    except (TrainingError, ModelLoadError, TermDictionaryError) as e:
        log.error("%s", e)
        telemetry.send("event", {"kind": "error", "message": str(e)})
    except Exception as e:  # noqa: BLE001 - report anything, then fail loudly
        # Not one of our own errors: a crash, or a collective that failed because another rank
        # died or hung. Worth a restart from the newest checkpoint (the supervisor decides).
        log.exception("training failed")
        telemetry.send("event", {"kind": "crash", "message": f"{type(e).__name__}: {e}"})
    finally:
        stop.set()
        commands.join(5)
        telemetry.close()
        context.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
