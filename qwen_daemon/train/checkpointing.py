"""Activation checkpointing per decoder layer, with the checkpointed layers' inputs in host memory.

`set_checkpointing(model, checkpointed=k, offload=...)` recomputes the first k decoder layers in
the backward (torch's non-reentrant checkpoint) and keeps every activation of the others. k = all
layers is what `gradient_checkpointing_enable` does; fewer is faster when memory allows (the
memory model in memory.py picks k). With `offload`, the one tensor a checkpointed layer keeps, its
input hidden state, goes to pinned host memory on a side stream while the forward goes on, and in
the backward it comes back one layer ahead of its use: at long sequences these inputs are most of
the memory (36 x 671 MB for Qwen3-4B at 131,072 tokens) and PCIe moves them in a small fraction of
a layer's compute time.

A checkpointed layer runs as one autograd function (`Recomputed`, the way Unsloth's offloaded
checkpoint and torch's reentrant one do it): its first forward runs without gradients, so it builds
no graph and calls no Python hook per saved tensor, and it keeps only its input; the backward runs
the layer again with gradients and back-propagates through it. Where that cannot be used (another
argument than the hidden state needs a gradient) torch's non-reentrant checkpoint runs instead.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch.utils.checkpoint import checkpoint

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors stay where they are
ONE_FUNCTION = True  # `Recomputed`; False: torch's non-reentrant checkpoint for every layer (the engine lab)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (the classes it names in `_no_split_modules`), in order; also
    once FSDP has sharded them (it gives each a subclass, FSDPQwen3DecoderLayer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    classes = set(getattr(base, "_no_split_modules", None) or ())
    return [m for m in base.modules() if any(c.__name__ in classes for c in type(m).__mro__)]


def set_checkpointing(model, checkpointed: int | None = None, offload: bool = False) -> None:
    """Checkpoint the first `checkpointed` decoder layers (None = all, 0 = none) while training;
    with `offload`, their inputs are kept in host memory."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (_no_split_modules) to checkpoint")
    checkpointed = len(layers) if checkpointed is None else checkpointed
    offloader = HostOffloader() if offload else None
    for i, layer in enumerate(layers):
        layer.__dict__.pop("forward", None)
        if i < checkpointed:
            layer._offloader = offloader
            layer.forward = types.MethodType(_checkpointed_forward, layer)
    model.checkpointing_plan = {"checkpointed": checkpointed, "layers": len(layers), "offload": bool(offload)}


def _checkpointed_forward(self, hidden, *args, **kwargs):
    forward = type(self).forward.__get__(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(hidden, *args, **kwargs)
    if ONE_FUNCTION and isinstance(hidden, torch.Tensor) and not _any_needs_grad(args) and not _any_needs_grad(kwargs.values()):
        run = (lambda h: forward(h, *args, **kwargs)) if args or kwargs else forward
        shape: list[bool] = []  # whether the layer returned a tuple (transformers 4) or the hidden state
        out = Recomputed.apply(_NEEDS_GRAD[hidden.device], hidden, run, self._offloader, _uses_rng(self), shape)
        return (out,) if shape[0] else out
    if self._offloader is None:
        return checkpoint(forward, hidden, *args, use_reentrant=False, **kwargs)
    with torch.autograd.graph.saved_tensors_hooks(self._offloader.pack, self._offloader.unpack):
        return checkpoint(forward, hidden, *args, use_reentrant=False, **kwargs)


def _any_needs_grad(values) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad or isinstance(v, (tuple, list)) and _any_needs_grad(v)
               for v in values)


class _GradAnchors(dict):
    """An empty tensor that needs a gradient, per device: an input of every `Recomputed` so that
    autograd calls its backward even when the hidden state needs none (the first layer's input
    comes from a frozen embedding)."""

    def __missing__(self, device):
        self[device] = anchor = torch.empty(0, device=device, requires_grad=True)
        return anchor


_NEEDS_GRAD = _GradAnchors()


def _uses_rng(layer) -> bool:
    """Whether recomputing the layer must replay the random numbers of its first forward (dropout)."""
    cached = layer.__dict__.get("_uses_rng")
    if cached is None:
        dropout = getattr(getattr(layer, "self_attn", None), "attention_dropout", 0) or 0
        cached = dropout > 0 or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in layer.modules())
        layer._uses_rng = cached
    return cached


