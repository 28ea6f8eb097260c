"""The supervisor <-> worker wire: what both sides of that link import, and nothing else does.

Two ZeroMQ IPC links per worker group (docs/architecture.md):
- telemetry, every rank's PUSH to the supervisor's PULL: msgpack maps {topic, body}. The topics
  are the client protocol's metrics, log and event, which the supervisor republishes, and two of
  this link's own: `rank` (a process's torch memory figures, merged into the gpu topic) and
  `reply` (a command applied, in order after everything that step sent);
- commands, the supervisor's PAIR to rank 0's: msgpack maps {id, cmd, args}, already validated
  against shared.protocol.COMMANDS by the supervisor.

A frame that is not what this module writes raises WireError, which the reader logs and drops:
a malformed message never stops a run.
"""

from __future__ import annotations

from typing import Any

import msgpack

TELEMETRY_ENV = "QWEN_DAEMON_WORKER_TELEMETRY"  # the supervisor's PULL endpoint
CONTROL_ENV = "QWEN_DAEMON_WORKER_CONTROL"  # the supervisor's PAIR endpoint, one per worker group
MODULE_ENV = "QWEN_DAEMON_WORKER_MODULE"  # another worker program speaking this wire (tests, benchmarks)

EXIT_FINISHED, EXIT_STOPPED, EXIT_FAILED = 0, 10, 1
"""A worker's exit codes: training finished; stopped (a command or a signal); failed (the reason
is the last `error` or `crash` event)."""

TOPICS = ("metrics", "log", "event", "rank", "reply")


class WireError(ValueError):
    """A frame on this link that is not a message of it."""


def telemetry(topic: str, body: dict[str, Any]) -> bytes:
    """A telemetry frame; values msgpack cannot carry are sent as their str()."""
    return msgpack.packb({"topic": topic, "body": body}, use_bin_type=True, default=str)


def read_telemetry(frame: bytes) -> tuple[str, dict[str, Any]]:
    message = _unpack(frame)
    topic, body = message.get("topic"), message.get("body")
    if topic not in TOPICS or not isinstance(body, dict):
        raise WireError(f"not a telemetry message (topic {str(topic)[:40]!r}, body {type(body).__name__})")
    return topic, body


def reply(id: int, result: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    """The body of a `reply` telemetry message: the command `id` applied (result) or not (error)."""
    if error is not None:
        return {"id": id, "ok": False, "error": error}
    return {"id": id, "ok": True, "result": result or {}}


def command(id: int, cmd: str, args: dict[str, Any] | None = None) -> bytes:
    return msgpack.packb({"id": id, "cmd": cmd, "args": args or {}}, use_bin_type=True)


def read_command(frame: bytes) -> tuple[int, str, dict[str, Any]]:
    message = _unpack(frame)
    id, cmd, args = message.get("id"), message.get("cmd"), message.get("args")
    if not isinstance(id, int) or not isinstance(cmd, str) or not isinstance(args, dict):
        raise WireError(f"not a command message: {str(message)[:80]}")
    return id, cmd, args


def _unpack(frame: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(frame, raw=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises several kinds
        raise WireError(f"not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(message, dict):
        raise WireError(f"not a map but {type(message).__name__}")
    return message
