"""Training checkpoints on disk, without torch: the layout, the manifest, listing, verifying, and
finding the newest good one. The supervisor (to restart a worker) and the TUI use this;
qwen_daemon/train/checkpoint.py writes and restores checkpoints and re-exports all of it.

A checkpoint is the directory ``<run_dir>/checkpoints/checkpoint-<step>/``; its ``manifest.json``,
written last, is ``{"format", "step", "created", "files": {relative path: {"size", "sha256"}}}``.
A directory without a manifest, or whose files do not match it, is not a valid checkpoint.
Interrupted saves leave ``.tmp-``, ``.old-`` and ``.trash-checkpoint-<step>-<pid>`` directories
(runs.atomic_directory and retention); :func:`recover_leftovers` cleans them up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared import runs

log = logging.getLogger(__name__)

FORMAT = 1
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
# What every checkpoint must list in its manifest; peft's model card (README.md) and the
# subdirectories of extra adapters are listed too but not required.
REQUIRED_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, STATE_FILE)

# No leading zeros: "checkpoint-007" and "checkpoint-7" would be two directories for one step.
_CHECKPOINT_RE = re.compile(r"checkpoint-(0|[1-9][0-9]*)")
_LEFTOVER_RE = re.compile(r"\.(tmp|old|trash)-checkpoint-(0|[1-9][0-9]*)-([0-9]+)")
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message says which and what to do."""


def checkpoints_dir(run_dir: Path) -> Path:
    """``<run_dir>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_step(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` directory name; ValueError for any other name."""
    m = _CHECKPOINT_RE.fullmatch(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a checkpoint directory name (expected checkpoint-<step>)")
    return int(m.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` directories of a run, oldest step first; [] when there are none.

    Only the name is checked: use :func:`verify_checkpoint` or :func:`latest_valid_checkpoint`
    before trusting one.
    """
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _CHECKPOINT_RE.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step)


def checkpoint_size(path: Path) -> int:
    """Bytes of a checkpoint's files, from its manifest (0 when it has none)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text(encoding="utf-8"))
        return sum(int(f["size"]) for f in manifest["files"].values()) + len(json.dumps(manifest))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def write_manifest(path: Path, step: int) -> None:
    """Write the manifest of the files in checkpoint directory ``path``; the last file of a save."""
    files = {file.relative_to(path).as_posix(): {"size": file.stat().st_size, "sha256": _sha256(file)}
             for file in sorted(path.rglob("*")) if file.is_file()}
    manifest = {"format": FORMAT, "step": step, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": files}
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def verify_checkpoint(path: Path) -> None:
    """Check a checkpoint directory against its manifest; CheckpointError says what is wrong.

    Checks that the manifest exists and parses, lists every required file, and that each listed
    file exists with the recorded size and SHA-256. Reads every file once.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path}: missing; the save did not finish or this is not a checkpoint written by "
            "qwen_daemon; delete the directory"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable ({e}); the checkpoint is damaged, delete it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest (no 'files' table); delete the checkpoint")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{manifest_path}: checkpoint format {manifest.get('format')!r}, this version reads format {FORMAT}; "
            "resume it with the qwen_daemon version that wrote it"
        )
    m = _CHECKPOINT_RE.fullmatch(path.name)
    if m and manifest.get("step") != int(m.group(1)):
        raise CheckpointError(
            f"{manifest_path}: records step {manifest.get('step')!r} but the directory is {path.name}; "
            "it was renamed or copied over, delete it"
        )
    files: dict[str, Any] = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{manifest_path}: does not list {name}; the checkpoint is incomplete, delete it")
    for rel, info in files.items():
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts:
            raise CheckpointError(f"{manifest_path}: lists a path outside the checkpoint ({rel!r}); delete it")
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(f"{manifest_path}: malformed entry for {rel!r}; delete the checkpoint")
        file = path / rel_path
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the manifest lists it); the checkpoint is incomplete, delete it")
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(
                f"{file}: {size} bytes, the manifest says {info['size']}; the file was truncated or changed, "
                "delete the checkpoint"
            )
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(
                f"{file}: SHA-256 does not match the manifest; the file is corrupt, delete the checkpoint"
            )


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`, or None.

    Logs a warning for each newer one that fails. Also finishes what a crashed writer left
    behind (:func:`recover_leftovers`), so that a checkpoint set aside while being replaced
    is found again.
    """
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        try:
            recover_leftovers(root)
        except OSError as e:
            # A read-only observer (e.g. the TUI as another user) can still list and verify.
            log.warning("cannot clean up interrupted saves in %s: %s", root, e)
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            continue
        return path
    return None


def recover_leftovers(root: Path) -> None:
    """Clean up after writers that died mid-save, for every step: their builds as
    runs.recover_leftovers does (a set-aside checkpoint put back, temporaries removed), and what
    retention was deleting. A running process's leftovers are left alone."""
    for entry in sorted(root.iterdir()):
        m = _LEFTOVER_RE.fullmatch(entry.name)
        if m is None or not entry.exists():  # (gone with an earlier entry of the same step)
            continue
        if m.group(1) != "trash":
            runs.recover_leftovers(root / f"checkpoint-{m.group(2)}")
        elif runs.dead_or_mine(int(m.group(3))):
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed %s left behind by an interrupted deletion (pid %s)", entry, m.group(3))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()
