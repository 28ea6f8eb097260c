"""The memory plan: the model from the probe, the choice of micro-batch / recomputed layers /
offload, the budget, and the plan in a run (start, batch-size command, resume on the same or on
other hardware), with a stand-in for the GPU's memory figures."""

import json
from pathlib import Path

import pytest
import torch

from qwen_daemon.train import fitting, memory
from qwen_daemon.train.controls import Controls
from qwen_daemon.train.loop import train
from shared.config import load_config

from tests.test_train import Recorder, data_dir, read_jsonl, run_dir  # noqa: F401 - fixtures

GIB, KIB = memory.GIB, 1024
REPO = Path(__file__).resolve().parents[1]


def model_10_layers(**kw):
    values = dict(static=10 * GIB, base=0.0, layer=100 * KIB, input=10 * KIB, layers=10)
    return memory.MemoryModel(**{**values, **kw})


# --- the model -----------------------------------------------------------------------------------

def test_the_probes_give_back_the_model_that_produced_them():
    true = memory.MemoryModel(static=3.25 * GIB, base=37 * KIB, layer=102 * KIB, input=5 * KIB, layers=36)
    t1 = 2048
    model = memory.MemoryModel.from_probes(t1, true.peak(t1, 36), 2 * t1, true.peak(2 * t1, 36),
                                           true.peak(t1, 32), 4, 36, 5 * KIB, extra_static=GIB)
    assert model.static == pytest.approx(true.static + GIB)
    assert (model.base, model.layer) == (pytest.approx(true.base), pytest.approx(true.layer))


def test_the_peak_counts_kept_layers_and_offloaded_inputs():
    m = model_10_layers()
    tokens = 1000
    # every layer recomputed: ten inputs plus the one layer whose backward runs at the peak
    assert m.peak(tokens, 10) == 10 * GIB + tokens * (10 * 10 + 100) * KIB
    assert m.peak(tokens, 9) == m.peak(tokens, 10) - tokens * 10 * KIB  # that layer's activations either way
    assert m.peak(tokens, 0) == 10 * GIB + tokens * 10 * 100 * KIB
    assert m.peak(tokens, 10, offload=True) == 10 * GIB + tokens * (memory.OFFLOAD_RESIDENT * 10 + 100) * KIB


# --- choosing --------------------------------------------------------------------------------------

def test_a_fixed_micro_batch_gets_the_fewest_recomputed_layers_that_fit():
    # 2 GiB over the static part for 4 x 1000 tokens: at most 524 KiB per token,
    # k * 10 + (10 - k) * 100 <= 524 from k = 6
    plan = memory.choose(model_10_layers(), 12 * GIB, 1000, 16, micro_batch_size=4, offload=False)
    assert (plan.micro_batch_size, plan.grad_accum, plan.checkpointed, plan.offload) == (4, 4, 6, False)
    assert plan.predicted_peak <= plan.budget == 12 * GIB


def test_an_automatic_micro_batch_is_the_largest_divisor_of_the_global_batch_that_fits():
    # every layer recomputed: 200 KiB per token, at most 10,485 tokens: 8 of the 16 rows
    plan = memory.choose(model_10_layers(), 12 * GIB, 1000, 16, checkpointed=10, offload=False)
    assert (plan.micro_batch_size, plan.grad_accum) == (8, 2)
    # offloading the inputs leaves 130 KiB per token: all 16 rows in one micro-batch
    plan = memory.choose(model_10_layers(), 12 * GIB, 1000, 16, checkpointed=10)
    assert (plan.micro_batch_size, plan.grad_accum, plan.offload) == (16, 1, True)
    # ... unless the host cannot hold 10 inputs x 16,000 tokens x 10 KiB
    plan = memory.choose(model_10_layers(), 12 * GIB, 1000, 16, checkpointed=10, host_bytes=GIB)
    assert (plan.micro_batch_size, plan.offload) == (8, False)
    # the global batch is kept whatever the micro-batch: 12 rows do not split into 8s
    plan = memory.choose(model_10_layers(), 12 * GIB, 1000, 12, checkpointed=10, offload=False)
    assert (plan.micro_batch_size, plan.grad_accum) == (6, 2)


