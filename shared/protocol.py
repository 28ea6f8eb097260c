"""The wire between the daemon and its clients: envelope, encode/decode, validation, versions.

docs/protocol.md is the reference for client writers; this module is what both sides import.
Like the ZeroMQ guide's `kvsimple`, it knows frames and nothing about sockets:

    telemetry (PUB -> SUB), two frames:  [topic (ASCII), msgpack {v, seq, ts, run, topic, body}]
    control request (DEALER/REQ -> ROUTER), one frame after the routing envelope:
                                          msgpack {v, id, cmd, args}
    control reply (ROUTER -> DEALER/REQ): msgpack {v, id, ok: true, result}
                                       or msgpack {v, id, ok: false, error: {code, message}}

Decoding is strict where the input is untrusted (requests reaching the daemon: unknown keys and
arguments are errors) and tolerant where the daemon may grow (telemetry and replies reaching a
client: extra keys are ignored, so adding a field needs no new version). Whatever the bytes,
decoding raises `ProtocolError` and nothing else, so a bad peer can cost a log line, never the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

VERSION = 1
"""Bumped only for incompatible changes; new keys, body fields and optional args keep it."""

TOPICS = ("metrics", "gpu", "log", "event", "state", "heartbeat")
"""Telemetry topics. None is a prefix of another, so ZeroMQ prefix subscription selects exactly one."""

STATES = ("starting", "loading", "training", "paused", "evaluating", "saving", "finished", "stopped", "failed")
FINAL_STATES = ("finished", "stopped", "failed")
"""States a run never leaves: its daemon exits soon after."""

REQUIRED = "required"
"""An argument's default in COMMANDS when it has none: the request must give it."""

COMMANDS: dict[str, dict[str, tuple[type, Any]]] = {
    "ping": {},
    "status": {},
    "snapshot": {},
    "pause": {"release_memory": (bool, False)},
    "resume": {},
    "checkpoint": {},
    "set_batch_size": {"micro_batch_size": (int, REQUIRED), "keep_global_batch": (bool, True)},
    "stop": {},
}
"""Control commands: {name: {argument: (type, default or REQUIRED)}}. The one list of them: the
CLI takes its choices from it, the daemon its defaults (with_defaults), the training loop its
handlers (one per command that is not read-only)."""

READ_ONLY_COMMANDS = frozenset({"ping", "status", "snapshot"})
"""Answered at once and safe to execute twice; the others are applied at a step boundary."""

# Lower bounds that a type alone cannot say.
_MINIMUM = {("set_batch_size", "micro_batch_size"): 1}


