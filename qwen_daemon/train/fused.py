"""Fused QLoRA projections: the base matmul and its LoRA update in one autograd function.

peft computes a LoRA projection as `base(x).clone() + lora_B(lora_A(dropout(x))) * scaling`:
besides the two small matmuls that is a copy of the output (clone), a pass to scale and a pass to
add it, each with its own backward, per projection (7 per layer, 252 in Qwen3-4B). Here one
function computes `x @ W.T + s * (x @ A.T) @ B.T` with `W` dequantised from 4 bit into a
temporary, and its backward dequantises `W` again instead of keeping it (as bitsandbytes does).
The MLP (gate, up, SwiGLU, down) is one function that keeps only its input and the two
projections it needs for the backward; the SwiGLU output is recomputed there. The idea is
Unsloth's (fast_lora.py); this is our own code on plain torch ops, bitsandbytes'
dequantisation and, on CUDA, liger-kernel's SwiGLU kernels.

peft's modules, parameters and state dict stay as they are: only their `forward` changes, and a
layer that this path cannot run (several or disabled adapters, DoRA, merged weights, extra
arguments) calls peft's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def dequantized(base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The base layer's weight [out, in] in `dtype`: dequantised from bitsandbytes' 4 bit, or as is."""
    weight = base.weight
    quant_state = getattr(weight, "quant_state", None) or getattr(base, "quant_state", None)
    if quant_state is None:
        return weight.to(dtype)
    kernel = _bnb_cuda_dequantize() if weight.is_cuda else None
    if kernel is None or quant_state.dtype != dtype:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight, quant_state).to(dtype)
    # bitsandbytes' own CUDA kernel, called directly with the block scales dequantised once and
    # kept (nested quantisation stores them in 8 bit: two more kernels per use otherwise): one
    # launch and no dispatcher or QuantState handling per use, 4 bytes per 64 weights kept.
    absmax = getattr(quant_state, "_fused_absmax", None)
    if absmax is None:
        absmax = quant_state.absmax
        if quant_state.nested:
            import bitsandbytes.functional as bnbf

            absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset
        quant_state._fused_absmax = absmax = absmax.float()
    out = torch.empty(quant_state.shape, dtype=dtype, device=weight.device)
    kernel(weight, absmax, quant_state.blocksize, quant_state.quant_type, dtype, out)
    return out


_BNB: list = []


def _bnb_cuda_dequantize():
    if not _BNB:
        try:
            from bitsandbytes.backends.cuda.ops import _dequantize_4bit_impl

            _BNB.append(_dequantize_4bit_impl)
        except ImportError:  # another bitsandbytes: its public path
            _BNB.append(None)
    return _BNB[0]


# LoRA weights train in float32 and are used in the compute dtype, scaled. Their casts are kept
# until the optimizer changes the weight (its version counter moves), not redone in every pass.
CACHE_CASTS = True
FUSE_QKV = True  # q, k and v in one function (`LoRAQKV`); False: one each (the engine lab)


