"""The supervisor as a real process with a real worker, driven over real ZeroMQ sockets."""

import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from qwen_daemon.launch import child_env  # as the environment is now: a test's monkeypatched variables reach it
from shared import protocol
from shared.config import load_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 180_000


class Client:
    """A client with nothing but pyzmq and msgpack framing from shared.protocol."""

    def __init__(self, control: str, telemetry: str) -> None:
        self.context = zmq.Context()
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(telemetry)
        self.ctl = self.context.socket(zmq.DEALER)
        self.ctl.connect(control)
        self.ids = itertools.count(1)

    def call(self, cmd, **args):
        id = next(self.ids)
        self.ctl.send(protocol.encode_request(id, cmd, args))
        assert self.ctl.poll(TIMEOUT_MS), f"no reply to {cmd}"
        reply = protocol.decode_reply(self.ctl.recv())
        assert reply["id"] == id
        return reply

    def wait_for(self, predicate, timeout_s: float = 600):
        deadline = time.monotonic() + timeout_s
        while True:
            assert time.monotonic() < deadline, f"nothing matched within {timeout_s} s"
            assert self.sub.poll(TIMEOUT_MS), "telemetry went quiet"
            message = protocol.decode_message(self.sub.recv_multipart())
            if predicate(message):
                return message

    def close(self):
        self.context.destroy(linger=0)


def worker_pid(client) -> int:
    """The current worker's pid, from the snapshot's latest `loading` state ("worker pid N")."""
    loading = [e for e in client.call("snapshot")["result"]["events"] if e.get("state") == "loading"][-1]
    return int(loading["reason"].split()[-1])


def start_supervisor(run_dir):
    proc = subprocess.Popen([sys.executable, "-m", "qwen_daemon.supervisor", str(run_dir)], env=child_env(),
                            stdout=subprocess.PIPE, text=True)
    ready = proc.stdout.readline().split()  # "ready <control> <telemetry>" once the sockets are bound
    assert ready and ready[0] == "ready", ready
    return proc, Client(ready[1], ready[2])


@contextlib.contextmanager
def running(run_dir):
    """A supervisor for the test's body, killed afterwards whatever happened."""
    proc, client = start_supervisor(run_dir)
    try:
        yield proc, client
    finally:
        proc.kill()
        client.close()


def test_pause_batch_size_resume_and_stop_over_the_wire(run_dir):
    with running(run_dir) as (proc, client):
        assert client.call("ping")["result"]["pong"] is True
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 2)

        paused = client.call("pause")
        assert paused["ok"] and paused["result"]["paused"] is True
        step = paused["result"]["step"]
        assert client.call("status")["result"]["state"] == "paused"

        snapshot = client.call("snapshot")["result"]
        assert [m["step"] for m in snapshot["metrics"] if m["kind"] == "train"] == list(range(1, step + 1))
        assert snapshot["seq"] > 0 and snapshot["state"] == "paused"

        bad = client.call("set_batch_size", micro_batch_size=3)
        assert not bad["ok"] and bad["error"]["code"] == "command_failed"
        assert "does not divide" in bad["error"]["message"]
        changed = client.call("set_batch_size", micro_batch_size=1)
        assert changed["result"] == {"step": step, "micro_batch_size": 1, "grad_accum": 4, "global_batch": 4,
                                     "seq": changed["result"]["seq"]}
        status = client.call("status")["result"]  # at once, not only after the next step's record
        assert (status["micro_batch_size"], status["grad_accum"], status["total_steps"]) == (1, 4, 40)

        assert client.call("resume")["ok"]
        after = client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] == step + 1)
        assert (after["body"]["micro_batch_size"], after["body"]["grad_accum"]) == (1, 4)

        stopped = client.call("stop")
        assert stopped["ok"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    info = json.loads((run_dir / "daemon.json").read_text())
    assert info["state"] == "stopped"
    assert list((run_dir / "checkpoints").glob("checkpoint-*"))


@pytest.mark.slow  # the default suite keeps its time on 2 cores; run with -m slow
def test_garbage_on_the_control_socket_never_stops_the_run(run_dir):
    with running(run_dir) as (proc, client):
        raw = client.context.socket(zmq.DEALER)
        raw.connect(json.loads((run_dir / "daemon.json").read_text())["endpoints"]["control"])
        import random

        rng = random.Random(0)
        garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(400)]
        garbage += [msgpack.packb(x) for x in ([1, 2], "cmd", {"v": 1}, {"v": 1, "id": 1, "cmd": "fly"},
                                               {"v": 1, "id": 2, "cmd": "pause", "args": {"x": 1}},
                                               {"v": 9, "id": 3, "cmd": "ping"})] * 100
        garbage += [b"\x00" * (protocol.MAX_FRAME + 1)]
        for g in garbage:
            raw.send(g)
        assert client.call("ping")["ok"]  # still answering
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 2)  # still training
        assert client.call("stop")["ok"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "qwen_daemon", *args], cwd=cwd, env=child_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_MS / 1000)


