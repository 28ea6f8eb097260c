"""The supervisor <-> worker wire (qwen_daemon/wire.py) and what the supervisor makes of it: frames
round-trip, anything else is dropped, and the run's state is what the loop reported."""

import msgpack
import pytest

from qwen_daemon import wire
from qwen_daemon.supervisor import Supervisor

MALFORMED = [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("event"), wire.telemetry("fly", {}),
             msgpack.packb({"topic": "event", "body": 3}), msgpack.packb({"topic": "metrics"})]


def test_frames_round_trip():
    assert wire.read_telemetry(wire.telemetry("event", {"kind": "checkpoint", "step": 3})) == \
        ("event", {"kind": "checkpoint", "step": 3})
    assert wire.read_command(wire.command(7, "set_batch_size", {"micro_batch_size": 2})) == \
        (7, "set_batch_size", {"micro_batch_size": 2})
    assert wire.read_command(wire.command(0, "stop")) == (0, "stop", {})
    assert wire.reply(7, {"step": 3}) == {"id": 7, "ok": True, "result": {"step": 3}}
    assert wire.reply(7, error="does not divide") == {"id": 7, "ok": False, "error": "does not divide"}


@pytest.mark.parametrize("frame", MALFORMED)
def test_anything_else_is_a_wire_error(frame):
    with pytest.raises(wire.WireError):
        wire.read_telemetry(frame)
    with pytest.raises(wire.WireError):
        wire.read_command(frame)


def test_the_supervisor_drops_malformed_frames_and_follows_the_loops_state(run_dir):
    sup = Supervisor(run_dir)
    sup.pubs, sup.state = [], "training"
    for frame in MALFORMED:
        sup.handle_telemetry(frame)  # logged and dropped
    assert sup.state == "training" and not sup.events

    def event(**body):
        sup.handle_telemetry(wire.telemetry("event", body))

    event(kind="command_applied", command="pause", step=3, paused=True)
    assert sup.state == "paused"
    event(kind="command_applied", command="checkpoint", step=3, path="x")  # not a pause or resume
    assert sup.state == "paused"
    event(kind="saving", step=3)
    assert sup.state == "saving"
    event(kind="command_applied", command="resume", step=3, paused=False)  # applied after the save
    assert sup.state == "training"
    assert [e["state"] for e in sup.events if e["kind"] == "state"] == ["paused", "saving", "training"]