class Recomputed(torch.autograd.Function):
    """out = run(hidden), keeping only `hidden` (on the GPU, or in host memory through `offloader`)
    and recomputing the rest in the backward. `anchor` is `_NEEDS_GRAD`'s tensor."""

    @staticmethod
    def forward(ctx, anchor, hidden, run, offloader, uses_rng, shape):
        ctx.run, ctx.offloader, ctx.device = run, offloader, hidden.device
        ctx.hidden_needs_grad = hidden.requires_grad
        ctx.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                        for kind in {"cpu", hidden.device.type}]
        ctx.rng = _rng_state(hidden.device) if uses_rng else None
        with torch.no_grad():
            out = run(hidden)
        shape.append(isinstance(out, tuple))
        if shape[0]:
            if len(out) > 1:
                raise ValueError(f"a checkpointed layer returned {len(out)} values; only the hidden state is kept")
            out = out[0]
        if offloader is None:
            ctx.save_for_backward(hidden)
        else:
            ctx.packed = offloader.pack(hidden.detach())
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.offloader is None:
            (hidden,) = ctx.saved_tensors
        else:
            hidden, ctx.packed = ctx.offloader.unpack(ctx.packed), None
        hidden = hidden.detach().requires_grad_(True)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for kind, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            if ctx.rng is not None:
                stack.enter_context(_replayed_rng(ctx.device, ctx.rng))
            out = ctx.run(hidden)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(out, grad)
        return None, hidden.grad if ctx.hidden_needs_grad else None, None, None, None, None


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(device: torch.device, state):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class _Offloaded:
    """One saved tensor in host memory; `prev` is the one saved before it (fetched next)."""

    __slots__ = ("device", "host", "copied", "gpu", "fetched", "prev", "consumed")

    def __init__(self, device, host, copied, prev):
        self.device, self.host, self.copied, self.prev = device, host, copied, prev
        self.gpu = self.fetched = None
        self.consumed = False


class HostOffloader:
    """Saved-tensor hooks that keep large CUDA tensors in pinned host memory. The copy out runs
    on a side stream after the work that produced the tensor; the backward uses saved tensors in
    the reverse order they were saved, so fetching one also starts fetching the one before it."""

    def __init__(self):
        self.streams: dict[int, torch.cuda.Stream] = {}
        self.last: _Offloaded | None = None

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device.index not in self.streams:
            self.streams[device.index] = torch.cuda.Stream(device)
        return self.streams[device.index]

    def pack(self, tensor: torch.Tensor):
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < MIN_OFFLOAD_BYTES:
            return tensor
        compute, side = torch.cuda.current_stream(tensor.device), self._stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        side.wait_stream(compute)  # the tensor is complete ...
        with torch.cuda.stream(side):
            host.copy_(tensor, non_blocking=True)
            copied = side.record_event()
        tensor.record_stream(side)  # ... and its memory is not reused before the copy is done
        prev = self.last if self.last is not None and not self.last.consumed else None
        self.last = _Offloaded(tensor.device, host, copied, prev)
        return self.last

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.gpu is None:
            self._fetch(packed)
        torch.cuda.current_stream(packed.device).wait_event(packed.fetched)
        tensor, packed.gpu = packed.gpu, None
        prev, packed.prev, packed.consumed = packed.prev, None, True
        if prev is not None and not prev.consumed and prev.gpu is None:
            self._fetch(prev)  # the layer before is recomputed next
        return tensor

    def _fetch(self, packed: _Offloaded) -> None:
        compute, side = torch.cuda.current_stream(packed.device), self._stream(packed.device)
        packed.gpu = torch.empty(packed.host.shape, dtype=packed.host.dtype, device=packed.device)
        side.wait_stream(compute)  # (the allocation above is ordered on the compute stream)
        with torch.cuda.stream(side):
            side.wait_event(packed.copied)
            packed.gpu.copy_(packed.host, non_blocking=True)
            packed.fetched = side.record_event()
        packed.gpu.record_stream(side)