def cast(weight: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`scale * weight` in `dtype`, detached (the functions route the gradients themselves)."""
    if not CACHE_CASTS:
        return (weight.detach() * scale).to(dtype) if scale != 1.0 else weight.detach().to(dtype)
    key = (dtype, scale)
    cache = weight.__dict__.setdefault("_fused_casts", {})
    hit = cache.get(key)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    with torch.no_grad():
        value = (weight * scale).to(dtype) if scale != 1.0 else weight.to(dtype)
    cache[key] = (weight._version, value)
    return value


def stacked(weights: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The LoRA A weights of projections of one input, stacked by rows in `dtype` (one matmul for
    all of them), cached like `cast` until one of them changes."""
    if not CACHE_CASTS:
        return torch.cat([w.detach().to(dtype) for w in weights])
    key = (dtype, *(id(w) for w in weights[1:]))
    cache = weights[0].__dict__.setdefault("_fused_stacks", {})
    versions = tuple(w._version for w in weights)
    hit = cache.get(key)
    if hit is not None and hit[0] == versions:
        return hit[1]
    with torch.no_grad():
        value = torch.cat([w.to(dtype) for w in weights])
    cache[key] = (versions, value)
    return value


def _base_matmul(x: torch.Tensor, base: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = dequantized(base, dtype)
    bias = None if base.bias is None else base.bias.to(dtype)
    return F.linear(x, weight, bias)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _lora(x, base, a, b, scale, x_lora=None, xa=None):
    """(x @ W.T + scale * xa @ B.T, xa = x_lora @ A.T) on 2-D operands in one dtype (A, B: the
    parameters); xa, small, is kept for the backward."""
    if xa is None:
        xa = (x if x_lora is None else x_lora) @ cast(a, x.dtype).t()
    return _base_matmul(x, base, x.dtype).addmm_(xa, cast(b, x.dtype, scale).t()), xa


def _lora_input_grad(grad, base, a, b, scale, same_input: bool):
    """(dL/dx, dL/dx_lora or None, scale * grad @ B) of `_lora`: the base part through a fresh
    dequantisation."""
    grad_b = grad @ cast(b, grad.dtype, scale)
    grad_x = grad @ dequantized(base, grad.dtype)
    if same_input:
        return grad_x.addmm_(grad_b, cast(a, grad.dtype)), None, grad_b
    return grad_x, grad_b @ cast(a, grad.dtype), grad_b


def _lora_weight_grads(grad, grad_b, x_lora, xa, a, b, scale):
    """dL/dA and dL/dB in the parameters' dtype, from `grad_b` = scale * grad @ B and the
    forward's `xa` = x_lora @ A.T."""
    grad_a = grad_b.t() @ x_lora
    grad_b_weight = (grad.t() @ xa).mul_(scale)
    return grad_a.to(a.dtype), grad_b_weight.to(b.dtype)


class LoRALinear(torch.autograd.Function):
    """One LoRA projection: y = x @ W.T + s * (dropout(x) @ A.T) @ B.T, W frozen (4 bit or not)."""

    @staticmethod
    def forward(ctx, x, x_lora, base, lora_a, lora_b, scale):
        dtype = _compute_dtype(x)
        shape = x.shape
        same = x_lora is x
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        xl2 = x2 if same else x_lora.reshape(-1, shape[-1]).to(dtype)
        out, xa = _lora(x2, base, lora_a, lora_b, scale, xl2)
        ctx.base, ctx.scale, ctx.dtype, ctx.same = base, scale, dtype, same
        ctx.save_for_backward(x, None if same else x_lora, xa, lora_a, lora_b)
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, x_lora, xa, lora_a, lora_b = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        xl2 = x2 if ctx.same else x_lora.reshape(-1, x.shape[-1]).to(dtype)
        grad_x, grad_xl, grad_b = _lora_input_grad(g, ctx.base, lora_a, lora_b, scale, ctx.same)
        grad_a, grad_bw = _lora_weight_grads(g, grad_b, xl2, xa, lora_a, lora_b, scale)
        grad_x = grad_x.view(x.shape).to(x.dtype)
        if grad_xl is not None:
            grad_xl = grad_xl.view(x.shape).to(x_lora.dtype)
        return grad_x, grad_xl, None, grad_a, grad_bw, None


class LoRAQKV(torch.autograd.Function):
    """The attention's q, k and v projections of one input, LoRA on each and no dropout: one
    function, one matmul for the three A's, and the input's gradient accumulated from the three
    in place (where separate projections leave autograd two more sums of the hidden state)."""

    @staticmethod
    def forward(ctx, x, bases, scales, *lora):
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        a_weights, b_weights = lora[0::2], lora[1::2]
        xa = x2 @ stacked(a_weights, dtype).t()
        outs, start = [], 0
        for base, a, b, scale in zip(bases, a_weights, b_weights, scales):
            out, _ = _lora(x2, base, a, b, scale, xa=xa[:, start:start + a.shape[0]])
            start += a.shape[0]
            outs.append(out.view(*shape[:-1], out.shape[-1]))
        ctx.bases, ctx.scales, ctx.dtype = bases, scales, dtype
        ctx.save_for_backward(x, xa, *lora)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, xa, *lora = ctx.saved_tensors
        dtype = ctx.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a_weights, b_weights = lora[0::2], lora[1::2]
        grad_x, grad_bs, lora_grads, start = None, [], [], 0
        for grad, base, a, b, scale in zip(grads, ctx.bases, a_weights, b_weights, ctx.scales):
            rank = a.shape[0]
            g = grad.reshape(-1, grad.shape[-1]).to(dtype)
            grad_b = g @ cast(b, dtype, scale)
            weight = dequantized(base, dtype)
            grad_x = g @ weight if grad_x is None else grad_x.addmm_(g, weight)
            del weight
            grad_bs.append(grad_b)
            lora_grads.append((g.t() @ xa[:, start:start + rank]).mul_(scale).to(b.dtype))
            start += rank
        grad_b = torch.cat(grad_bs, dim=1)
        grad_x.addmm_(grad_b, stacked(a_weights, dtype))
        grad_a = (grad_b.t() @ x2).split([a.shape[0] for a in a_weights])
        grads_lora = [g for a, grad_a_i, grad_b_i in zip(a_weights, grad_a, lora_grads)
                      for g in (grad_a_i.to(a.dtype), grad_b_i)]
        return (grad_x.view(x.shape).to(x.dtype), None, None, *grads_lora)


def _swiglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    if e.is_cuda and _liger_swiglu() is not None:
        return _liger_swiglu()[0](e, g)[2]
    return F.silu(e) * g


def _swiglu_backward(e: torch.Tensor, g: torch.Tensor, grad_h: torch.Tensor):
    """(dL/de, dL/dg) of h = silu(e) * g; on CUDA liger's kernel writes them into e and g."""
    if e.is_cuda and _liger_swiglu() is not None:
        return _liger_swiglu()[1](e, g, grad_h)
    sig = torch.sigmoid(e)
    silu = e * sig
    grad_g = grad_h * silu
    grad_e = grad_h * g * (sig + silu * (1 - sig))
    return grad_e, grad_g


_LIGER: list = []


def _liger_swiglu():
    """liger-kernel's (swiglu_forward, swiglu_backward) Triton kernels, or None without liger."""
    if not _LIGER:
        try:
            from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

            _LIGER.append((swiglu_forward, swiglu_backward))
        except ImportError:
            _LIGER.append(None)
    return _LIGER[0]


class LoRAMLP(torch.autograd.Function):
    """Qwen3's MLP with LoRA on its three projections and no dropout:
    e = x Wg + LoRA_g(x), g = x Wu + LoRA_u(x), h = silu(e) * g, y = h Wd + LoRA_d(h).
    Keeps x, e and g for the backward (not h, which is recomputed), and the small x @ A.T."""

    @staticmethod
    def forward(ctx, x, gate_base, gate_a, gate_b, gate_s, up_base, up_a, up_b, up_s,
                down_base, down_a, down_b, down_s):
        dtype = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        xa = x2 @ stacked((gate_a, up_a), dtype).t()  # both A's in one matmul
        rank = gate_a.shape[0]
        e, _ = _lora(x2, gate_base, gate_a, gate_b, gate_s, xa=xa[:, :rank])
        g, _ = _lora(x2, up_base, up_a, up_b, up_s, xa=xa[:, rank:])
        y, ha = _lora(_swiglu(e, g), down_base, down_a, down_b, down_s)
        ctx.bases = (gate_base, up_base, down_base)
        ctx.scales = (gate_s, up_s, down_s)
        ctx.dtype = dtype
        ctx.save_for_backward(x, e, g, xa, ha, gate_a, gate_b, up_a, up_b, down_a, down_b)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, e, g, xa, ha, gate_a, gate_b, up_a, up_b, down_a, down_b = ctx.saved_tensors
        gate_base, up_base, down_base = ctx.bases
        gate_s, up_s, down_s = ctx.scales
        dtype = ctx.dtype
        dy = grad.reshape(-1, grad.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)

        h = _swiglu(e, g)
        grad_h, _, dy_b = _lora_input_grad(dy, down_base, down_a, down_b, down_s, True)
        grad_da, grad_db = _lora_weight_grads(dy, dy_b, h, ha, down_a, down_b, down_s)
        del h
        grad_e, grad_g = _swiglu_backward(e, g, grad_h)
        del grad_h
        grad_x, _, ge_b = _lora_input_grad(grad_e, gate_base, gate_a, gate_b, gate_s, True)
        rank = gate_a.shape[0]
        grad_ga, grad_gb = _lora_weight_grads(grad_e, ge_b, x2, xa[:, :rank], gate_a, gate_b, gate_s)
        grad_x_up, _, gg_b = _lora_input_grad(grad_g, up_base, up_a, up_b, up_s, True)
        grad_x += grad_x_up
        grad_ua, grad_ub = _lora_weight_grads(grad_g, gg_b, x2, xa[:, rank:], up_a, up_b, up_s)
        return (grad_x.view(x.shape).to(x.dtype), None, grad_ga, grad_gb, None, None, grad_ua, grad_ub, None,
                None, grad_da, grad_db, None)


# --- patching peft's modules ----------------------------------------------------------------------

def lora_parts(layer) -> tuple | None:
    """(base layer, A weight, B weight, scale, dropout) of a peft LoRA layer in the plain case
    this path runs (one active adapter, no DoRA or other variant, not merged), else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name):
        return None
    return layer.base_layer, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], \
        layer.lora_dropout[name]


def _no_dropout(dropout) -> bool:
    return isinstance(dropout, torch.nn.Identity) or not dropout.training or dropout.p == 0


def _linear_forward(self, x, *args, **kwargs):
    parts = lora_parts(self)
    if parts is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    base, a, b, scale, dropout = parts
    return LoRALinear.apply(x, x if _no_dropout(dropout) else dropout(x), base, a, b, scale)


def _mlp_forward(self, x):
    parts = [lora_parts(self.gate_proj), lora_parts(self.up_proj), lora_parts(self.down_proj)]
    if any(p is None or not _no_dropout(p[4]) for p in parts):
        return type(self).forward(self, x)  # the class's own (Qwen3MLP's, liger's SwiGLU without act_fn)
    args = [value for base, a, b, scale, _ in parts for value in (base, a, b, scale)]
    return LoRAMLP.apply(x, *args)


def _qkv_forward(self, x, *args, **kwargs):
    """q_proj's forward: q, k and v in one function; k_proj and v_proj then take theirs from it
    when they are called with the same input, as the attention's forward does next."""
    group = (self, *self._qkv_siblings)
    parts = [lora_parts(m) for m in group]
    if args or kwargs or any(p is None or not _no_dropout(p[4]) for p in parts):
        return _linear_forward(self, x, *args, **kwargs)
    lora = [w for _, a, b, _, _ in parts for w in (a, b)]
    q, k, v = LoRAQKV.apply(x, tuple(p[0] for p in parts), tuple(p[3] for p in parts), *lora)
    for sibling, out in zip(self._qkv_siblings, (k, v)):
        sibling.__dict__["_qkv_pending"] = (x, out)
    return q


def _qkv_sibling_forward(self, x, *args, **kwargs):
    pending = self.__dict__.pop("_qkv_pending", None)
    if pending is not None and pending[0] is x and not args and not kwargs:
        return pending[1]
    return _linear_forward(self, x, *args, **kwargs)


def _qkv_group(module) -> tuple | None:
    """(q_proj, k_proj, v_proj) of an attention module whose three are LoRA layers, else None."""
    group = tuple(getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    return group if all(m is not None and _is_lora_layer(m) for m in group) else None


def _is_lora_layer(module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "active_adapters")


def _is_swiglu_mlp(module) -> bool:
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or getattr(getattr(module, "config", None), "hidden_act", None) in ("silu",
                                                                                                          "swish")
    return all(p is not None and _is_lora_layer(p) for p in projections) and silu


def fuse(model) -> dict[str, int]:
    """Route the model's LoRA projections through the fused functions; returns what was fused.
    `unfuse(model)` restores peft's forwards."""
    counts = {"mlp": 0, "qkv": 0, "linear": 0}
    forwards = {}
    for module in model.modules():
        group = _qkv_group(module) if FUSE_QKV else None
        if group is not None and not any("_unfused_forward" in m.__dict__ for m in group):
            q, k, v = group
            q._qkv_siblings = (k, v)
            forwards.update({q: _qkv_forward, k: _qkv_sibling_forward, v: _qkv_sibling_forward})
            counts["qkv"] += 1
    for module in model.modules():
        kind = "mlp" if _is_swiglu_mlp(module) else "linear" if _is_lora_layer(module) else None
        if kind is None or "_unfused_forward" in module.__dict__:
            continue
        # An instance's own forward (liger binds its SwiGLU MLP that way) comes back with unfuse.
        module._unfused_forward = module.__dict__.get("forward")
        forward = _mlp_forward if kind == "mlp" else forwards.get(module, _linear_forward)
        module.forward = types.MethodType(forward, module)
        counts[kind] += kind == "mlp" or forward is _linear_forward
    return counts


def unfuse(model) -> None:
    for module in model.modules():
        if "_unfused_forward" in module.__dict__:
            previous = module.__dict__.pop("_unfused_forward")
            if previous is None:
                del module.forward
            else:
                module.forward = previous
            for name in ("_qkv_siblings", "_qkv_pending"):
                module.__dict__.pop(name, None)
