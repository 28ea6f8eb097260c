"""Status, pause, resume, then follow a run's loss: python examples/watch_and_steer.py runs/<name>"""
import json
import sys
import uuid
from pathlib import Path

import msgpack
import zmq

info = json.loads((Path(sys.argv[1]) / "daemon.json").read_text())
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)                     # 1. subscribe first ...
sub.setsockopt(zmq.SUBSCRIBE, b"")            # to every topic, so that a seq gap is a real gap
sub.connect(info["endpoints"]["telemetry"])
ctl = ctx.socket(zmq.DEALER)
ctl.connect(info["endpoints"]["control"])


def call(cmd, timeout_s=120, **args):
    """One command; a retry reuses the id, so the daemon replays its reply instead of re-running it."""
    rid = uuid.uuid4().hex
    request = msgpack.packb({"v": 1, "id": rid, "cmd": cmd, "args": args})
    for _attempt in range(3):
        ctl.send_multipart([b"", request])
        while ctl.poll(timeout_s * 1000):
            reply = msgpack.unpackb(ctl.recv_multipart()[-1])
            if reply["id"] != rid:
                continue                      # a late reply to a call we gave up on
            if not reply["ok"]:
                raise RuntimeError(f"{cmd}: {reply['error']['code']}: {reply['error']['message']}")
            return reply["result"]
    raise TimeoutError(f"{cmd}: no reply from the daemon (pid {info['pid']})")


status = call("status")
print(f"{status['run']}: {status['state']} at step {status['step']}/{status['total_steps']}")
print("paused at step", call("pause")["step"])       # the reply comes once applied
print("resumed at step", call("resume")["step"])
snapshot = call("snapshot")                          # 2. ... then take a snapshot ...
seq, state = snapshot["seq"], snapshot["state"]
while state not in ("finished", "stopped", "failed"):
    if not sub.poll(5000):                           # heartbeats come every second
        raise TimeoutError("no telemetry for 5 s: the daemon is gone")
    topic, frame = sub.recv_multipart()
    msg = msgpack.unpackb(frame)
    if msg["seq"] <= seq:
        continue                                     # 3. ... skip what the snapshot holds ...
    if msg["seq"] > seq + 1:                         # 4. ... and resync on a gap
        snapshot = call("snapshot")
        seq, state = snapshot["seq"], snapshot["state"]
        continue
    seq, body = msg["seq"], msg["body"]
    if topic == b"metrics" and body["kind"] == "train":
        print(f"step {body['step']}/{body['total_steps']}  loss {body['loss']:.4f}")
    elif topic == b"state":
        state = body["state"]
print("run ended:", state)
