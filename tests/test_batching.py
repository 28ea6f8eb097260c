"""Packing, epoch order, data position and collation."""

import random

import pytest
import torch

from qwen_daemon.train.batching import collate, epoch_units, pack, step_plan
from qwen_daemon.train.data import labels_of


def fake_samples(n=200, max_len=300, seed=0):
    """Samples with distinct token ids, so every token can be traced back to its sample."""
    rng = random.Random(seed)
    samples, next_id = [], 10
    for _ in range(n):
        length = rng.randint(8, max_len)
        samples.append({"input_ids": list(range(next_id, next_id + length)), "prompt_len": rng.randint(1, length - 1)})
        next_id += length
    return samples


def test_pack_puts_every_sample_in_exactly_one_sequence_within_the_limit():
    rng = random.Random(1)
    lengths = [rng.randint(1, 512) for _ in range(5000)]
    bins = pack(lengths, 512, seed=3)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    # Best-fit decreasing wastes little: the bins are nearly full.
    assert sum(lengths) / (len(bins) * 512) > 0.97


def test_pack_rejects_a_sample_longer_than_the_sequence():
    with pytest.raises(ValueError, match="more than max_seq_len"):
        pack([10, 600], 512)


def test_every_token_of_every_sample_appears_exactly_once_across_packed_batches():
    samples = fake_samples()
    units = epoch_units([len(s["input_ids"]) for s in samples], epoch=0, seed=5, max_seq_len=512, packing=True)
    seen = []
    position = 0
    while position < len(samples):
        batches, position = step_plan(units, position, micro_batch_size=3, grad_accum=2)
        for micro_batch in batches:
            b = collate([[samples[i] for i in unit] for unit in micro_batch], packing=True, pad_token_id=0)
            assert b["input_ids"].shape[0] == len(micro_batch)  # one row per packed sequence
            assert b["input_ids"].shape[1] <= 512
            assert b["num_tokens"] == sum(len(samples[i]["input_ids"]) for unit in micro_batch for i in unit)
            for row, unit in enumerate(micro_batch):
                lengths = [len(samples[i]["input_ids"]) for i in unit]
                real = sum(lengths)
                seen.extend(b["input_ids"][row, :real].tolist())
                # Position ids restart at 0 at every sample boundary (and for the padding tail).
                positions = b["position_ids"][row].tolist()
                starts = [p for p, pos in enumerate(positions[:real]) if pos == 0]
                assert starts == [sum(lengths[:k]) for k in range(len(unit))]
                assert (b["labels"][row, real:] == -100).all()
    all_tokens = [t for s in samples for t in s["input_ids"]]
    assert sorted(seen) == all_tokens  # ids are distinct and increasing: each exactly once


def test_labels_are_masked_per_sample_in_a_packed_row():
    samples = fake_samples(5)
    b = collate([samples], packing=True, pad_token_id=0)
    expected = []
    for s in samples:
        labels = labels_of(s["input_ids"], s["prompt_len"])
        expected += [-100] + labels[1:]  # a sample's first token is never a target
    real = len(expected)
    assert b["labels"][0, :real].tolist() == expected
    assert b["num_label_tokens"] == sum(len(s["input_ids"]) - s["prompt_len"] for s in samples)


def test_flash_attention_gets_one_flattened_row_with_every_sample_boundary():
    samples = fake_samples(4, max_len=40)
    b = collate([samples[:2], samples[2:]], packing=True, pad_token_id=0, flash_attention=True)
    lengths = [len(s["input_ids"]) for s in samples]
    assert b["input_ids"].shape == (1, sum(lengths))
    assert b["cu_seq_lens_q"].tolist() == [0, *(sum(lengths[:k + 1]) for k in range(4))]  # every sample
    assert b["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]


def test_dynamic_padding_without_packing():
    samples = fake_samples(4, max_len=50)
    b = collate([[s] for s in samples], packing=False, pad_token_id=151643)
    width = b["input_ids"].shape[1]
    assert width % 8 == 0 and width - max(len(s["input_ids"]) for s in samples) < 8
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert b["attention_mask"][row].sum() == n
        assert (b["input_ids"][row, n:] == 151643).all()
        assert (b["labels"][row, n:] == -100).all()
    assert b["num_tokens"] == sum(len(s["input_ids"]) for s in samples)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_and_batch_size_change_neither_skip_nor_repeat(packing):
    lengths = [len(s["input_ids"]) for s in fake_samples(300)]
    units = epoch_units(lengths, epoch=2, seed=9, max_seq_len=512, packing=packing)
    seen, position = [], 0

    def step(micro_batch_size, grad_accum):
        nonlocal position
        batches, position = step_plan(units, position, micro_batch_size, grad_accum)
        seen.extend(i for micro_batch in batches for unit in micro_batch for i in unit)

    for _ in range(6):
        step(4, 2)
    # "Resume" from the recorded position with another micro-batch size and accumulation.
    while position < 300:
        step(7, 1)
    assert sorted(seen) == list(range(300))
    assert position == 300


def test_epoch_order_is_seeded():
    lengths = [len(s["input_ids"]) for s in fake_samples(100)]
    a = epoch_units(lengths, epoch=0, seed=1, max_seq_len=512, packing=True)
    assert a == epoch_units(lengths, epoch=0, seed=1, max_seq_len=512, packing=True)
    assert a != epoch_units(lengths, epoch=1, seed=1, max_seq_len=512, packing=True)


def test_a_position_inside_a_unit_is_refused():
    units = [[0, 1], [2], [3, 4]]
    with pytest.raises(ValueError, match="not a unit boundary"):
        step_plan(units, 1, 1, 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_attention_or_position_leakage_across_packed_samples(attn):
    """The tiny Qwen3 gives each sample the same logits packed as alone."""
    from transformers import AutoModelForCausalLM

    from qwen_daemon.train.builtin import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-qwen3"), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    rng = random.Random(0)
    samples = [{"input_ids": [rng.randrange(151000) for _ in range(n)], "prompt_len": 2} for n in (17, 40, 9, 30)]
    # Two packed rows of different length: the shorter one is padded.
    batch = collate([samples[:3], samples[3:]], packing=True, pad_token_id=151643)
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers does not look for packing.
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row, unit in enumerate([samples[:3], samples[3:]]):
            offset = 0
            for s in unit:
                alone = model(input_ids=torch.tensor([s["input_ids"]])).logits[0]
                n = len(s["input_ids"])
                torch.testing.assert_close(packed[row, offset:offset + n], alone, atol=1e-4, rtol=1e-4)
                offset += n


def test_every_rank_gets_the_same_number_of_micro_batches_at_the_end_of_an_epoch():
    units = [[0], [1], [2]]  # three units left for two ranks at micro-batch 1, accumulation 2
    rank0, position = step_plan(units, 0, micro_batch_size=1, grad_accum=2, world_size=2, rank=0)
    rank1, _ = step_plan(units, 0, micro_batch_size=1, grad_accum=2, world_size=2, rank=1)
    assert rank0 == [[[0]], [[2]]] and rank1 == [[[1]], []]  # rank 1 runs a zero-weight stand-in
    assert position == 3
