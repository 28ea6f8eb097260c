"""RMSNorm with a frozen weight: on CUDA one Triton kernel each way that normalises many rows per
program; elsewhere, or with a trained weight, torch's `F.rms_norm`.

torch's fused `F.rms_norm` runs its layer-norm kernel, one thread block per row. Qwen3 normalises
the hidden state (2,560 wide) twice a layer and every query and key head (128 wide: 40 rows a
token) once: on the H200 those took 7% of a step at micro-batch 16, 3-5x the time it takes to read
and write them (the engine lab's `norms` part, docs/benchmarks.md). liger-kernel's Triton kernel
is faster on the GPU but spends about 0.2 ms of host time a call in its Python wrapper, 288 calls
a step. This kernel is launched directly and computes what Qwen3RMSNorm computes: float32
statistics, `weight * (x * rstd).to(dtype)`. LoRA never trains the norms, so the backward gives
the input's gradient only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_WIDTH = 16384  # wider rows than this (no Qwen3 has them) go through torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.is_cuda and not weight.requires_grad and x.shape[-1] <= MAX_WIDTH and _triton() is not None:
        return RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        kernels = _triton()
        rows, cols, grid, meta = _launch(x2)
        kernels.forward[grid](x2, weight, y, rstd, rows, cols, x2.stride(0), eps, **meta)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, rstd = ctx.saved_tensors
        g2 = grad.reshape(x2.shape)
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        rows, cols, grid, meta = _launch(x2)
        _triton().backward[grid](g2, x2, weight, rstd, dx, rows, cols, g2.stride(0), x2.stride(0), **meta)
        return dx.view(ctx.shape), None, None


def _launch(x2: torch.Tensor):
    """(rows, cols, grid, block sizes): about 4,096 elements a program, whole rows."""
    rows, cols = x2.shape
    block_cols = 1 << max(cols - 1, 1).bit_length()
    block_rows = max(1, 4096 // block_cols)
    meta = {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols, "num_warps": 8 if block_cols >= 2048 else 4}
    return rows, cols, ((rows + block_rows - 1) // block_rows,), meta


_KERNELS: list = []


def _triton():
    """The two kernels, compiled on first use; None where Triton is missing."""
    if not _KERNELS:
        try:
            _KERNELS.append(_build())
        except ImportError:
            _KERNELS.append(None)
    return _KERNELS[0]


def _build():
    import types

    import triton
    import triton.language as tl

    @triton.jit
    def forward(X, W, Y, RSTD, rows, cols, stride, eps, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.arange(0, BLOCK_COLS)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        offsets = r.to(tl.int64)[:, None] * stride + c[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / cols + eps)
        w = tl.load(W + c, mask=c < cols, other=0.0)
        y = (x * rstd[:, None]).to(w.dtype) * w[None, :]
        tl.store(Y + r.to(tl.int64)[:, None] * cols + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + r, rstd, mask=r < rows)

    @triton.jit
    def backward(G, X, W, RSTD, DX, rows, cols, stride_g, stride_x, BLOCK_ROWS: tl.constexpr,
                 BLOCK_COLS: tl.constexpr):
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.arange(0, BLOCK_COLS)
        mask = (r < rows)[:, None] & (c < cols)[None, :]
        rows64 = r.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + rows64 * stride_g + c[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c, mask=c < cols, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=r < rows, other=0.0)
        xhat = x * rstd[:, None]
        gw = g * w[None, :]
        mean = tl.sum(gw * xhat, axis=1) / cols
        dx = rstd[:, None] * (gw - xhat * mean[:, None])
        tl.store(DX + rows64 * cols + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    return types.SimpleNamespace(forward=forward, backward=backward)
