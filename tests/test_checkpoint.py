"""Checkpoints with a tiny real Qwen3 + LoRA model, a real optimizer and scheduler (no mocks)."""

import copy
import json
import logging
import os
import select
import random
import re
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import Qwen3Config, Qwen3ForCausalLM

from qwen_daemon.train import checkpoint
from qwen_daemon.train.checkpoint import (
    ADAPTER_WEIGHTS,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    REQUIRED_FILES,
    CheckpointError,
    TrainState,
    checkpoint_step,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
    verify_checkpoint,
)

LOGGER = "shared.checkpoints"  # finding checkpoints and cleaning up after interrupted saves


def _base_model(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=64,
    )
    return Qwen3ForCausalLM(config)


def _train_step(model, optimizer, scheduler) -> None:
    ids = torch.randint(0, 256, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _trainer(r: int = 4, targets=("q_proj", "v_proj")):
    """PeftModel + AdamW + LambdaLR after one optimizer step (non-trivial optimizer state, LoRA B != 0)."""
    lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(targets))
    model = get_peft_model(_base_model(), lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    _train_step(model, optimizer, scheduler)
    return model, optimizer, scheduler


def _adapter(model) -> dict[str, torch.Tensor]:
    weights = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().clone() for k, v in weights.items()}


def _draws():
    return torch.rand(4), random.random(), float(np.random.rand())


def _assert_same(a, b, where="") -> None:
    """Deep equality of nested dicts / sequences / tensors / numbers."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _dot_entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path):
    model, optimizer, scheduler = _trainer()
    state = TrainState(step=7, epoch=1, samples_in_epoch=12, samples_seen=40, micro_batch_size=2, grad_accum=2,
                       eval_loss=1.25, best_eval_loss=1.0, best_step=5)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)

    path = save_checkpoint(tmp_path, state, model, optimizer, scheduler, keep_last=3)

    assert path == tmp_path / "checkpoints" / "checkpoint-7"
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    assert manifest["format"] == 1 and manifest["step"] == 7
    assert set(REQUIRED_FILES) <= set(manifest["files"])
    assert latest_valid_checkpoint(tmp_path) == path
    expected_adapter = _adapter(model)
    expected_optimizer = copy.deepcopy(optimizer.state_dict())
    expected_scheduler = copy.deepcopy(scheduler.state_dict())
    expected_draws = _draws()

    # Move everything on: weights, optimizer, scheduler and all RNGs.
    _train_step(model, optimizer, scheduler)
    _draws()
    assert not torch.equal(next(iter(_adapter(model).values())), next(iter(expected_adapter.values())))

    restored = load_checkpoint(path, model, optimizer, scheduler)

    assert restored == state
    _assert_same(_adapter(model), expected_adapter, "adapter")
    _assert_same(optimizer.state_dict(), expected_optimizer, "optimizer")
    _assert_same(scheduler.state_dict(), expected_scheduler, "scheduler")
    _assert_same(_draws(), expected_draws, "rng")
    # The parameters the optimizer holds are still the model's (restored in place).
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for g in optimizer.param_groups for p in g["params"])

    # The directory is an ordinary peft adapter directory too.
    fresh = PeftModel.from_pretrained(_base_model(), path)
    _assert_same(_adapter(fresh), expected_adapter, "from_pretrained")


def test_save_does_not_ask_the_hub(tmp_path, monkeypatch):
    """peft's save_embedding_layers="auto" would look the base model up on the hub at every save."""
    import peft.utils.save_and_load

    def no_hub(*args, **kwargs):
        raise AssertionError("a checkpoint save must not contact the Hugging Face hub")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)
    model, optimizer, scheduler = _trainer()
    model.peft_config["default"].base_model_name_or_path = "Qwen/Qwen3-4B-Thinking-2507"
    path = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=1)
    load_checkpoint(path, model, optimizer, scheduler)


def test_state_with_no_eval_round_trips(tmp_path):
    model, optimizer, scheduler = _trainer()
    state = TrainState(step=1)
    path = save_checkpoint(tmp_path, state, model, optimizer, scheduler, keep_last=1)
    assert load_checkpoint(path, model, optimizer, scheduler) == state


def test_failure_midway_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trainer()
    good = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=3)
    seen_before_failure = []

    def failing_save(obj, f, *args, **kwargs):
        seen_before_failure.extend(os.listdir(Path(f).parent))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path, TrainState(step=2), model, optimizer, scheduler, keep_last=3)
    monkeypatch.undo()

    assert ADAPTER_WEIGHTS in seen_before_failure  # it failed after the adapter was written
    assert list_checkpoints(tmp_path) == [good]
    assert latest_valid_checkpoint(tmp_path) == good
    assert _dot_entries(tmp_path) == []  # the failed writer cleaned up after itself


