"""ldm.lightning.sharding on two forked gloo ranks: which ranks a shard-wise sum (the gradient norm's) runs over, and
what FSDP shards."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from ldm.lightning.sharding import CPUFSDPStrategy, frozen_children, sharded_sum  # the forked ranks inherit them
from tests.two_ranks import on_two_ranks


def _sharded_sum_rank(rank: int, strategy: str) -> float:
    kwargs = {}
    if strategy == "HYBRID_SHARD":  # two one-rank "nodes": each shards over itself and replicates over the other
        own = [dist.new_group([r]) for r in (0, 1)][rank]  # every rank creates every group, in the same order
        kwargs["process_group"] = (own, dist.new_group([0, 1]))
    torch.manual_seed(0)
    root = FullyShardedDataParallel(torch.nn.Linear(4, 4), sharding_strategy=ShardingStrategy[strategy],
                                    device_id=torch.device("cpu"), use_orig_params=True, **kwargs)
    return float(sharded_sum(root, torch.tensor(rank + 1.0)))


@pytest.mark.parametrize(("strategy", "expected"), [
    ("FULL_SHARD", {0: 3.0, 1: 3.0}),      # each rank holds half: the two halves add up
    ("SHARD_GRAD_OP", {0: 3.0, 1: 3.0}),
    ("NO_SHARD", {0: 1.0, 1: 2.0}),        # each rank holds everything: a sum would double-count
    ("HYBRID_SHARD", {0: 1.0, 1: 2.0}),    # each node holds everything: summed within a node only
])
def test_a_shard_sum_runs_over_the_ranks_holding_different_shards(tmp_path, strategy, expected):
    assert on_two_ranks(_sharded_sum_rank, tmp_path / "store", strategy) == expected


class _Stage(torch.nn.Module):
    """A training module's layout: a trainable part, a frozen part (the VAE), and a part without parameters."""

    def __init__(self):
        super().__init__()
        self.unet = torch.nn.Linear(4, 4)
        self.first_stage = torch.nn.Linear(4, 2).requires_grad_(False)
        self.ema = torch.nn.Module()
        self.ema.register_buffer("shadow", torch.zeros(4))


def _wrapped_rank(rank: int) -> dict:
    torch.manual_seed(0)
    stage = _Stage()
    strategy = CPUFSDPStrategy(parallel_devices=[torch.device("cpu")] * 2)
    wrapped = strategy._setup_model(stage)
    return {name: tuple(p.shape) for name, p in wrapped.module.named_parameters()}


def test_fsdp_leaves_the_frozen_parts_whole_and_shards_the_trainable_ones(tmp_path):
    assert [type(m).__name__ for m in frozen_children(_Stage())] == ["Linear"]  # first_stage only
    shapes = on_two_ranks(_wrapped_rank, tmp_path / "store")
    for rank in (0, 1):  # the frozen weights keep their shapes on every rank; the trainable ones are flat shards
        assert shapes[rank]["first_stage.weight"] == (2, 4) and shapes[rank]["first_stage.bias"] == (2,)
        assert len(shapes[rank]["unet.weight"]) == 1 and shapes[rank]["unet.weight"] != (16,)