def test_with_both_automatic_the_faster_plan_wins():
    m = model_10_layers()
    plan = memory.choose(m, 40 * GIB, 1000, 16)
    rivals = [memory.choose(m, 40 * GIB, 1000, 16, micro_batch_size=b) for b in (1, 2, 4, 8, 16)]
    best = max(rivals, key=lambda p: memory.speed(p.micro_batch_size * 1000, p.checkpointed, 10))
    assert (plan.micro_batch_size, plan.checkpointed) == (best.micro_batch_size, best.checkpointed)
    assert plan.predicted_peak <= 40 * GIB


def test_the_speed_model_prefers_more_tokens_and_less_recompute():
    assert memory.speed(8192, 36, 36) > memory.speed(2048, 36, 36)
    assert memory.speed(8192, 0, 36) > memory.speed(8192, 18, 36) > memory.speed(8192, 36, 36)


def test_nothing_that_fits_is_a_clear_error():
    with pytest.raises(memory.MemoryPlanError, match=r"even micro-batch 1 at 1000 tokens .* budget"):
        memory.choose(model_10_layers(), 10 * GIB, 1000, 16)


def test_the_budget_is_what_this_process_may_hold_less_the_headroom(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    assert memory.budget(None, 0.1) == pytest.approx(65 * GIB - 8 * GIB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.5, raising=False)
    assert memory.budget(None, 0.1) == pytest.approx(40 * GIB - 8 * GIB)


# --- the probe, with a stand-in for the GPU's memory counters ---------------------------------------

class FakeGPU:
    """Peaks as `true` says for the tokens and recomputed layers of each probe step; out of memory
    above `limit` tokens."""

    def __init__(self, true, limit=None):
        self.true, self.limit, self.k, self.peak, self.steps = true, limit, true.layers, 0.0, []

    def step(self, tokens):
        self.steps.append((tokens, self.k))
        if self.limit is not None and tokens > self.limit:
            raise torch.OutOfMemoryError("fake: out of memory")
        self.peak = self.true.peak(tokens, self.k)

    def install(self, monkeypatch):
        for name in ("synchronize", "reset_peak_memory_stats"):
            monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)


def test_the_probe_measures_the_model_and_backs_off_when_out_of_memory(monkeypatch):
    true = memory.MemoryModel(static=3 * GIB, base=40 * KIB, layer=100 * KIB, input=5 * KIB, layers=36)
    gpu = FakeGPU(true, limit=3000)
    gpu.install(monkeypatch)
    model, figures = memory.probe(gpu.step, lambda k: setattr(gpu, "k", k), 36, 5 * KIB, 2048, None)
    assert figures["tokens"] == [1024, 2048]  # 2 x 2048 did not fit: half as many tokens
    assert (model.static, model.base, model.layer) == (pytest.approx(true.static), pytest.approx(true.base),
                                                       pytest.approx(true.layer))
    assert gpu.k == 36  # every layer recomputed again afterwards
    assert (1024, 32) in gpu.steps  # four layers kept whole in the third probe


# --- the plan in a run -------------------------------------------------------------------------------

STANDIN = "2.5,1,10,1000"  # budget 2.5 GiB, static 1 GiB, 10 KiB per token, 1000 KiB per whole layer


def fit_cfg(tmp_path, data_dir, *overrides):  # noqa: F811 - the fixture
    return load_config(REPO / "configs" / "demo.yaml", [
        f"run.runs_root={tmp_path}", "run.name=r", f"data.paths=[{data_dir}]", "data.max_seq_len=128",
        "data.split.train=0.8", "data.split.validation=0.2", "data.split.test=0.0", "train.epochs=1",
        "train.micro_batch_size=auto", "train.global_batch_size=8", "train.grad_checkpointing=auto",
        "train.eval_every_steps=100", "checkpoint.every_steps=2", "train.inference_check_tokens=0", "eval.at_end=false",
        *overrides])


