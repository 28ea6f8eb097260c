"""Crash-safe training checkpoints: save and restore (torch and peft).

The training loop saves and restores through this module only and knows nothing of the file
layout. A checkpoint is the directory ``<run_dir>/checkpoints/checkpoint-<step>/`` holding:

- the LoRA adapter as peft writes it (``adapter_model.safetensors``, ``adapter_config.json``,
  a model card), so the directory also loads with ``PeftModel.from_pretrained(base, dir)``;
- ``optimizer.pt``, ``scheduler.pt``: the ``state_dict()`` of each;
- ``rng.pt``: python ``random``, numpy (when importable), torch CPU and every CUDA device's RNG;
- ``state.json``: the :class:`TrainState`;
- ``manifest.json``, written last (shared/checkpoints.py). A directory without a manifest, or
  whose files do not match it, is not a valid checkpoint.

Listing, verifying and finding the newest good checkpoint need no torch: they are in
shared/checkpoints.py (the supervisor uses them) and re-exported here.

Atomicity: a save is built with ``runs.atomic_directory`` in
``checkpoints/.tmp-checkpoint-<step>-<pid>``, every file and directory is fsynced, and only then
is the directory renamed to ``checkpoint-<step>`` (and the parent fsynced). A crash before the
rename leaves no ``checkpoint-*`` directory. Replacing an existing step renames the old directory
to ``.old-checkpoint-<step>-<pid>`` first, so one of the two is always complete on disk;
checkpoints deleted by retention go through ``.trash-checkpoint-<step>-<pid>`` so that a
half-deleted one never looks like a checkpoint. Leftovers of a writer that is no longer running
are cleaned up (an ``.old-`` one is put back when its replacement never arrived) by the next
:func:`save_checkpoint` or :func:`latest_valid_checkpoint`.

torch and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import runs
from shared.checkpoints import (  # noqa: F401 - some only re-exported (the loop and tests)
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    REQUIRED_FILES,
    RNG_FILE,
    SCHEDULER_FILE,
    STATE_FILE,
    CheckpointError,
    checkpoint_size,
    checkpoint_step,
    checkpoints_dir,
    latest_valid_checkpoint,
    list_checkpoints,
    recover_leftovers,
    verify_checkpoint,
    write_manifest,
)

log = logging.getLogger(__name__)

# A checkpoint is written only when the disk has this times its expected size free (the newest
# checkpoint's size, or the caller's estimate before the first).
SPACE_MARGIN = 1.5

# peft's default ("auto") asks the Hugging Face hub, on every save, whether the base model's
# vocabulary was resized (a network round trip, or a timeout on an offline server) and may then
# copy the whole embedding matrix into each checkpoint. We never resize the vocabulary, so the
# adapter tensors alone are saved; loading compares against the same selection.
SAVE_EMBEDDING_LAYERS = False


@dataclass
class TrainState:
    """Where training is; everything the loop needs to continue exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    samples_in_epoch: int = 0  # data position: samples of this epoch already consumed
    samples_seen: int = 0  # samples consumed since the start of the run
    micro_batch_size: int = 1  # per process
    grad_accum: int = 1
    processes: int = 1  # ranks that trained; a resume with another number keeps the global batch
    checkpointed_layers: int | None = None  # decoder layers recomputed (None: as train.grad_checkpointing says)
    offload: bool = False  # their inputs kept in host memory
    fitted_on: str | None = None  # GPU and processes the memory plan was fitted for (fitting.fingerprint)
    finished: bool = False  # the run reached its last step and did its end-of-run work
    eval_loss: float | None = None  # latest validation loss
    best_eval_loss: float | None = None
    best_step: int | None = None


# --------------------------------------------------------------------------- saving


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


class NoSpace(OSError):
    """Too little free space for a checkpoint: nothing was written and nothing deleted."""


