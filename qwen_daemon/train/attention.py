"""Attention over packed rows without a mask: `model.attn_implementation: sdpa_varlen`.

Packed rows hold several samples back to back. With transformers' "sdpa" that takes a
block-diagonal causal mask of rows x length x length, which SDPA cannot hand to its flash kernel
(the memory-efficient kernel runs instead) and which alone is 1 GB per row at 32,768 tokens and
16 GB at 131,072. Here the micro-batch is one flattened row (batching.collate with
flash_attention) with the samples' boundaries (`cu_seq_lens_q`, as transformers' flash-attention
path gets them), and each sample attends to itself through torch's own varlen flash kernel
(`torch.nn.attention.varlen.varlen_attn`, PyTorch >= 2.10, CUDA); elsewhere through SDPA with
is_causal per sample. Memory grows linearly with the tokens, and no flash-attn package is needed.

A micro-batch whose samples all have one length (one long sample, or rows of fixed-length data)
needs no varlen kernel: it is a batch of causal rows, and SDPA picks its fastest kernel for them
(cuDNN's on an H100/H200, which took 0.58x the time of the varlen kernel's forward and backward
at 2,048 tokens: docs/benchmarks.md). The lengths are known without a device sync: the number of
samples is the boundaries' shape and the longest is the collator's `max_length_q`.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"


def _varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_available() -> bool:
    """Whether torch's varlen flash kernel can run here (a CUDA GPU and PyTorch >= 2.10)."""
    return torch.cuda.is_available() and _varlen_kernel() is not None


def varlen_sdpa_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, heads, tokens, dim], key/value [1, kv_heads,
    tokens, dim]; returns ([1, tokens, heads, dim], None)."""
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None:  # not a flattened micro-batch: causal SDPA over each row
        if attention_mask is not None:
            raise ValueError(f"{NAME} takes packed rows or rows without padding (data.packing: true)")
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError(f"{NAME}: a flattened micro-batch has one row, got {query.shape[0]}")
    samples, tokens, longest = cu_seq_lens.shape[0] - 1, query.shape[2], kwargs.get("max_length_q")
    if isinstance(longest, int) and longest * samples == tokens:  # equal lengths: causal rows
        rows = [t[0].unflatten(1, (samples, tokens // samples)).transpose(0, 1) for t in (query, key, value)]
        out = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scaling,
                                             enable_gqa=key.shape[1] != query.shape[1])  # [rows, heads, n, dim]
        return out.transpose(1, 2).reshape(1, tokens, query.shape[1], query.shape[3]), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    kernel = _varlen_kernel() if q.is_cuda else None
    if kernel is None:
        out = _per_sample(q, k, v, cu_seq_lens.tolist(), scaling)
    else:
        cu = cu_seq_lens if cu_seq_lens.dtype == torch.int32 else cu_seq_lens.to(torch.int32)
        out = _varlen(kernel, q, k, v, cu.to(q.device), int(kwargs.get("max_length_q") or q.shape[0]), scaling)
    return out.unsqueeze(0), None


@functools.cache
def _parameters(kernel) -> frozenset[str]:
    return frozenset(inspect.signature(kernel).parameters)


def _varlen(kernel, q, k, v, cu, max_len: int, scale):
    params = _parameters(kernel)
    extra = {}
    if "enable_gqa" in params:
        extra["enable_gqa"] = k.shape[1] != q.shape[1]
    elif k.shape[1] != q.shape[1]:  # older kernels: one key/value head per query head
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if "is_causal" in params:
        extra["is_causal"] = True
    elif "window_size" in params:
        extra["window_size"] = (-1, 0)  # causal: no key after the query
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn has no causal option here; "
                           "use model.attn_implementation: sdpa")
    if "scale" in params:
        extra["scale"] = scale
    return kernel(q, k, v, cu, cu, max_len, max_len, **extra)


def _per_sample(q, k, v, bounds: list[int], scale):
    parts = []
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [heads, n, dim]
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                    enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1))
    return torch.cat(parts)


def register() -> None:
    """Make `attn_implementation="sdpa_varlen"` known to transformers (idempotent). Without a
    mask function of its own, transformers builds no mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa_forward)
