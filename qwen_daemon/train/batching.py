"""From tokenised samples to micro-batches: packing, epoch order, data position, collation.

An epoch is an ordered list of *units*. With packing, a unit is a packed sequence: samples whose
lengths add up to at most `data.max_seq_len`, grouped once by best-fit decreasing (so about every
slot holds a real token) and shuffled per epoch. Without packing, a unit is one sample. A
micro-batch is the next `micro_batch_size` units (`step_plan`).

The data position is the number of samples consumed in the epoch. Units never change when the
micro-batch size does, so a resume or a batch-size change continues at a unit boundary and no
sample is skipped or repeated.

Packed micro-batches have one row per packed sequence with position ids restarting at 0 for
every sample (see `collate`). Transformers turns those position ids into a block-diagonal causal
mask for SDPA and eager attention; with flash-attention the micro-batch is flattened into one row
and the kernel gets the `cu_seq_lens` it needs for variable-length sequences. Either way no token
attends across a sample boundary. The forward pass must run with `use_cache=False`
(as training does): with a KV cache, transformers does not look for packed sequences.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

from qwen_daemon.train.data import labels_of


def pack(lengths: Sequence[int], max_seq_len: int, seed: int = 0) -> list[list[int]]:
    """Group sample indices into sequences of at most `max_seq_len` tokens (best-fit decreasing).

    Ties in length are broken by a seeded shuffle so equal-length samples do not always share a
    sequence. Every index appears in exactly one sequence.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: the shuffle decides among equal lengths
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # sorted distinct remaining capacities that some bin has
    bins_with: dict[int, list[int]] = {}  # remaining capacity -> bin numbers
    for i in order:
        n = lengths[i]
        if n > max_seq_len:
            raise ValueError(f"sample {i} has {n} tokens, more than max_seq_len {max_seq_len}")
        k = bisect.bisect_left(free_sizes, n)
        if k < len(free_sizes):  # the fullest bin that still fits
            cap = free_sizes[k]
            b = bins_with[cap].pop()
            if not bins_with[cap]:
                del bins_with[cap]
                free_sizes.pop(k)
        else:
            cap, b = max_seq_len, len(bins)
            bins.append([])
        bins[b].append(i)
        left = cap - n
        if left > 0:
            if left not in bins_with:
                bins_with[left] = []
                bisect.insort(free_sizes, left)
            bins_with[left].append(b)
    return bins


def epoch_units(lengths: Sequence[int], *, epoch: int, seed: int, max_seq_len: int, packing: bool) -> list[list[int]]:
    """The epoch's units in training order (deterministic from seed and epoch)."""
    units = pack(lengths, max_seq_len, seed) if packing else [[i] for i in range(len(lengths))]
    random.Random(seed * 1_000_003 + epoch).shuffle(units)
    return units


def unit_at(units: list[list[int]], start_sample: int) -> int:
    """Index of the unit that begins at data position `start_sample` (samples consumed)."""
    consumed, u = 0, 0
    while u < len(units) and consumed < start_sample:
        consumed += len(units[u])
        u += 1
    if consumed != start_sample:
        raise ValueError(f"data position {start_sample} is not a unit boundary of this epoch "
                         "(were the data or data.max_seq_len changed since the checkpoint?)")
    return u


def step_plan(units: list[list[int]], start_sample: int, micro_batch_size: int, grad_accum: int,
              world_size: int = 1, rank: int = 0) -> tuple[list[list[list[int]]], int]:
    """One optimizer step: this rank's micro-batches (each a list of units of sample indices) and
    the data position after the step, counted over all ranks. Each micro-batch spans
    `micro_batch_size` units per rank; a step at the end of the epoch may be shorter. Every rank
    gets the same number of micro-batches (their collectives must pair up): at the end of an
    epoch a rank's share may be empty, and the loop runs a zero-weight stand-in for it."""
    u = unit_at(units, start_sample)
    per_micro = micro_batch_size * world_size
    step_units = units[u:u + per_micro * grad_accum]
    batches = [step_units[k:k + per_micro][rank * micro_batch_size:(rank + 1) * micro_batch_size]
               for k in range(0, len(step_units), per_micro)]
    return batches, start_sample + sum(len(unit) for unit in step_units)


def collate(units: Sequence[Sequence[dict]], *, packing: bool, pad_token_id: int, flash_attention: bool = False) -> dict:
    """Tensors for one micro-batch: a list of units, each a list of samples ({input_ids, prompt_len}).

    Packed, each unit is one row: its samples back to back, position ids restarting at 0 for
    every sample, rows padded at the end to the longest row (a multiple of 8; packed rows are
    nearly full, so this is little), the padding given its own positions so that it forms a
    separate sequence nobody attends to. With flash-attention the whole micro-batch is one row
    with the `cu_seq_lens` the varlen kernel needs (no padding at all). Without packing, one
    sample per row with an attention mask.

    One row per packed unit rather than one row for the micro-batch: SDPA and eager attention
    apply the block-diagonal mask to a whole row, so their cost grows with the square of the
    row's length.

    Also returns `num_tokens` (real tokens, never padding) and `num_label_tokens` (tokens the
    loss counts).
    """
    import torch
    from transformers import DataCollatorWithFlattening

    rows = []
    for unit in units:
        ids, labels, positions = [], [], []
        for s in unit:
            sample_labels = labels_of(s["input_ids"], s["prompt_len"])
            sample_labels[0] = -100  # never the target of the previous sample's last token
            ids += list(s["input_ids"])
            labels += sample_labels
            positions += range(len(s["input_ids"]))
        rows.append((ids, labels, positions))
    num_tokens = sum(len(ids) for ids, _, _ in rows)
    # The model shifts labels by one: a label counts if it is not -100 and not a row's first.
    num_label_tokens = sum(sum(1 for t in labels[1:] if t != -100) for _, labels, _ in rows)

    if packing and flash_attention:  # one feature per sample: cu_seq_lens marks every sample boundary
        features = [{"input_ids": list(s["input_ids"]), "labels": labels_of(s["input_ids"], s["prompt_len"])}
                    for unit in units for s in unit]
        batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(features)
        return {**batch, "num_tokens": num_tokens, "num_label_tokens": num_label_tokens}
    width = -(-max(len(ids) for ids, _, _ in rows) // 8) * 8
    pads = [width - len(ids) for ids, _, _ in rows]
    batch = {
        "input_ids": torch.tensor([ids + [pad_token_id] * p for (ids, _, _), p in zip(rows, pads)]),
        "labels": torch.tensor([labels + [-100] * p for (_, labels, _), p in zip(rows, pads)]),
    }
    if packing:
        batch["position_ids"] = torch.tensor([list(pos) + list(range(p)) for (_, _, pos), p in zip(rows, pads)])
    else:
        batch["attention_mask"] = torch.tensor([[1] * len(ids) + [0] * p for (ids, _, _), p in zip(rows, pads)])
    return {**batch, "num_tokens": num_tokens, "num_label_tokens": num_label_tokens}