def with_defaults(cmd: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """A valid request's args with every optional argument that it left out at its default."""
    return {**{name: default for name, (_, default) in COMMANDS[cmd].items() if default is not REQUIRED}, **args}


ERROR_CODES = (
    # Raised by this module (the request never reached the run):
    "bad_frame",        # not msgpack, not a map, wrong number of frames, nested too deep, odd types
    "too_large",        # a frame over the size limit, rejected before decoding
    "bad_version",      # `v` missing or not VERSION
    "bad_message",      # an envelope field missing, of the wrong type, or unknown
    "unknown_command",  # `cmd` not in COMMANDS
    "bad_args",         # an argument unknown, missing, of the wrong type or out of range
    # Sent by the daemon:
    "bad_state",        # the command cannot apply in the run's state (e.g. resume after `finished`)
    "command_failed",   # the run tried and refused (e.g. a micro-batch that does not divide the batch)
    "internal",         # a bug in the daemon; the message says what, the daemon log says more
)

MAX_FRAME = 1 << 20
"""Largest request or telemetry frame, in bytes; larger frames are rejected before decoding."""
MAX_REPLY_FRAME = 16 << 20
"""Largest reply frame: a snapshot carries the metric history (a few MB at most, see downsample)."""
MAX_DEPTH = 32
"""Deepest nesting of maps and lists: deeper values would hit recursion limits in consumers."""
MAX_ID_LEN = 128
"""Longest string request id (a uuid4 hex is 32)."""
HEARTBEAT_INTERVAL = 1.0
"""Seconds between heartbeats; a client that hears nothing for 5 intervals treats the daemon as gone."""

_SCALARS = (str, int, float, bool, bytes, type(None))
_REQUEST_KEYS = frozenset({"v", "id", "cmd", "args"})


class ProtocolError(ValueError):
    """A message that breaks the protocol. `code` is one of ERROR_CODES; `id` is the request's id
    when it could be read, so that the daemon can still address its error reply."""

    def __init__(self, code: str, message: str, id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id

    def __reduce__(self):  # picklable with its code and id (e.g. across a multiprocessing queue)
        return type(self), (self.code, self.message, self.id)


# --- frames -----------------------------------------------------------------------------------------

def _pack(obj: dict[str, Any]) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=_to_wire)


def _to_wire(obj: Any) -> Any:
    """msgpack's fallback: numpy/torch scalars become numbers, anything else its str() (Path ...),
    as metrics.jsonl does with default=str; a record with one odd value is still published."""
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            value = item()
        except Exception:  # noqa: BLE001 - e.g. a tensor of many elements: fall back to str()
            value = None
        if isinstance(value, _SCALARS):
            return value
    return str(obj)


def _as_bytes(frame: Any, what: str) -> memoryview:
    """Any buffer (bytes, bytearray, zmq.Frame, memoryview) as bytes; anything else is bad_frame."""
    try:
        view = memoryview(frame)
    except TypeError:
        raise ProtocolError("bad_frame", f"{what} must be bytes, got {type(frame).__name__}") from None
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _unpack(frame: Any, limit: int, what: str) -> dict[str, Any]:
    """One msgpack map from one frame, within `limit` bytes and MAX_DEPTH, of plain types only."""
    view = _as_bytes(frame, what)
    size = view.nbytes
    if size > limit:
        raise ProtocolError("too_large", f"{what} of {size} bytes exceeds the limit of {limit} bytes")
    try:
        # Explicit limits: a header declaring a 4-billion-element array fails here, before any
        # allocation. Extension types are not part of the protocol (max_ext_len=0).
        obj = msgpack.unpackb(view, raw=False, strict_map_key=True, max_str_len=size, max_bin_len=size,
                              max_array_len=size, max_map_len=size, max_ext_len=0)
    except Exception as e:  # noqa: BLE001 - msgpack raises ValueError, TypeError, UnicodeError ...
        raise ProtocolError("bad_frame", f"{what} is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", f"{what} must be a msgpack map, got {type(obj).__name__}")
    _check_plain(obj, what)
    return obj


def _check_plain(obj: Any, what: str) -> None:
    """Reject nesting deeper than MAX_DEPTH and non-plain values (ext types), without recursion."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError("bad_frame", f"{what} is nested deeper than {MAX_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif not isinstance(child, _SCALARS):
                raise ProtocolError("bad_frame", f"{what} holds a value of unsupported type {type(child).__name__}")


def _frame_count(frames: Any) -> int:
    """How many frames a multipart message has; -1 when it is not a list of frames at all."""
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        return -1
    return len(frames)


def _describe(value: Any) -> str:
    """A value for an error message: short, and never the repr of a huge or deep structure."""
    if isinstance(value, (dict, list)):
        return f"a {'map' if isinstance(value, dict) else 'list'}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _is_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN)


def _check_version(msg: Mapping[str, Any], what: str, id: Any = None) -> None:
    if "v" not in msg:
        raise ProtocolError("bad_version", f"{what} has no 'v' (the protocol version; this side speaks {VERSION})", id)
    v = msg["v"]
    if isinstance(v, bool) or v != VERSION or not isinstance(v, int):
        raise ProtocolError("bad_version", f"{what} has protocol version {_describe(v)}; this side speaks {VERSION}",
                            id)


# --- telemetry --------------------------------------------------------------------------------------

def encode_message(seq: int, run: str, topic: str, body: Mapping[str, Any], ts: float | None = None) -> list[bytes]:
    """Frames for the PUB socket: [topic, envelope]. The topic frame lets SUB sockets filter by
    topic (zmq.SUBSCRIBE b"metrics"); the envelope repeats the topic so that it stands alone."""
    msg = {"v": VERSION, "seq": seq, "ts": time.time() if ts is None else ts, "run": run, "topic": topic,
           "body": dict(body) if isinstance(body, Mapping) else body}
    _check_message(msg)
    frame = _pack(msg)
    if len(frame) > MAX_FRAME:
        raise ProtocolError("too_large", f"{topic} message of {len(frame)} bytes exceeds {MAX_FRAME} bytes; "
                                         "shorten it (e.g. truncate the log line)")
    return [topic.encode("ascii"), frame]


def decode_message(frames: Sequence[Any]) -> dict[str, Any]:
    """A validated envelope {v, seq, ts, run, topic, body} from the frames a SUB socket received."""
    count = _frame_count(frames)
    if count != 2:
        got = f"{count} frames" if count >= 0 else type(frames).__name__
        raise ProtocolError("bad_frame", f"a telemetry message is two frames [topic, envelope], got {got}")
    topic_frame = bytes(_as_bytes(frames[0], "topic frame"))
    msg = _unpack(frames[1], MAX_FRAME, "telemetry message")
    _check_message(msg)
    if topic_frame != msg["topic"].encode("ascii"):
        raise ProtocolError("bad_message", f"topic frame {topic_frame[:32]!r} does not match the envelope's "
                                           f"topic {msg['topic']!r}")
    return {key: msg[key] for key in ("v", "seq", "ts", "run", "topic", "body")}


def _check_message(msg: Mapping[str, Any]) -> None:
    _check_version(msg, "telemetry message")
    for key in ("seq", "ts", "run", "topic", "body"):
        if key not in msg:
            raise ProtocolError("bad_message", f"telemetry message has no {key!r}")
    seq, ts, run, topic, body = (msg[k] for k in ("seq", "ts", "run", "topic", "body"))
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ProtocolError("bad_message", f"'seq' must be an integer >= 0, got {_describe(seq)}")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
        raise ProtocolError("bad_message", f"'ts' must be UNIX seconds (a finite number), got {_describe(ts)}")
    if not isinstance(run, str):
        raise ProtocolError("bad_message", f"'run' must be a string, got {_describe(run)}")
    if not isinstance(topic, str) or topic not in TOPICS:
        raise ProtocolError("bad_message", f"'topic' must be one of {', '.join(TOPICS)}; got {_describe(topic)}")
    if not isinstance(body, dict):
        raise ProtocolError("bad_message", f"'body' must be a map, got {_describe(body)}")


# --- control: requests ------------------------------------------------------------------------------

def split_route(frames: Sequence[Any]) -> tuple[list[Any], Any]:
    """ROUTER side: (routing envelope, request frame). The envelope is the peer identity plus, for
    REQ peers and DEALERs that mimic them, everything up to the empty delimiter; send the reply
    back as route + [reply]. Cache replies under route[0], the peer identity."""
    if _frame_count(frames) < 2:
        raise ProtocolError("bad_frame", "a request on the ROUTER socket is [identity, (b''), request]")
    sizes = [_as_bytes(f, "routing frame").nbytes for f in frames]
    if len(frames) == 2:  # a DEALER that sent the bare request
        return [frames[0]], frames[1]
    # REQ puts an empty delimiter right before the request (REQ_CORRELATE adds a request-id frame
    # before that); an empty frame anywhere else means the peer framed its message wrongly.
    if sizes[-2] == 0 and 0 not in sizes[1:-2]:
        return list(frames[:-1]), frames[-1]
    raise ProtocolError("bad_frame", f"a request is one frame after the routing envelope; got {len(frames)} frames "
                                     "(send [b'', request] on DEALER, or just the request on REQ)")


def encode_request(id: str | int, cmd: str, args: Mapping[str, Any] | None = None) -> bytes:
    """A request frame; validated here too, so a client learns of a typo without a round trip."""
    request = {"v": VERSION, "id": id, "cmd": cmd, "args": dict(args or {})}
    return _pack(_check_request(request))


def decode_request(frame: Any) -> dict[str, Any]:
    """A validated request {v, id, cmd, args}, args as given (defaults are the daemon's to apply)."""
    return _check_request(_unpack(frame, MAX_FRAME, "request"))


def _check_request(msg: Mapping[str, Any]) -> dict[str, Any]:
    raw_id = msg.get("id")
    id = raw_id if _is_id(raw_id) else None  # still answerable when only something else is wrong

    def error(code: str, message: str) -> ProtocolError:
        return ProtocolError(code, message, id)

    _check_version(msg, "request", id)
    unknown = [key for key in msg if key not in _REQUEST_KEYS]
    if unknown:
        raise error("bad_message", f"request has unknown field {unknown[0]!r}; a request is {{v, id, cmd, args}}")
    if "id" not in msg:
        raise error("bad_message", "request has no 'id' (a string or integer naming it, e.g. a uuid4 hex)")
    if id is None:
        raise error("bad_message", f"'id' must be an integer or a string of 1 to {MAX_ID_LEN} characters, "
                                   f"got {_describe(raw_id)}")
    cmd = msg.get("cmd")
    if not isinstance(cmd, str):
        got = _describe(cmd) if "cmd" in msg else "none"
        raise error("bad_message", f"'cmd' must be a command name (a string), got {got}")
    if cmd not in COMMANDS:
        raise error("unknown_command", f"unknown command {cmd[:40]!r}; known: {', '.join(COMMANDS)}")
    args = msg.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise error("bad_args", f"{cmd}: 'args' must be a map, got {_describe(args)}")
    spec = COMMANDS[cmd]
    for name in args:
        if name not in spec:
            takes = f"it takes {', '.join(spec)}" if spec else "it takes no arguments"
            raise error("bad_args", f"{cmd}: unknown argument {str(name)[:40]!r}; {takes}")
    for name, (kind, default) in spec.items():
        if name not in args:
            if default is REQUIRED:
                raise error("bad_args", f"{cmd}: argument {name!r} is required ({kind.__name__})")
            continue
        value = args[name]
        # bool is an int in Python, never on this wire: True is not a micro-batch size.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise error("bad_args", f"{cmd}: argument {name!r} must be {kind.__name__}, got {_describe(value)}")
        minimum = _MINIMUM.get((cmd, name))
        if minimum is not None and value < minimum:
            raise error("bad_args", f"{cmd}: argument {name!r} must be >= {minimum}, got {value}")
    return {"v": VERSION, "id": id, "cmd": cmd, "args": dict(args)}


# --- control: replies -------------------------------------------------------------------------------

def encode_reply(id: str | int | None, result: Mapping[str, Any] | None = None,
                 error: ProtocolError | Mapping[str, Any] | None = None) -> bytes:
    """A reply frame: {ok: true, result} or, given `error` (a ProtocolError or {code, message}),
    {ok: false, error}. `id` is None only when the request's id could not be read."""
    if id is not None and not _is_id(id):
        raise ProtocolError("bad_message", f"reply 'id' must be the request's id, got {_describe(id)}")
    if error is not None:
        if result is not None:
            raise ProtocolError("bad_message", "a reply carries a result or an error, not both")
        if isinstance(error, ProtocolError):
            error = {"code": error.code, "message": error.message}
        reply = {"v": VERSION, "id": id, "ok": False, "error": dict(error)}
    else:
        reply = {"v": VERSION, "id": id, "ok": True, "result": dict(result or {})}
    _check_reply(reply)
    frame = _pack(reply)
    if len(frame) > MAX_REPLY_FRAME:
        raise ProtocolError("too_large", f"reply of {len(frame)} bytes exceeds {MAX_REPLY_FRAME} bytes")
    return frame


def decode_reply(frame: Any, max_size: int = MAX_REPLY_FRAME) -> dict[str, Any]:
    """A validated reply {v, id, ok, result} or {v, id, ok, error: {code, message}}."""
    reply = _check_reply(_unpack(frame, max_size, "reply"))
    outcome = "result" if reply["ok"] else "error"
    return {"v": reply["v"], "id": reply["id"], "ok": reply["ok"], outcome: reply[outcome]}


def _check_reply(reply: Mapping[str, Any]) -> Mapping[str, Any]:
    _check_version(reply, "reply")
    if "id" not in reply or not (reply["id"] is None or _is_id(reply["id"])):
        raise ProtocolError("bad_message", f"reply 'id' must be the request's id or nil, got "
                                           f"{_describe(reply.get('id'))}")
    ok = reply.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError("bad_message", f"reply 'ok' must be true or false, got {_describe(ok)}")
    if ok:
        if not isinstance(reply.get("result"), dict):
            raise ProtocolError("bad_message", f"reply 'result' must be a map, got {_describe(reply.get('result'))}")
    else:
        error = reply.get("error")
        if not isinstance(error, dict):
            raise ProtocolError("bad_message", f"reply 'error' must be a map {{code, message}}, got {_describe(error)}")
        for key in ("code", "message"):
            if not isinstance(error.get(key), str):
                raise ProtocolError("bad_message", f"reply error {key!r} must be a string, got "
                                                   f"{_describe(error.get(key))}")
    return reply


def request(context, endpoint: str, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = 600,
            curve: tuple[bytes, bytes, bytes] | None = None) -> dict[str, Any]:
    """One command to a daemon's control endpoint (a zmq.Context's DEALER socket of its own, with
    CURVE keys (public, secret, server's public) where given): the decoded reply {ok, result |
    error}, which comes once the command has been applied. TimeoutError if none comes within
    `timeout` seconds; ProtocolError for an unreadable one. What `qwen-daemon ctl` and the TUI send."""
    import os

    import zmq

    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    if curve:
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = curve
    try:
        sock.connect(endpoint)
        request_id = os.urandom(8).hex()
        sock.send_multipart([b"", encode_request(request_id, cmd, args)])
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and sock.poll(left * 1000):
            reply = decode_reply(sock.recv_multipart()[-1])
            if reply["id"] == request_id:  # (not a late reply to an earlier request on this route)
                return reply
        raise TimeoutError(f"no reply within {timeout:g} s")
    finally:
        sock.close()