def test_start_detached_steer_with_ctl_and_stop(run_dir, tmp_path):
    """The user's path: start returns at once, the daemon outlives it, ctl and stop steer it."""
    started = cli("start", "--config", str(run_dir / "config.yaml"), "--set", "run.name=cli", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert "run:        cli" in started.stdout and "control:    ipc://" in started.stdout
    run = tmp_path / "cli"
    again = cli("start", "--config", str(run_dir / "config.yaml"), "--set", "run.name=cli", cwd=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr

    status = cli("ctl", "status", "--json", "--run", str(run), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["result"]["state"] in ("starting", "loading", "training")
    listed = cli("list", "--runs-root", str(tmp_path), cwd=tmp_path)
    assert listed.stdout.split()[0] == "cli"

    paused = cli("ctl", "pause", "--run", str(run), cwd=tmp_path)
    assert paused.returncode == 0 and "paused: True" in paused.stdout
    bad = cli("ctl", "set-batch-size", "3", "--run", str(run), cwd=tmp_path)
    assert bad.returncode == 1 and "does not divide" in bad.stderr
    assert cli("stop", str(run), cwd=tmp_path).returncode == 0
    # `logs -f` returns when the daemon has gone: the test waits on that, not on a timer.
    followed = cli("logs", str(run), "-f", cwd=tmp_path)
    assert "state training -> paused" in followed.stdout or "state loading -> paused" in followed.stdout
    assert json.loads((run / "daemon.json").read_text())["state"] == "stopped"
    assert cli("ctl", "status", "--run", str(run), cwd=tmp_path).returncode == 1  # no daemon any more


def test_a_worker_that_cannot_train_fails_the_run_and_pending_commands_get_an_answer(run_dir):
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace(str(REPO / "data" / "crypto_terms.tsv"), "/no/such/terms.tsv"))
    with running(run_dir) as (proc, client):
        reply = client.call("pause")  # sent while loading; the worker fails before any step
        assert not reply["ok"] and reply["error"]["code"] in ("command_failed", "bad_state")
        assert proc.wait(TIMEOUT_MS / 1000) == 1
    assert json.loads((run_dir / "daemon.json").read_text())["state"] == "failed"
    # The reason reaches the log, with the file to fix.
    assert "/no/such/terms.tsv: term dictionary not found" in (run_dir / "daemon.log").read_text()


@pytest.mark.slow  # 80 s; the default suite kills a rank of the 2-rank daemon test and restarts it from its
# checkpoint (test_distributed), and test_memory keeps a changed batch across a resume
def test_a_killed_worker_is_restarted_from_its_checkpoint(run_dir):
    import signal

    with running(run_dir) as (proc, client):
        client.wait_for(lambda m: m["topic"] == "event" and m["body"].get("kind") == "checkpoint")
        # A batch-size change after the checkpoint survives the restart from it.
        changed_at = client.call("set_batch_size", micro_batch_size=1)["result"]["step"]
        os.kill(worker_pid(client), signal.SIGKILL)
        restarted = client.wait_for(lambda m: m["topic"] == "event" and m["body"].get("kind") == "worker_restarted")
        checkpoint_step = int(restarted["body"]["checkpoint"].rsplit("-", 1)[1])
        assert checkpoint_step >= 5 and checkpoint_step % 5 == 0
        resumed = client.wait_for(lambda m: m["topic"] == "event" and m["body"].get("kind") == "resumed")
        assert resumed["body"]["step"] == checkpoint_step
        after = client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] == checkpoint_step + 1)
        assert (after["body"]["micro_batch_size"], after["body"]["grad_accum"]) == (1, 4)
        steps = [m["step"] for m in client.call("snapshot")["result"]["metrics"] if m["kind"] == "train"]
        assert steps == list(range(1, checkpoint_step + 2))  # the redone steps replace the lost ones
        assert client.call("stop")["ok"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    kinds = [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    # The run's files tell the whole story (the checkpoint of the step the change was applied at
    # was written just before it).
    assert kinds.index("worker_restarted") < kinds.index("resumed")
    assert ("batch_restored" in kinds) == (checkpoint_step <= changed_at)


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(run_dir):
    import signal

    with running(run_dir) as (proc, client):
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    assert json.loads((run_dir / "daemon.json").read_text())["state"] == "stopped"
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events[-2:]] == ["stopped", "report"]  # the report is written last
    assert (run_dir / "checkpoints" / f"checkpoint-{events[-2]['step']}").is_dir()  # saved at the stop


@pytest.mark.slow  # the default suite keeps its time on 2 cores; run with -m slow
def test_a_late_joiner_reconstructs_the_whole_history(run_dir):
    """Clone pattern: subscribe, snapshot, then apply only updates newer than the snapshot."""
    proc, first = start_supervisor(run_dir)
    late = None
    try:
        first.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 5)
        info = json.loads((run_dir / "daemon.json").read_text())
        late = Client(info["endpoints"]["control"], info["endpoints"]["telemetry"])
        # Subscribe first, make sure the subscription is live (a heartbeat arrives), then snapshot.
        late.wait_for(lambda m: m["topic"] == "heartbeat")
        snapshot = late.call("snapshot")["result"]
        history = {m["step"]: m for m in snapshot["metrics"] if m["kind"] == "train"}
        seq = snapshot["seq"]
        assert sorted(history) == list(range(1, len(history) + 1)) and len(history) >= 5
        late.call("stop")
        state = snapshot["state"]
        while state not in ("stopped", "finished"):
            message = late.wait_for(lambda m: True)
            if message["seq"] <= seq:
                continue  # already in the snapshot
            assert message["seq"] == seq + 1, "gap: a real client would take a new snapshot"
            seq = message["seq"]
            if message["topic"] == "metrics" and message["body"]["kind"] == "train":
                history[message["body"]["step"]] = message["body"]
            elif message["topic"] == "state":
                state = message["body"]["state"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    finally:
        proc.kill()
        first.close()
        if late:
            late.close()
    on_disk = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert history == {m["step"]: m for m in on_disk if m["kind"] == "train"}


def free_port():
    import socket

    with socket.socket() as s:  # two consecutive free ports: control and telemetry
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return port if port < 65000 else free_port()


def with_listen(run_dir, *settings):
    cfg = load_config(run_dir / "config.yaml", list(settings))
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")


def ping_over_tcp(endpoint, keys=None, server_key=None):
    """A ping over TCP: the reply, or None when nothing comes back within 3 s."""
    import zmq.auth

    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    try:
        if keys:
            public, secret = zmq.auth.load_certificate(str(keys))
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = zmq.auth.load_certificate(str(server_key))[0]
        sock.connect(endpoint)
        sock.send(protocol.encode_request(1, "ping"))
        return protocol.decode_reply(sock.recv()) if sock.poll(3000) else None
    finally:
        context.destroy(linger=0)


def test_curve_lets_authorised_clients_in_and_nobody_else(run_dir, tmp_path):
    from qwen_daemon.supervisor import generate_keys

    keys = tmp_path / "keys"
    generate_keys(keys, "alice")
    generate_keys(tmp_path / "other", "mallory")  # a valid key pair the daemon does not know
    port = free_port()
    with_listen(run_dir, f"daemon.listen=[tcp://127.0.0.1:{port}]", f"daemon.curve_keys_dir={keys}")
    endpoint = f"tcp://127.0.0.1:{port}"
    with running(run_dir) as (proc, client):
        assert ping_over_tcp(endpoint) is None  # no keys: nothing
        assert ping_over_tcp(endpoint, tmp_path / "other" / "mallory.key_secret", keys / "server.key") is None
        reply = ping_over_tcp(endpoint, keys / "alice.key_secret", keys / "server.key")
        assert reply and reply["result"]["pong"] is True
        assert client.call("ping")["ok"]  # the private IPC socket needs no keys
        tcp = json.loads((run_dir / "daemon.json").read_text())["endpoints"]["tcp"]
        assert tcp == [{"control": endpoint, "telemetry": f"tcp://127.0.0.1:{port + 1}", "curve": True}]
        assert client.call("stop")["ok"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0


def test_a_non_loopback_endpoint_without_keys_is_refused(run_dir):
    with_listen(run_dir, "daemon.listen=[tcp://0.0.0.0:5999]")
    out = subprocess.run([sys.executable, "-m", "qwen_daemon.supervisor", str(run_dir)], env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "non-loopback" in out.stderr and "keys generate" in out.stderr


@pytest.mark.slow  # the default suite keeps its time on 2 cores; run with -m slow
def test_a_retried_request_is_replayed_not_executed_twice(run_dir):
    with running(run_dir) as (proc, client):
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 1)
        client.ctl.send(protocol.encode_request("same-id", "checkpoint"))
        assert client.ctl.poll(TIMEOUT_MS)
        first = client.ctl.recv()
        client.ctl.send(protocol.encode_request("same-id", "checkpoint"))  # a retry after a lost reply
        assert client.ctl.poll(TIMEOUT_MS)
        assert client.ctl.recv() == first
        states = []
        client.call("stop")
        while not states or states[-1] not in ("stopped", "finished"):
            message = client.wait_for(lambda m: m["topic"] == "state")
            states.append(message["body"]["state"])
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(1 for e in events if e["kind"] == "command_applied" and e["command"] == "checkpoint") == 1
    assert "saving" in states  # the final checkpoint: a brief detour through `saving`


def test_a_second_daemon_for_the_same_run_is_refused(run_dir):
    with running(run_dir) as (proc, client):
        second = subprocess.run([sys.executable, "-m", "qwen_daemon.supervisor", str(run_dir)], env=child_env(),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 2 and f"owned by another daemon (pid {proc.pid})" in second.stderr
        assert client.call("ping")["ok"]  # the first one is untouched
        assert client.call("stop")["ok"]
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    # Its daemon.json now names a dead pid: a new daemon may take the run over (stale file).
    from shared.runs import live_daemon

    assert live_daemon(run_dir) is None


@pytest.mark.slow  # the default suite keeps its time on 2 cores; run with -m slow
def test_with_no_restarts_left_a_killed_worker_fails_the_run(run_dir):
    import signal

    with_listen(run_dir, "daemon.max_restarts=0")
    with running(run_dir) as (proc, client):
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 1)
        os.kill(worker_pid(client), signal.SIGKILL)
        failed = client.wait_for(lambda m: m["topic"] == "state" and m["body"]["state"] == "failed")
        assert "code -9" in failed["body"]["reason"]
        assert proc.wait(TIMEOUT_MS / 1000) == 1


def test_a_reply_follows_the_telemetry_of_the_step_it_was_applied_at(run_dir):
    """The reply to pause carries the seq of the last message published before it; the metrics of
    the step it was applied at are among those, never after."""
    with running(run_dir) as (proc, client):
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 2)
        reply = client.call("pause")
        assert reply["ok"]
        step, seq = reply["result"]["step"], reply["result"]["seq"]
        seen = {}
        while True:  # everything published up to the reply, and nothing more of that step later
            message = client.wait_for(lambda m: True)
            if message["topic"] == "metrics" and message["body"].get("kind") == "train":
                seen[message["body"]["step"]] = message["seq"]
            if message["seq"] >= seq:
                break
        assert seen.get(step, 0) <= seq and step in seen or step < min(seen, default=step + 1)
        client.call("stop")
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m["kind"] == "train" and m["step"] == step for m in metrics)


