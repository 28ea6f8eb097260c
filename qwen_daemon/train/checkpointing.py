"""Activation checkpointing per decoder layer, with the checkpointed layers' inputs in host memory.

`set_checkpointing(model, checkpointed=k, offload=...)` recomputes the first k decoder layers in
the backward (torch's non-reentrant checkpoint) and keeps every activation of the others. k = all
layers is what `gradient_checkpointing_enable` does; fewer is faster when memory allows (the
memory model in memory.py picks k). With `offload`, the one tensor a checkpointed layer keeps, its
input hidden state, goes to pinned host memory on a side stream while the forward goes on, and in
the backward it comes back one layer ahead of its use: at long sequences these inputs are most of
the memory (36 x 671 MB for Qwen3-4B at 131,072 tokens) and PCIe moves them in a small fraction of
a layer's compute time.
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

MIN_OFFLOAD_BYTES = 1 << 20  # smaller saved tensors stay where they are


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


def _checkpointed_forward(self, *args, **kwargs):
    forward = type(self).forward.__get__(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    if self._offloader is None:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    with torch.autograd.graph.saved_tensors_hooks(self._offloader.pack, self._offloader.unpack):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)


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
