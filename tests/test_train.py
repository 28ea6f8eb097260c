"""The training engine on CPU with the tiny Qwen3 in real 4-bit: loss masking, exact resume,
sample accounting, OOM recovery and the step-boundary controls."""

import json
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from shared.config import load_config
from qwen_daemon.train import loop
from qwen_daemon.train.batching import collate
from qwen_daemon.train.controls import Controls
from qwen_daemon.train.data import labels_of
from qwen_daemon.train.loop import train
from qwen_daemon.train.run import TrainingError

TOPICS = ["SM4", "AES", "SM3", "HMAC", "ZUC", "RSA", "SM2", "ECDSA", "TLS", "GCM", "CBC", "ML-KEM"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """28 short records: a handful of packed sequences per epoch, quick steps on CPU."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(28):
            topic = TOPICS[i % len(TOPICS)]
            f.write(json.dumps({"instruction": f"第 {i} 题：{topic} 是什么？",
                                "output": f"<thinking>\n回忆 {topic} 的定义，第 {i} 步。\n</thinking>\n\n{topic} 是一种密码学机制 {i}。"},
                               ensure_ascii=False) + "\n")
    return path.parent


def make_cfg(tmp_path, data_dir, *overrides):
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"run.runs_root={tmp_path}", "run.name=r", f"data.paths=[{data_dir}]", "data.max_seq_len=128",
        "data.split.train=0.8", "data.split.validation=0.2", "data.split.test=0.0",
        "train.max_steps=null", "train.epochs=1", "train.micro_batch_size=2", "train.grad_accum=2",
        "train.eval_every_steps=2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
        "train.inference_check_tokens=8", "lora.dropout=0.1", "eval.at_end=false", *overrides])


def run_dir(cfg):
    path = Path(cfg.run.runs_root) / cfg.run.name
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_losses(run):
    return {m["step"]: m["loss"] for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"}


class Recorder:
    """A sink that can act at a step boundary: commands queued in metrics() apply before the next step."""

    def __init__(self, on_step=None):
        self.on_step = on_step or (lambda step: None)
        self.events = []

    def metrics(self, record):
        if record["kind"] == "train":
            self.on_step(record["step"])

    def event(self, kind, **data):
        self.events.append((kind, data))

    def close(self):
        pass


@pytest.fixture
def seen_samples(monkeypatch):
    """Sample ids of every step that completed forward and backward, in order."""
    seen = []
    real = loop.forward_backward

    def recording(r, batches):
        result = real(r, batches)
        ids = r.splits["train"]["id"]
        seen.append([ids[i] for micro_batch in batches for unit in micro_batch for i in unit])
        return result

    monkeypatch.setattr(loop, "forward_backward", recording)
    return seen


def test_demo_pipeline_end_to_end_to_a_saved_adapter(tmp_path, data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_daemon.train.builtin import resolve_model_path

    cfg = make_cfg(tmp_path, data_dir, "data.split.train=0.7", "data.split.validation=0.15", "data.split.test=0.15")
    run = run_dir(cfg)
    state = train(cfg, run)
    assert state.step > 0 and (run / "final" / "adapter_model.safetensors").exists()
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(1, state.step + 1))
    assert any(m["kind"] == "eval" for m in metrics)
    assert all(m["tokens_per_s"] > 0 and m["tokens"] > 0 for m in metrics if m["kind"] == "train")
    assert list((run / "tensorboard").iterdir())
    assert json.loads((run / "data_report.json").read_text(encoding="utf-8"))["kept"] > 0
    events = [e["kind"] for e in read_jsonl(run / "events.jsonl")]
    assert events[0] == "train_start" and "checkpoint" in events and events[-1] == "inference_check"
    answers = read_jsonl(run / "inference.jsonl")
    assert answers and all(a["question"] and isinstance(a["generated"], str) for a in answers)
    # The adapter is a plain peft adapter.
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-qwen3"))
    PeftModel.from_pretrained(base, str(run / "final"))


def test_loss_counts_only_the_assistant_tokens(tmp_path, data_dir):
    """The model's loss on a packed batch is the mean cross-entropy over label tokens only."""
    from transformers import AutoModelForCausalLM

    from qwen_daemon.train.builtin import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-qwen3"), dtype=torch.float32)
    samples = [{"input_ids": list(range(100, 120)), "prompt_len": 12}, {"input_ids": list(range(300, 310)), "prompt_len": 4}]
    batch = collate([samples], packing=True, pad_token_id=0)  # one packed row
    n = batch["num_label_tokens"]
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                    use_cache=False, num_items_in_batch=n)
        expected, count = 0.0, 0
        for s in samples:
            logits = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
            labels = torch.tensor(labels_of(s["input_ids"], s["prompt_len"]))
            # position t predicts token t+1; only assistant tokens are targets
            mask = labels[1:] != -100
            expected += torch.nn.functional.cross_entropy(logits[:-1][mask], labels[1:][mask], reduction="sum").item()
            count += int(mask.sum())
    assert count == n == (20 - 12) + (10 - 4)
    assert out.loss.item() == pytest.approx(expected / count, rel=1e-4)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, data_dir):
    # Two epochs, interrupted in the middle of the second: data order, dropout and optimizer
    # state must all continue exactly.
    straight = make_cfg(tmp_path, data_dir, "run.name=straight", "train.epochs=2")
    train(straight, run_dir(straight))

    interrupted = make_cfg(tmp_path, data_dir, "run.name=interrupted", "train.epochs=2")
    controls = Controls()
    first = train(interrupted, run_dir(interrupted), controls,
                  sinks=(Recorder(lambda step: step == 4 and controls.stop()),))
    assert first.step == 4 and first.epoch == 1
    train(interrupted, run_dir(interrupted), resume=True)

    a, b = train_losses(run_dir(straight)), train_losses(run_dir(interrupted))
    assert len(a) > 5 and a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_no_sample_skipped_or_repeated_across_resume_and_batch_size_change(tmp_path, data_dir, seen_samples):
    cfg = make_cfg(tmp_path, data_dir, "train.micro_batch_size=1", "train.grad_accum=4")
    controls = Controls()
    # Step 1 at micro-batch 1, then 2 (global 4 kept), stop after step 2, resume, then micro-batch 4.
    train(cfg, run_dir(cfg), controls, sinks=(Recorder(
        lambda step: controls.set_micro_batch_size(2) if step == 1 else step == 2 and controls.stop()),))
    resumed = Controls()
    resumed.set_micro_batch_size(4)
    state = train(cfg, run_dir(cfg), resumed, resume=True)
    ids = [i for step in seen_samples for i in step]
    train_ids = set(loop.prepare_data(cfg, loop.load_tokenizer("builtin:tiny-qwen3")).splits["train"]["id"])
    assert Counter(ids) == Counter(train_ids)  # every training sample exactly once in the epoch
    assert state.samples_seen == len(train_ids)
    assert (state.micro_batch_size, state.grad_accum) == (4, 1)


