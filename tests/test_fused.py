"""The engine's fast paths against the reference ones, on CPU with the tiny Qwen3 in real 4-bit:
fused LoRA against peft's layers, varlen attention against SDPA with the packed-rows mask,
selective checkpointing against none."""

from pathlib import Path

import pytest
import torch

from qwen_daemon.train import attention, fused
from qwen_daemon.train.batching import collate
from qwen_daemon.train.checkpointing import decoder_layers, set_checkpointing
from qwen_daemon.train.model import load_model
from shared.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny(*overrides):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["train.grad_checkpointing=false", *overrides])
    model = load_model(cfg, torch.device("cpu"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide half of the gradients
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return model


def packed_batch(flat: bool, lengths=((17, 30), (9, 40)), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    units = [[{"input_ids": torch.randint(0, 151000, (n,), generator=g).tolist(), "prompt_len": 3} for n in unit]
             for unit in lengths]
    batch = collate(units, packing=True, pad_token_id=151643, flash_attention=flat)
    keys = ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    return {**{k: v for k, v in batch.items() if k in keys}, "num_items_in_batch": batch["num_label_tokens"]}


def loss_and_grads(model, batch: dict, seed: int = 1):
    torch.manual_seed(seed)  # the same dropout masks
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b, tolerance=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_a[name].norm().clamp_min(1e-12)
        assert (grads_a[name] - grads_b[name]).norm() / scale < tolerance, name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_computes_what_peft_computes(dropout):
    """dropout 0: the whole MLP in one function, q, k and v in another; 0.1: each projection on
    its own, same masks."""
    model = tiny(f"lora.dropout={dropout}")
    batch = packed_batch(flat=False)
    counts = fused.fuse(model)  # already fused by load_model: nothing more to do
    assert counts == {"mlp": 0, "qkv": 0, "linear": 0}
    fast = loss_and_grads(model, batch)
    fused.unfuse(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if hasattr(m, "lora_A"))
    assert_same(loss_and_grads(model, batch), fast)
    calls = {"LoRAMLP": 0, "LoRAQKV": 0, "LoRALinear": 0}
    real = {name: getattr(fused, name).forward for name in calls}

    def counting(name):
        def forward(*args):
            calls[name] += 1
            return real[name](*args)
        return staticmethod(forward)

    # q, k and v as one in each layer; o_proj and the MLP's three (its fallback) on their own
    assert fused.fuse(model) == {"mlp": 2, "qkv": 2, "linear": 8}
    try:
        for name in calls:
            getattr(fused, name).forward = counting(name)
        assert_same(loss_and_grads(model, batch), fast)
    finally:
        for name in calls:
            getattr(fused, name).forward = staticmethod(real[name])
    # the tiny model's two layers: with dropout each projection draws its own mask
    assert calls == ({"LoRAMLP": 2, "LoRAQKV": 2, "LoRALinear": 2} if dropout == 0 else
                     {"LoRAMLP": 0, "LoRAQKV": 0, "LoRALinear": 14})
    assert not any("_qkv_pending" in m.__dict__ for m in model.modules())  # nothing left holding memory


def test_an_mlp_without_act_fn_falls_back_to_its_own_forward():
    """liger's SwiGLU MLP (what the demo's GPU run gets) has no act_fn: with dropout on, the fused
    MLP must fall back to the module's own forward, not to Qwen3MLP's."""
    model = tiny("lora.dropout=0.1")
    fused.unfuse(model)

    class LigerLikeMLP(torch.nn.Module):  # gate/up/down and config, SiLU inside forward
        def forward(self, x):
            return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    for layer in decoder_layers(model):
        del layer.mlp.act_fn
        layer.mlp.__class__ = LigerLikeMLP
    batch = packed_batch(flat=False)
    plain = loss_and_grads(model, batch)
    assert fused.fuse(model)["mlp"] == 2
    assert_same(loss_and_grads(model, batch), plain)


def test_fused_lora_on_an_unquantised_base_model():
    model = tiny("model.load_in_4bit=false", "lora.dropout=0.0")
    batch = packed_batch(flat=False)
    fast = loss_and_grads(model, batch)
    fused.unfuse(model)
    assert_same(loss_and_grads(model, batch), fast)


def test_a_cached_lora_cast_follows_the_optimizer():
    weight = torch.nn.Parameter(torch.ones(2, 3))
    first = fused.cast(weight, torch.bfloat16, 2.0)
    assert fused.cast(weight, torch.bfloat16, 2.0) is first  # no new cast while unchanged
    with torch.no_grad():
        weight.add_(1.0)  # what an optimizer step does
    assert torch.equal(fused.cast(weight, torch.bfloat16, 2.0), torch.full((2, 3), 4.0, dtype=torch.bfloat16))


def test_varlen_attention_computes_what_the_packed_mask_computes():
    """sdpa_varlen (here: SDPA per sample, as on a machine without the varlen kernel) on the
    flattened micro-batch against transformers' SDPA with its block-diagonal mask on packed rows."""
    model = tiny("lora.dropout=0.0")
    masked = loss_and_grads(model, packed_batch(flat=False))
    attention.register()
    config = model.get_base_model().config
    config._attn_implementation = attention.NAME
    try:
        assert_same(loss_and_grads(model, packed_batch(flat=True)), masked)
    finally:
        config._attn_implementation = "sdpa"


def test_varlen_attention_on_equal_lengths_is_plain_causal_rows(monkeypatch):
    """One length for every sample of a flattened micro-batch (one long sample, fixed-length
    rows): SDPA over causal rows, no varlen kernel, the same loss and gradients."""
    model = tiny("lora.dropout=0.0")
    lengths = ((24,), (24,), (24,))
    rows = loss_and_grads(model, packed_batch(flat=False, lengths=lengths))
    attention.register()
    config = model.get_base_model().config
    config._attn_implementation = attention.NAME
    monkeypatch.setattr(attention, "_per_sample", lambda *a: pytest.fail("took the varlen path"))
    try:
        assert_same(loss_and_grads(model, packed_batch(flat=True, lengths=lengths)), rows)
        assert_same(loss_and_grads(model, packed_batch(flat=True, lengths=((40,),))),
                    loss_and_grads(model, packed_batch(flat=False, lengths=((40,),))))
    finally:
        config._attn_implementation = "sdpa"


def test_the_varlen_kernel_gets_causal_attention_whatever_its_signature():
    q, k = torch.randn(6, 4, 8), torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    seen = {}

    def newer(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen.update(window_size=window_size, enable_gqa=enable_gqa, heads=k.shape[1])
        return q

    def older(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False):
        seen.update(is_causal=is_causal, heads=k.shape[1])
        return q

    attention._varlen(newer, q, k, k, cu, 4, None)
    assert seen == {"window_size": (-1, 0), "enable_gqa": True, "heads": 2}
    seen.clear()
    attention._varlen(older, q, k, k, cu, 4, None)
    assert seen == {"is_causal": True, "heads": 4}  # key/value heads repeated for the query heads
    with pytest.raises(RuntimeError, match="no causal option"):
        attention._varlen(lambda q, k, v, cu_q, cu_k, max_q, max_k: q, q, k, k, cu, 4, None)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recomputing_some_layers_changes_nothing_but_memory(dropout):
    """Recomputed layers give the same loss and gradients, dropout's masks included (the recompute
    replays the random numbers), through the one-function recompute (`Recomputed`)."""
    model = tiny(f"lora.dropout={dropout}")
    batch = packed_batch(flat=False)
    model.train()
    whole = loss_and_grads(model, batch)
    layers = decoder_layers(model)
    outputs = []
    layers[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    for k in (1, len(layers)):
        set_checkpointing(model, k)
        assert [("forward" in layer.__dict__) for layer in layers] == [i < k for i in range(len(layers))]
        assert model.checkpointing_plan == {"checkpointed": k, "layers": len(layers), "offload": False}
        assert_same(loss_and_grads(model, batch), whole)
        hidden = outputs[-1][0] if isinstance(outputs[-1], tuple) else outputs[-1]
        assert type(hidden.grad_fn).__name__ == "RecomputedBackward"
    set_checkpointing(model, 0)
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_decoder_layers_are_found_once_fsdp_has_sharded_them():
    """FSDP2's fully_shard gives every layer it shards a subclass (FSDPQwen3DecoderLayer): the
    memory probe and the checkpointing plan still find them (on the GPU they found none)."""
    from torch.distributed.fsdp import FSDPModule

    model = tiny()
    layers = decoder_layers(model)
    for layer in layers:  # what fully_shard does to the class
        layer.__class__ = type(f"FSDP{type(layer).__name__}", (FSDPModule, type(layer)), {})
    assert len(layers) == 2 and decoder_layers(model) == layers


def test_own_rms_norm_computes_what_qwen3s_norm_computes():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from qwen_daemon.train.model import own_rms_norm

    norms = torch.nn.Sequential(Qwen3RMSNorm(64, eps=1e-6), Qwen3RMSNorm(64, eps=1e-6))
    with torch.no_grad():
        for norm in norms:
            norm.weight.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def run():
        norms.zero_grad(set_to_none=True)
        x.grad = None
        out = norms(x)
        (out * torch.arange(64)).sum().backward()
        return out.detach(), x.grad.clone(), norms[0].weight.grad.clone()

    reference = run()
    assert own_rms_norm(norms) == 2
    for got, want in zip(run(), reference):
        torch.testing.assert_close(got, want)
