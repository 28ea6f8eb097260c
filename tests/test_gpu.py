"""On an NVIDIA GPU (`pytest -m gpu`, on the GPU machine): the engine's CUDA path for real."""

import json
from pathlib import Path

import pytest
import torch

from shared.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def undo_liger_patches():
    """liger patches transformers' Qwen3 module globally (one model per training process is fine);
    restore it so that later tests in this process build plain Qwen3 models."""
    from transformers.models.qwen3 import modeling_qwen3 as m

    saved = {name: getattr(m, name) for name in ("apply_rotary_pos_emb", "Qwen3RMSNorm", "Qwen3MLP")}
    forward = m.Qwen3ForCausalLM.forward
    yield
    for name, value in saved.items():
        setattr(m, name, value)
    m.Qwen3ForCausalLM.forward = forward


@pytest.mark.parametrize("shape", [(3, 5, 2560), (2, 7, 32, 128), (4099, 128), (6, 4096)])
def test_the_rms_norm_kernel_computes_what_torch_computes(shape):
    """Our Triton RMSNorm (rmsnorm.py) against torch's F.rms_norm in float32: the output and the
    input's gradient, on the widths Qwen3 normalises, a row count no block divides, and a row
    width that is a power of two."""
    from qwen_daemon.train.rmsnorm import RMSNorm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda", generator=g)).to(torch.bfloat16)
    grad = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
    out = RMSNorm.apply(x, w, 1e-6)
    out.backward(grad)
    xf = x.detach().float().requires_grad_()
    ref = torch.nn.functional.rms_norm(xf, (shape[-1],), w.float(), 1e-6)
    ref.backward(grad.float())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert (out.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    assert (x.grad.float() - xf.grad).abs().max() <= 0.02 * xf.grad.abs().max()


def test_demo_config_trains_on_the_gpu_with_liger_and_checkpointing(tmp_path):
    from qwen_daemon.train.loop import train
    from qwen_daemon.train.model import load_model

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"run.runs_root={tmp_path}", "run.name=gpu",
                                                        "train.max_steps=6", "train.inference_check_tokens=16"])
    model = load_model(cfg, torch.device("cuda", 0))
    base = model.get_base_model()
    assert model.training and model.checkpointing_plan["checkpointed"] == base.config.num_hidden_layers
    assert "liger" in base.forward.__func__.__module__  # fused linear cross-entropy: no logits
    del model, base
    run = tmp_path / "gpu"
    run.mkdir()
    state = train(cfg, run)
    assert state.step == 6 and (run / "final" / "adapter_model.safetensors").exists()
    assert (run / "inference.jsonl").read_text(encoding="utf-8").strip()


def test_the_memory_probe_fits_a_plan_that_holds_on_the_gpu(tmp_path):
    """micro-batch and checkpointing auto: the real probe on the GPU, a plan within the budget,
    the measured peak of the first step within 15% of the prediction."""
    from qwen_daemon.train.loop import train

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"run.runs_root={tmp_path}", "run.name=fit", "train.max_steps=3", "train.inference_check_tokens=0",
        "train.micro_batch_size=auto", "train.global_batch_size=8", "train.grad_checkpointing=auto",
        "data.max_seq_len=512"])
    (tmp_path / "fit").mkdir()
    state = train(cfg, tmp_path / "fit")
    events = [json.loads(line) for line in (tmp_path / "fit" / "events.jsonl").read_text().splitlines()]
    plan = next(e for e in events if e["kind"] == "memory_plan")
    checked = next(e for e in events if e["kind"] == "memory_checked")
    assert plan["reason"] == "start" and plan["probe"]["tokens"] == [512, 1024] and plan["model"]["layer_kib"] > 0
    assert plan["micro_batch_size"] * plan["grad_accum"] == 8 == state.micro_batch_size * state.grad_accum
    assert plan["predicted_peak"] <= plan["budget"]
    assert abs(checked["error_pct"]) < 15


def test_injected_oom_recovers_on_the_gpu(tmp_path, monkeypatch):
    from qwen_daemon.train import loop

    monkeypatch.setenv(loop.INJECT_OOM_ENV, "2")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"run.runs_root={tmp_path}", "run.name=oom",
                                                        "train.max_steps=3", "train.micro_batch_size=2",
                                                        "train.grad_accum=2", "train.inference_check_tokens=0"])
    (tmp_path / "oom").mkdir()
    state = loop.train(cfg, tmp_path / "oom")
    assert state.step == 3 and (state.micro_batch_size, state.grad_accum) == (1, 4)


def test_fsdp_shards_the_4bit_model_checkpoints_and_resumes_on_the_gpu(run_dir):
    """FSDP2 through torchrun (one rank, nccl): bitsandbytes' CUDA 4-bit layers stored in bfloat16
    and sharded, with liger; a checkpoint gathered from the shards, resumed."""
    import shutil

    from test_distributed import make_run, run_script

    run = make_run(run_dir, "fsdp", "launch.strategy=fsdp", "checkpoint.every_steps=3")
    [state] = run_script(run, 1, new_micro_batch=1, torchrun=True)
    log = (run / "rank0.log").read_text()
    assert "sharded over 1 processes" in log and "liger-kernel: fused" in log
    assert state["step"] == 5 and (state["micro_batch_size"], state["grad_accum"]) == (1, 4)
    optimizer = torch.load(run / "checkpoints" / "checkpoint-3" / "optimizer.pt", weights_only=False)
    assert all(isinstance(name, str) for name in optimizer["state"])  # by parameter name: any process count
    shutil.rmtree(run / "checkpoints" / "checkpoint-5")
    [resumed] = run_script(run, 1, new_micro_batch=1, torchrun=True, extra=["--resume"])
    assert resumed["step"] == 5 and "restored checkpoint" in (run / "rank0.log").read_text()


async def test_the_tui_shows_the_real_gpu_and_steers_the_daemon(tmp_path):
    """The daemon on the GPU with the TUI attached (Pilot): real NVML figures and the trainer's own
    memory in the GPU panel, then p and s."""
    from qwen_tui.app import QwenTUI
    from qwen_tui.client import Connection
    from qwen_tui.widgets.gpu_panel import GpuPanel
    from qwen_tui.widgets.header import RunHeader
    from test_daemon import running
    from test_tui_app import text, until

    cfg = load_config(REPO / "configs" / "demo.yaml", [f"run.runs_root={tmp_path}", "run.name=tui",
                                                        "train.max_steps=400", "train.inference_check_tokens=0"])
    run = tmp_path / "tui"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    with running(run) as (proc, _):
        app = QwenTUI(Connection(run_dir=run).start())
        async with app.run_test(size=(120, 40)) as pilot:
            # A gpu sample taken while training, with the trainer's own memory in it.
            await until(pilot, lambda: app.view.step >= 3 and any(
                r.get("reserved") for r in (app.view.gpu or {}).get("ranks", [])), timeout=300)
            panel = text(app.query_one(GpuPanel))
            print(text(app.query_one(RunHeader)), panel, sep="\n")
            gpu = app.view.gpu["gpus"][0]
            assert panel.startswith(f"GPU{gpu['index']} ") and "█" in panel and "°C" in panel and "W" in panel
            assert gpu["memory_used"] > app.view.gpu["ranks"][0]["reserved"] > 0
            await pilot.press("p")
            await until(pilot, lambda: app.view.state == "paused", timeout=60)
            await pilot.press("s", "y")
            await until(pilot, lambda: app.view.connection == "offline", timeout=120)
        assert proc.wait(60) == 0