def plan_events(run):
    return [e for e in read_jsonl(run / "events.jsonl") if e["kind"] == "memory_plan"]


def test_a_run_starts_with_the_plan_and_keeps_the_global_batch(tmp_path, data_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv(memory.STANDIN_ENV, STANDIN)
    cfg = fit_cfg(tmp_path, data_dir, "train.max_steps=2")
    run = run_dir(cfg)
    state = train(cfg, run)
    events = read_jsonl(run / "events.jsonl")
    assert [e["kind"] for e in events[:2]] == ["memory_plan", "train_start"]
    plan = events[0]
    expected = memory.choose(memory.standin_model(2)[0], 2.5 * GIB, 128, 8)
    assert (plan["micro_batch_size"], plan["grad_accum"], plan["checkpointed"]) == \
        (expected.micro_batch_size, expected.grad_accum, expected.checkpointed)
    assert plan["reason"] == "start" and plan["predicted_peak"] <= plan["budget"] == 2.5
    assert state.micro_batch_size * state.grad_accum == 8 and state.fitted_on == "cpu x1"
    metrics = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
    assert {m["micro_batch_size"] * m["grad_accum"] for m in metrics} == {8}


def test_a_resume_keeps_a_changed_batch_on_the_same_hardware_and_refits_on_other(tmp_path, data_dir,  # noqa: F811
                                                                                  monkeypatch):
    monkeypatch.setenv(memory.STANDIN_ENV, STANDIN)
    cfg = fit_cfg(tmp_path, data_dir, "train.max_steps=2")
    run = run_dir(cfg)
    controls = Controls()
    recorder = Recorder(on_step=lambda step: step == 1 and controls.set_micro_batch_size(1))
    state = train(cfg, run, controls=controls, sinks=(recorder,))
    assert (state.micro_batch_size, state.grad_accum) == (1, 8)  # the command, global batch kept
    applied = next(d for kind, d in recorder.events if kind == "command_applied")
    assert "checkpointed" in applied  # the recomputed layers chosen again for the new micro-batch

    cfg = fit_cfg(tmp_path, data_dir, "train.max_steps=3")
    state = train(cfg, run, resume=True)
    assert (state.micro_batch_size, state.grad_accum) == (1, 8)
    assert plan_events(run)[-1]["reason"] == "resumed"

    monkeypatch.setattr(fitting, "fingerprint", lambda device, world_size: "NVIDIA H100 80 GiB x1")
    cfg = fit_cfg(tmp_path, data_dir, "train.max_steps=4")
    state = train(cfg, run, resume=True)
    last = plan_events(run)[-1]
    assert last["reason"] == "resumed on NVIDIA H100 80 GiB x1 (fitted on cpu x1)"
    assert state.micro_batch_size == last["micro_batch_size"] != 1 and state.fitted_on == "NVIDIA H100 80 GiB x1"
    assert state.micro_batch_size * state.grad_accum == 8


def test_without_a_gpu_an_automatic_micro_batch_needs_no_probe(tmp_path, data_dir):  # noqa: F811
    cfg = fit_cfg(tmp_path, data_dir, "train.max_steps=1")
    run = run_dir(cfg)
    state = train(cfg, run)
    plan = plan_events(run)[0]
    # the largest divisor of 8 rows with at most PROBE_TOKENS tokens of 128
    assert (plan["micro_batch_size"], state.micro_batch_size * state.grad_accum) == (8, 8)
    assert plan["predicted_peak"] is None and "model" not in plan
    assert json.loads((run / "checkpoints" / "checkpoint-1" / "state.json").read_text())["fitted_on"] == "cpu x1"
