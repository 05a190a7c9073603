"""LaggedReads: values pushed at a step come back on the host exactly ``lag`` steps later, oldest first."""

from __future__ import annotations

import pytest
import torch

from ldm.lightning.host_reads import LaggedReads


def test_values_come_back_lag_steps_after_their_push_in_order():
    reads = LaggedReads(lag=2)
    total = torch.zeros(())
    seen = {}
    for step in range(6):
        total += step
        reads.push(step, total)  # the value as it is now, not as the tensor changes later
        for pushed, value in reads.due(step):
            assert step - pushed == 2
            seen[pushed] = value
    assert seen == {0: 0.0, 1: 1.0, 2: 3.0, 3: 6.0}
    assert reads.drain() == [(4, 10.0), (5, 15.0)] and reads.drain() == []


def test_lag_zero_reads_at_once_and_a_negative_lag_is_refused():
    reads = LaggedReads(lag=0)
    reads.push(7, torch.tensor(2.5))
    assert reads.due(7) == [(7, 2.5)]
    with pytest.raises(ValueError, match="lag must be >= 0"):
        LaggedReads(lag=-1)