def save_checkpoint(run_dir: Path, state: TrainState, model, optimizer, scheduler, *, keep_last: int,
                    rank_rng_states: list[dict[str, Any]] | None = None,
                    adapter_state: dict[str, Any] | None = None, optimizer_state: dict[str, Any] | None = None,
                    expected_bytes: int = 0) -> Path:
    """Write checkpoint-<state.step> atomically, then apply retention; returns its path.

    ``model`` is a peft ``PeftModel``, possibly wrapped in DDP / DataParallel / torch.compile.
    An existing checkpoint of the same step is replaced (atomically). Retention keeps the
    ``keep_last`` newest checkpoints, the one at ``state.best_step`` (when it exists) and always
    the one just written; the others are deleted. Call it on one process only (rank 0 under
    DDP); it is not safe to call from two threads at once. ``rank_rng_states``: every rank's
    ``capture_rng_state()``, in rank order (under DDP each rank draws its own dropout masks).
    ``adapter_state`` / ``optimizer_state``: what to write instead of the model's LoRA weights
    and ``optimizer.state_dict()`` (under FSDP: gathered from the shards, by parameter name).

    NoSpace, before anything is written, when the disk has less than SPACE_MARGIN x the newest
    checkpoint's size free (``expected_bytes`` before the first); a disk that fills while writing
    raises its OSError with nothing left behind. Either way no older checkpoint is deleted.
    """
    import torch

    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    peft_model = unwrap_model(model)
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    recover_leftovers(root)
    existing = list_checkpoints(run_dir)
    needed = SPACE_MARGIN * (checkpoint_size(existing[-1]) if existing else expected_bytes)
    if (free := free_bytes(root)) < needed:
        raise NoSpace(f"{root}: {free / 2**20:.0f} MiB free, a checkpoint needs about {needed / 2**20:.0f} MiB; "
                      "free some space (older runs' checkpoints, caches) or lower checkpoint.keep_last")

    step = int(state.step)
    final = root / f"checkpoint-{step}"
    with runs.atomic_directory(final) as tmp:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=SAVE_EMBEDDING_LAYERS, state_dict=adapter_state)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save({"ranks": rank_rng_states} if rank_rng_states else capture_rng_state(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n", encoding="utf-8")
        write_manifest(tmp, step)
    log.info("saved checkpoint %s", final)

    _apply_retention(run_dir, keep_last=keep_last, best_step=state.best_step, current_step=step)
    return final


def unwrap_model(model):
    """The PeftModel inside DDP / DataParallel / torch.compile wrappers; TypeError for anything else."""
    import torch
    from peft import PeftModel

    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(model, torch.nn.Module):
            # torch.compile's wrapper; matched by name so that torch._dynamo is not imported for it.
            model = model._orig_mod
        else:
            break
    if not isinstance(model, PeftModel):
        raise TypeError(f"checkpoints hold a LoRA adapter: expected a peft PeftModel, got {type(model).__name__}")
    return model


def _apply_retention(run_dir: Path, *, keep_last: int, best_step: int | None, current_step: int) -> None:
    """Delete all checkpoints but the keep_last newest, the best one and the current one."""
    checkpoints = list_checkpoints(run_dir)
    keep = {checkpoint_step(p) for p in checkpoints[-keep_last:]}
    keep.add(current_step)
    if best_step is not None:
        keep.add(int(best_step))
    root = checkpoints_dir(run_dir)
    for path in checkpoints:
        step = checkpoint_step(path)
        if step in keep:
            continue
        # Rename first: a crash in the middle of rmtree must not leave a half checkpoint-N behind.
        trash = root / f".trash-checkpoint-{step}-{os.getpid()}"
        try:
            os.rename(path, trash)
            shutil.rmtree(trash)
        except OSError as e:
            # The new checkpoint is safe; failing to delete an old one must not stop training.
            log.warning("could not delete old checkpoint %s: %s; delete it by hand to free the space", path, e)
            continue
        log.info("deleted old checkpoint %s (keeping the %d newest and the best)", path, keep_last)
    runs.fsync_path(root)


def capture_rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        state["numpy"] = np.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# --------------------------------------------------------------------------- loading


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0,
                    load_optimizer_state: Callable[[dict], None] | None = None) -> TrainState:
    """Verify a checkpoint and restore it in place; returns its TrainState.

    Restores the adapter weights into ``model`` (a PeftModel, possibly wrapped), the optimizer
    and scheduler state, and the RNG states (last, so nothing here consumes randomness after
    them). Everything is read and checked against the model and optimizer before anything is
    changed. CheckpointError when the checkpoint is invalid or does not fit (different LoRA rank
    or target modules, different optimizer parameter groups). ``load_optimizer_state`` loads
    what ``save_checkpoint`` was given as ``optimizer_state`` (default: optimizer.load_state_dict).
    """
    path = Path(path)
    verify_checkpoint(path)
    peft_model = unwrap_model(model)
    state = _read_state(path / STATE_FILE)

    adapters = {name: _read_adapter(path, peft_model, name) for name in peft_model.peft_config}
    # These files are our own (the manifest checksums match what save_checkpoint wrote) and hold
    # python objects (param group options, scheduler attributes, RNG tuples, bitsandbytes'
    # quantisation maps), which weights_only=True refuses. Optimizer tensors stay on the CPU
    # here: optimizer.load_state_dict moves them to each parameter's device itself.
    optimizer_state = _torch_load(path / OPTIMIZER_FILE)
    scheduler_state = _torch_load(path / SCHEDULER_FILE)
    rng_state = _torch_load(path / RNG_FILE)
    _check_optimizer_fits(path / OPTIMIZER_FILE, optimizer_state, optimizer)

    for name, weights in adapters.items():
        _set_adapter_weights(path, peft_model, name, weights)
    _load_state_dict(load_optimizer_state or optimizer.load_state_dict, optimizer_state, path / OPTIMIZER_FILE,
                     "optimizer")
    _load_state_dict(scheduler.load_state_dict, scheduler_state, path / SCHEDULER_FILE, "scheduler")
    if "ranks" in rng_state:  # one state per rank; on more ranks than saved, wrap around
        rng_state = rng_state["ranks"][rank % len(rng_state["ranks"])]
    _restore_rng_state(rng_state)
    log.info("restored checkpoint %s (step %d)", path, state.step)
    return state


def _load_state_dict(load: Callable[[dict], None], state: dict, path: Path, what: str) -> None:
    try:
        load(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        hint = " (launch.strategy decides the optimizer)" if what == "optimizer" else ""
        raise CheckpointError(f"{path}: does not fit this {what} ({e}); resume with the {what} settings of the run "
                              f"that wrote it{hint}") from e


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # unpickling fails in many ways; each means an unusable file
        raise CheckpointError(f"{path}: cannot be loaded ({type(e).__name__}: {e}); delete the checkpoint") from e


def _read_state(path: Path) -> TrainState:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); delete the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a training state object; delete the checkpoint")
    known = {f.name for f in dataclasses.fields(TrainState)}
    unknown = sorted(set(data) - known)
    if unknown:
        # Written by a newer version: the fields this version knows are enough to continue.
        log.warning("%s: ignoring unknown fields %s", path, ", ".join(unknown))
    try:
        return TrainState(**{k: v for k, v in data.items() if k in known})
    except TypeError as e:
        raise CheckpointError(f"{path}: invalid training state ({e}); delete the checkpoint") from None


def _adapter_dir(path: Path, adapter_name: str) -> Path:
    # peft's save_pretrained puts the "default" adapter at the top and any other in a subdirectory.
    return path if adapter_name == "default" else path / adapter_name


def _read_adapter(path: Path, peft_model, adapter_name: str) -> dict:
    """The saved adapter tensors, checked against the model's adapter (same keys, same shapes)."""
    from peft import get_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = _adapter_dir(path, adapter_name) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise CheckpointError(
            f"{weights_path}: missing; the checkpoint has no weights for the model's adapter {adapter_name!r}"
        )
    device = _adapter_device(peft_model, adapter_name)
    try:
        saved = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_path}: cannot be read ({e}); delete the checkpoint") from e

    # save_pretrained wrote exactly get_peft_model_state_dict(); the same call on this model
    # gives the keys and shapes the checkpoint must have.
    expected = get_peft_model_state_dict(
        peft_model, adapter_name=adapter_name, save_embedding_layers=SAVE_EMBEDDING_LAYERS
    )
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong_shape = sorted(
        k for k in set(saved) & set(expected) if tuple(saved[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong_shape:
        details = []
        if wrong_shape:
            k = wrong_shape[0]
            details.append(
                f"{len(wrong_shape)} tensors of another shape (e.g. {k}: {tuple(saved[k].shape)} in the checkpoint, "
                f"{tuple(expected[k].shape)} in the model)"
            )
        if unexpected:
            details.append(f"{len(unexpected)} tensors the model lacks (e.g. {unexpected[0]})")
        if missing:
            details.append(f"{len(missing)} model tensors not in the checkpoint (e.g. {missing[0]})")
        raise CheckpointError(
            f"{weights_path}: the checkpoint's LoRA adapter does not match the model's "
            f"({_describe_lora(_adapter_dir(path, adapter_name) / ADAPTER_CONFIG)} in the checkpoint; "
            f"{_describe_lora(peft_model.peft_config[adapter_name])} in the model): {'; '.join(details)}. "
            "Resume with the LoRA settings (lora.r, lora.target_modules, ...) of the run that wrote it, "
            "or start a new run."
        )
    return saved


def _set_adapter_weights(path: Path, peft_model, adapter_name: str, weights: dict) -> None:
    from peft import set_peft_model_state_dict

    weights_path = _adapter_dir(path, adapter_name) / ADAPTER_WEIGHTS
    try:
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    except RuntimeError as e:  # load_state_dict's size mismatch, even with strict=False
        raise CheckpointError(f"{weights_path}: the checkpoint's LoRA adapter does not match the model: {e}") from e
    # missing_keys also lists every base-model weight (strict=False); only the adapter's count.
    marker = f".{adapter_name}."
    missing = [k for k in result.missing_keys if marker in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{weights_path}: the checkpoint's LoRA adapter does not match the model "
            f"(unexpected: {list(result.unexpected_keys)[:3]}, not restored: {missing[:3]}); "
            "resume with the LoRA settings of the run that wrote it"
        )


def _adapter_device(peft_model, adapter_name: str):
    import torch

    marker = f".{adapter_name}."
    for name, param in peft_model.named_parameters():
        if marker in name:
            return param.device
    return torch.device("cpu")


def _describe_lora(config_or_path) -> str:
    """'r=16, target_modules=[...]' from a peft config or an adapter_config.json."""
    if isinstance(config_or_path, Path):
        try:
            cfg = json.loads(config_or_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return "unreadable adapter_config.json"
    else:
        cfg = {"r": getattr(config_or_path, "r", None),
               "target_modules": getattr(config_or_path, "target_modules", None)}
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, set, tuple)):
        targets = sorted(targets)
    return f"r={cfg.get('r')}, target_modules={targets}"


def _check_optimizer_fits(path: Path, saved: Any, optimizer) -> None:
    """Same number of parameter groups and parameters per group, before anything is changed."""
    if not isinstance(saved, dict) or "param_groups" not in saved or "state" not in saved:
        raise CheckpointError(f"{path}: not an optimizer state; delete the checkpoint")
    saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != sizes:
        raise CheckpointError(
            f"{path}: optimizer parameter groups of sizes {saved_sizes}, this optimizer has {sizes}; "
            "resume with the same LoRA and optimizer settings as the run that wrote it"
        )


def _restore_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            log.warning("the checkpoint has a numpy RNG state but numpy is not installed; not restored")
        else:
            np.random.set_state(state["numpy"])
    cuda_states = state.get("cuda")
    if cuda_states:
        if not torch.cuda.is_available():
            log.warning("the checkpoint has CUDA RNG states but CUDA is not available; not restored")
            return
        count = torch.cuda.device_count()
        if count != len(cuda_states):
            log.warning(
                "the checkpoint has RNG states for %d CUDA devices, %d are visible; restoring the first %d",
                len(cuda_states), count, min(count, len(cuda_states)),
            )
        for index, device_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(device_state, index)