def test_injected_oom_halves_the_micro_batch_and_redoes_the_step(tmp_path, data_dir, seen_samples, monkeypatch):
    monkeypatch.setenv(loop.INJECT_OOM_ENV, "2x2")  # twice at step 2: 4 -> 2 -> 1
    cfg = make_cfg(tmp_path, data_dir, "train.micro_batch_size=4", "train.grad_accum=1")
    recorder = Recorder()
    state = train(cfg, run_dir(cfg), sinks=(recorder,))
    ooms = [d for kind, d in recorder.events if kind == "oom_recovered"]
    assert [(d["step"], d["micro_batch_size"], d["grad_accum"]) for d in ooms] == [(2, 2, 2), (2, 1, 4)]
    steps = [m for m in read_jsonl(run_dir(cfg) / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["step"] for m in steps] == list(range(1, state.step + 1))  # step 2 happened once
    assert (steps[1]["micro_batch_size"], steps[1]["grad_accum"]) == (1, 4)
    ids = [i for step in seen_samples for i in step]
    assert len(ids) == len(set(ids)) == state.samples_seen


def test_oom_at_micro_batch_one_stops_with_advice(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv(loop.INJECT_OOM_ENV, "1")
    cfg = make_cfg(tmp_path, data_dir, "train.micro_batch_size=1", "train.grad_accum=2")
    with pytest.raises(TrainingError, match=r"out of memory at step 1 with micro-batch 1.*max_seq_len"):
        train(cfg, run_dir(cfg))


def test_pause_checkpoint_and_batch_size_apply_at_one_step_boundary(tmp_path, data_dir):
    cfg = make_cfg(tmp_path, data_dir)
    controls = Controls()
    futures, at_pause = {}, {}
    queued = threading.Event()

    def on_step(step):  # in the training thread, right after step 2
        if step == 2:
            futures["pause"] = controls.pause()
            futures["checkpoint"] = controls.checkpoint()
            futures["bad"] = controls.set_micro_batch_size(3)  # does not divide the global batch 4
            futures["mbs"] = controls.set_micro_batch_size(1)
            queued.set()

    def operator():  # another thread: waits until the pause is applied, looks, resumes
        queued.wait(60)
        at_pause.update(futures["pause"].result(timeout=60))
        at_pause["steps_logged"] = len(train_losses(run_dir(cfg)))
        controls.resume()

    thread = threading.Thread(target=operator)
    thread.start()
    recorder = Recorder(on_step)
    train(cfg, run_dir(cfg), controls, sinks=(recorder,))
    thread.join(60)

    assert at_pause["step"] == 2 and at_pause["steps_logged"] == 2  # nothing ran while paused
    assert futures["checkpoint"].result() == {"step": 2, "path": str(run_dir(cfg) / "checkpoints" / "checkpoint-2")}
    with pytest.raises(ValueError, match=r"does not divide the global batch 4.*choose one of 1, 2, 4,"):
        futures["bad"].result()
    assert futures["mbs"].result() == {"step": 2, "micro_batch_size": 1, "grad_accum": 4, "global_batch": 4}
    steps = [m for m in read_jsonl(run_dir(cfg) / "metrics.jsonl") if m["kind"] == "train"]
    assert (steps[2]["micro_batch_size"], steps[2]["grad_accum"]) == (1, 4)
    applied = [d["command"] for kind, d in recorder.events if kind == "command_applied"]
    assert applied == ["pause", "checkpoint", "set_batch_size", "resume"]
    assert not (run_dir(cfg) / "restart_batch.json").exists()  # written by the change, gone with the next checkpoint
    assert [d["command"] for kind, d in recorder.events if kind == "command_failed"] == ["set_batch_size"]


def test_a_missing_local_model_is_a_clear_error(tmp_path, data_dir):
    from qwen_daemon.train.model import ModelLoadError

    cfg = make_cfg(tmp_path, data_dir, f"model.name_or_path={tmp_path / 'no-such-model'}",
                   "model.tokenizer=builtin:qwen3-tokenizer")
    with pytest.raises(ModelLoadError, match=r"no-such-model.*no such model directory"):
        train(cfg, run_dir(cfg))


def test_a_checkpoint_does_not_resume_under_the_other_strategy(tmp_path, data_dir):
    from qwen_daemon.train.checkpoint import CheckpointError

    ddp = make_cfg(tmp_path, data_dir, "train.max_steps=1")
    train(ddp, run_dir(ddp))  # bitsandbytes' 8-bit AdamW
    fsdp = make_cfg(tmp_path, data_dir, "train.max_steps=2", "launch.strategy=fsdp")  # torch's AdamW
    with pytest.raises(CheckpointError, match=r"optimizer.pt: does not fit this optimizer .*launch.strategy"):
        train(fsdp, run_dir(fsdp), resume=True)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, data_dir):
    cfg = make_cfg(tmp_path, data_dir, "train.max_steps=2", "train.inference_check_tokens=0")
    run = run_dir(cfg)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 9.0}) + "\n")  # then killed
    recorder = Recorder()
    state = train(cfg, run, resume=True, sinks=(recorder,))
    assert state.step == 2 and state.finished
    resumed = next(data for kind, data in recorder.events if kind == "resumed")
    assert resumed["from_start"] and resumed["step"] == 0