def test_too_little_space_writes_nothing_and_deletes_nothing(tmp_path, monkeypatch):
    model, optimizer, scheduler = _trainer()
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 10_000)
    with pytest.raises(checkpoint.NoSpace, match=r"MiB free, a checkpoint needs"):  # before the first: the estimate
        save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=1, expected_bytes=10_000)
    monkeypatch.undo()
    good = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=1)
    size = checkpoint.checkpoint_size(good)
    assert size > sum(f.stat().st_size for f in good.iterdir()) * 0.99
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: int(size * 1.2))  # under SPACE_MARGIN x its size
    with pytest.raises(checkpoint.NoSpace):
        save_checkpoint(tmp_path, TrainState(step=2), model, optimizer, scheduler, keep_last=1)
    assert list_checkpoints(tmp_path) == [good] and _dot_entries(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_writer_killed_midway(tmp_path, caplog):
    """A real child process SIGKILLed in the middle of a save (after adapter and optimizer were written)."""
    model, optimizer, scheduler = _trainer()
    good = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=3)
    reached, signal_reached = os.pipe()

    class StallingScheduler:
        """Stands in for the scheduler so the child is reliably killed mid-save, not before or after."""

        def state_dict(self):
            os.write(signal_reached, b"!")  # tell the parent, then wait to be killed
            time.sleep(120)
            return {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12 warns on fork with threads
        pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            save_checkpoint(tmp_path, TrainState(step=2), model, optimizer, StallingScheduler(), keep_last=3)
        finally:
            os._exit(1)
    try:
        ready, _, _ = select.select([reached], [], [], 60)
        assert ready and os.read(reached, 1) == b"!", "the child never reached the scheduler"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    leftover = tmp_path / "checkpoints" / f".tmp-checkpoint-2-{pid}"
    assert (leftover / ADAPTER_WEIGHTS).is_file() and (leftover / OPTIMIZER_FILE).is_file()
    assert list_checkpoints(tmp_path) == [good]
    verify_checkpoint(good)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        new = save_checkpoint(tmp_path, TrainState(step=2), model, optimizer, scheduler, keep_last=3)
    assert not leftover.exists()
    assert str(leftover) in caplog.text
    assert _dot_entries(tmp_path) == []
    assert latest_valid_checkpoint(tmp_path) == new


def _flip_adapter_byte(path: Path) -> str:
    file = path / ADAPTER_WEIGHTS
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    return ADAPTER_WEIGHTS


def _truncate_optimizer(path: Path) -> str:
    file = path / OPTIMIZER_FILE
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    return OPTIMIZER_FILE


def _remove_manifest(path: Path) -> str:
    (path / MANIFEST_FILE).unlink()
    return MANIFEST_FILE


@pytest.mark.parametrize("corrupt", [_flip_adapter_byte, _truncate_optimizer, _remove_manifest])
def test_corrupt_checkpoint_is_skipped(tmp_path, caplog, corrupt):
    model, optimizer, scheduler = _trainer()
    older = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=3)
    newer = save_checkpoint(tmp_path, TrainState(step=2), model, optimizer, scheduler, keep_last=3)

    bad_file = corrupt(newer)

    with pytest.raises(CheckpointError, match=re.escape(str(newer / bad_file))):
        verify_checkpoint(newer)
    with pytest.raises(CheckpointError, match=re.escape(bad_file)):
        load_checkpoint(newer, model, optimizer, scheduler)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert latest_valid_checkpoint(tmp_path) == older
    assert "checkpoint-2" in caplog.text and bad_file in caplog.text


def test_retention_keeps_newest_and_best(tmp_path):
    model, optimizer, scheduler = _trainer()
    best = best_step = None
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.6)]:
        if best is None or loss < best:
            best, best_step = loss, step
        state = TrainState(step=step, eval_loss=loss, best_eval_loss=best, best_step=best_step)
        save_checkpoint(tmp_path, state, model, optimizer, scheduler, keep_last=2)

    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [2, 4, 5]
    assert _dot_entries(tmp_path) == []
    for path in list_checkpoints(tmp_path):
        verify_checkpoint(path)


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path):
    model, optimizer, scheduler = _trainer()
    for step in (10, 20):
        save_checkpoint(tmp_path, TrainState(step=step), model, optimizer, scheduler, keep_last=1)
    # Saving an older step (e.g. after resuming from an older checkpoint) keeps it anyway.
    save_checkpoint(tmp_path, TrainState(step=15), model, optimizer, scheduler, keep_last=1)
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path)] == [15, 20]


@pytest.mark.parametrize(("r", "targets"), [(8, ("q_proj", "v_proj")), (4, ("q_proj", "k_proj", "v_proj"))])
def test_lora_mismatch_is_refused(tmp_path, r, targets):
    saved_model, saved_optimizer, saved_scheduler = _trainer(r=4)
    path = save_checkpoint(tmp_path, TrainState(step=1), saved_model, saved_optimizer, saved_scheduler, keep_last=3)
    model, optimizer, scheduler = _trainer(r=r, targets=targets)
    before = _adapter(model)

    with pytest.raises(CheckpointError, match="LoRA adapter does not match") as err:
        load_checkpoint(path, model, optimizer, scheduler)

    message = str(err.value)
    assert "r=4" in message and f"r={r}" in message and "lora.r" in message
    _assert_same(_adapter(model), before, "untouched")  # nothing is changed when it does not fit