def test_a_killed_daemon_takes_its_trainer_with_it_and_the_run_stays_locked_until_it_is_gone(run_dir):
    import signal

    with_listen(run_dir, "train.max_steps=100000")  # left alone, the trainer would go on for hours
    proc, client = start_supervisor(run_dir)
    try:
        client.wait_for(lambda m: m["topic"] == "metrics" and m["body"]["step"] >= 2)
        trainer = worker_pid(client)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 120
        refused = None
        while os.path.exists(f"/proc/{trainer}") and b"zombie" not in _status(trainer):
            if refused is None:  # the trainer still holds the run: nobody else may take it
                refused = subprocess.run([sys.executable, "-m", "qwen_daemon.supervisor", str(run_dir), "--resume"],
                                         env=child_env(), capture_output=True, text=True, timeout=60)
            assert time.monotonic() < deadline, "the trainer outlived its daemon"
            time.sleep(0.2)  # polling a process we do not own: no event to wait on
    finally:
        proc.kill()
        client.close()
    if refused is not None:
        assert refused.returncode == 2 and "owned by another daemon" in refused.stderr
    # It stopped at a step boundary with a checkpoint (SIGTERM from the parent-death signal), and
    # the run resumes from there.
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events[-1]["kind"] == "stopped"
    with running(run_dir) as (proc, client):
        pass  # the lock is free again: the daemon starts (and is killed by running())


def _status(pid: int) -> bytes:
    try:
        return open(f"/proc/{pid}/status", "rb").read().lower()
    except OSError:
        return b"zombie"


def test_resuming_a_finished_run_says_it_is_finished(run_dir, capsys):
    from qwen_daemon import cli

    (run_dir / "daemon.json").write_text(json.dumps({"pid": 999999, "state": "finished"}))
    assert cli.main(["start", "--resume", str(run_dir)]) == 0
    assert "has finished" in capsys.readouterr().out
    assert json.loads((run_dir / "daemon.json").read_text())["pid"] == 999999  # no daemon was started
