"""The batch size's rules (shared/batchsize.py), which the loop applies and the TUI previews."""

import pytest

from shared import batchsize


def test_a_change_keeps_the_global_batch_unless_told_not_to():
    assert batchsize.change(4, 2, 2, keep_global_batch=True) == (2, 4)
    assert batchsize.change(4, 2, 8, keep_global_batch=True) == (8, 1)
    assert batchsize.change(4, 2, 3, keep_global_batch=False) == (3, 2)
    with pytest.raises(ValueError, match="micro-batch 3 does not divide the global batch 8.*choose one of 1, 2, 4, 8,"):
        batchsize.change(4, 2, 3, keep_global_batch=True)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="positive integer"):
            batchsize.change(4, 2, bad, keep_global_batch=False)


def test_an_oom_halves_to_a_divisor_of_the_per_process_batch():
    assert batchsize.halved(4, 2) == (2, 4)
    assert batchsize.halved(6, 1) == (3, 2)
    assert batchsize.halved(5, 3) == (1, 15)  # 2 does not divide 15
    assert batchsize.halved(1, 8) is None


def test_another_process_count_keeps_the_global_batch_where_it_divides():
    assert batchsize.rescaled(4, 2, 1, 2) == (4, 1)
    assert batchsize.rescaled(4, 1, 1, 8) is None  # 4 samples on 8 processes
    assert batchsize.rescaled(2, 3, 2, 4) == (1, 3)  # per process 3: the micro-batch lowered to divide it
    assert batchsize.rescaled(2, 2, 1, 3) is None