def test_replacing_an_existing_step(tmp_path):
    model, optimizer, scheduler = _trainer()
    save_checkpoint(tmp_path, TrainState(step=3), model, optimizer, scheduler, keep_last=3)
    _train_step(model, optimizer, scheduler)
    expected = _adapter(model)

    path = save_checkpoint(tmp_path, TrainState(step=3, samples_seen=9), model, optimizer, scheduler, keep_last=3)

    assert list_checkpoints(tmp_path) == [path]
    assert _dot_entries(tmp_path) == []
    verify_checkpoint(path)
    _train_step(model, optimizer, scheduler)
    assert load_checkpoint(path, model, optimizer, scheduler).samples_seen == 9
    _assert_same(_adapter(model), expected, "adapter")


def test_checkpoint_set_aside_by_a_dead_replacer_is_put_back(tmp_path, caplog):
    """A crash between 'old checkpoint renamed aside' and 'new one renamed in' loses nothing."""
    model, optimizer, scheduler = _trainer()
    path = save_checkpoint(tmp_path, TrainState(step=3), model, optimizer, scheduler, keep_last=3)
    # Our own pid counts as a dead writer: no save of this process is running now.
    aside = path.parent / f".old-checkpoint-3-{os.getpid()}"
    os.rename(path, aside)
    (path.parent / f".tmp-checkpoint-3-{os.getpid()}").mkdir()
    assert list_checkpoints(tmp_path) == []

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert latest_valid_checkpoint(tmp_path) == path
    assert "restored" in caplog.text
    assert _dot_entries(tmp_path) == []


def test_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    model, optimizer, scheduler = _trainer()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        path = save_checkpoint(tmp_path / "run", TrainState(step=1), ddp, optimizer, scheduler, keep_last=3)
        expected = _adapter(model)
        _train_step(ddp, optimizer, scheduler)
        load_checkpoint(path, ddp, optimizer, scheduler)
        _assert_same(_adapter(model), expected, "adapter")
    finally:
        dist.destroy_process_group()


def test_non_peft_model_is_refused(tmp_path):
    base = _base_model()
    optimizer = torch.optim.AdamW(base.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with pytest.raises(TypeError, match="PeftModel"):
        save_checkpoint(tmp_path, TrainState(), base, optimizer, scheduler, keep_last=1)
    assert list_checkpoints(tmp_path) == []


def test_bitsandbytes_8bit_optimizer_round_trip(tmp_path):
    """8-bit optimizer states (uint8 tensors + quantisation maps) survive save and load."""
    bnb = pytest.importorskip("bitsandbytes")
    model, _, _ = _trainer()
    # min_8bit_size=1: the tiny LoRA matrices would otherwise get 32-bit states.
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2, min_8bit_size=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    _train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=1)
    expected = copy.deepcopy(optimizer.state_dict())
    assert any(t.dtype == torch.uint8 for s in expected["state"].values() for t in _tensors(s))

    _train_step(model, optimizer, scheduler)
    load_checkpoint(path, model, optimizer, scheduler)

    _assert_same(optimizer.state_dict(), expected, "optimizer")
    _train_step(model, optimizer, scheduler)  # and it still steps


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_round_trip_on_cuda(tmp_path):
    """Adapter and optimizer state on the GPU, CUDA RNG restored."""
    model, _, _ = _trainer()
    model.cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))

    def step():
        ids = torch.randint(0, 256, (2, 8), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    step()
    path = save_checkpoint(tmp_path, TrainState(step=1), model, optimizer, scheduler, keep_last=1)
    expected_adapter = _adapter(model)
    expected_optimizer = copy.deepcopy(optimizer.state_dict())
    expected_cuda = [torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())]

    step()
    torch.rand(4, device="cuda")
    load_checkpoint(path, model, optimizer, scheduler)

    _assert_same(_adapter(model), expected_adapter, "adapter")
    assert all(p.is_cuda for p in model.parameters())
    state = optimizer.state_dict()["state"]
    assert all(s["exp_avg"].is_cuda and not s["step"].is_cuda for s in state.values())
    _assert_same(optimizer.state_dict(), expected_optimizer, "optimizer")
    _assert_same([torch.rand(4, device=f"cuda:{i}").cpu() for i in range(torch.cuda.device_count())],
                 expected_cuda, "cuda rng")
    step()


def test_every_rank_gets_its_own_rng_state_back(tmp_path):
    from qwen_daemon.train.checkpoint import capture_rng_state

    model, optimizer, scheduler = _trainer()
    per_rank = []
    for seed in (10, 11):  # what ranks 0 and 1 would have captured
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        per_rank.append(capture_rng_state())
    expected = []
    for state in per_rank:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        expected.append(_draws())
    path = save_checkpoint(tmp_path, TrainState(step=3, processes=2), model, optimizer, scheduler, keep_last=1,
                           rank_rng_states=per_rank)
    for rank in (1, 0, 3):  # rank 3 of a larger group wraps around to rank 1's state
        load_checkpoint(path, model, optimizer, scheduler, rank=rank)
        _assert_same(_draws(), expected[rank % 2], f"rank {rank}")
