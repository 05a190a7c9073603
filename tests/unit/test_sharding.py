"""ldm.lightning.sharding on two forked gloo ranks: which ranks a shard-wise sum (the gradient norm's) runs over, and
what FSDP shards, and the EMA kept in shards."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, StateDictType

# imported here: the forked ranks inherit them
from ldm.lightning.sharding import CPUFSDPStrategy, frozen_modules, local_spans, shard_layout, sharded_sum
from ldm.nn.ema import EMA, ShardLayout
from tests.module_factory import diffusion_module
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
    """A training module's layout: a trainable part, a frozen part (the VAE), a part that trains in part (a text
    encoder with its token table fixed), and a part without parameters."""

    def __init__(self):
        super().__init__()
        self.unet = torch.nn.Linear(4, 4)
        self.first_stage = torch.nn.Linear(4, 2).requires_grad_(False)
        self.text = torch.nn.Sequential(torch.nn.Embedding(10, 4).requires_grad_(False), torch.nn.Linear(4, 4))
        self.ema = torch.nn.Module()
        self.ema.register_buffer("shadow", torch.zeros(4))


def _wrapped_rank(rank: int) -> dict:
    torch.manual_seed(0)
    stage = _Stage()
    strategy = CPUFSDPStrategy(parallel_devices=[torch.device("cpu")] * 2)
    wrapped = strategy._setup_model(stage)
    return {name: tuple(p.shape) for name, p in wrapped.module.named_parameters()}


def test_fsdp_leaves_the_frozen_parts_whole_and_shards_the_trainable_ones(tmp_path):
    stage = _Stage()
    assert frozen_modules(stage) == [stage.first_stage, stage.text[0]]  # the token table inside the text encoder too
    shapes = on_two_ranks(_wrapped_rank, tmp_path / "store")
    for rank in (0, 1):  # the frozen weights keep their shapes on every rank; the trainable ones are flat shards
        assert shapes[rank]["first_stage.weight"] == (2, 4) and shapes[rank]["first_stage.bias"] == (2,)
        assert shapes[rank]["text.0.weight"] == (10, 4)
        for name in ("unet.weight", "text.1.weight"):
            assert len(shapes[rank][name]) == 1
    for name in ("unet.weight", "text.1.weight"):  # 40 trainable elements, 20 on each rank
        assert shapes[0][name][0] + shapes[1][name][0] == 16
    assert shapes[0]["unet.weight"] == (16,) and shapes[1]["unet.weight"] == (0,)


class _Model(torch.nn.Module):
    """A UNet stand-in whose 46 elements split unevenly: the second layer's weight straddles the two shards."""

    def __init__(self):
        super().__init__()
        self.unet = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 7))
        self.first_stage = torch.nn.Linear(4, 2).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)


def _counted(layout: ShardLayout | None, calls: list[int]) -> ShardLayout | None:
    """``layout`` with its gathers counted in ``calls``."""
    if layout is None:
        return None

    def gather(value: torch.Tensor) -> list[torch.Tensor]:
        calls.append(value.numel())
        return layout.gather(value)

    return ShardLayout(layout.spans, layout.rank, gather)


def _sharded_ema_rank(rank: int, strategy: str, bucket_numel: int) -> dict:
    kwargs = {}
    if strategy == "HYBRID_SHARD":
        own = [dist.new_group([r]) for r in (0, 1)][rank]
        kwargs["process_group"] = (own, dist.new_group([0, 1]))
    torch.manual_seed(0)
    model = _Model()
    ema = EMA(model.unet, decay=0.75, warmup=False)
    root = FullyShardedDataParallel(model, sharding_strategy=ShardingStrategy[strategy], device_id=torch.device("cpu"),
                                    use_orig_params=True, ignored_states=[model.first_stage], **kwargs)
    unet = root.module.unet
    spans = local_spans(root, "unet.")
    views = {name: p.numel() for name, p in unet.named_parameters()}
    calls: list[int] = []
    layout = _counted(shard_layout(root, "unet."), calls)
    if layout is not None:  # None: nothing sharded
        ema.keep_shards(layout, bucket_numel)
    kept = sum(int(b.numel()) for name, b in ema.named_buffers() if name != "num_updates")
    with torch.no_grad():
        for p in unet.parameters():  # this rank's part of each parameter: its flat view
            p.add_(4.0)
    root(torch.ones(2, 5))  # a forward without its backward (a skipped step): SHARD_GRAD_OP leaves them gathered
    gathered = any(p.numel() != views[name] for name, p in unet.named_parameters())
    ema.update(unet)  # 0.75 x start + 0.25 x (start + 4): start + 1
    state = ema.state_dict()  # assembled: the full averages
    gathers = list(calls)
    fresh = EMA(_Model().unet, decay=0.75, warmup=False)  # other weights, loaded from the state dict
    if layout is not None:
        fresh.keep_shards(layout)
        fresh.keep_shards(layout)  # a second fit of the same module: the same shards kept
    fresh.load_state_dict(state)
    with FullyShardedDataParallel.summon_full_params(root, writeback=True):
        with ema.swapped_in(unet):
            inside = {name: p.detach().clone().tolist() for name, p in unet.named_parameters()}
        after = {name: p.detach().clone().tolist() for name, p in unet.named_parameters()}
    return {"spans": spans, "views": views, "kept": kept, "gathered": gathered, "gathers": gathers,
            "state": {k: v.tolist() for k, v in state.items()},
            "fresh": {k: v.tolist() for k, v in fresh.state_dict().items()}, "inside": inside, "after": after}


@pytest.mark.parametrize(("strategy", "bucket_numel", "gathers"), [
    # rank 0 holds 0.weight (15), 0.bias (3) and 6 of 1.weight's 21; rank 1 the other 15 and 1.bias (7)
    ("FULL_SHARD", 2**26, [24]),  # the 46 elements in one gather, of the larger part's size (24 against 22)
    ("FULL_SHARD", 1, [15, 3, 15, 7]),  # a parameter per gather
    ("FULL_SHARD", 18, [18, 15, 7]),  # a bucket closes at 18 elements: the first two parameters, then one each
    ("SHARD_GRAD_OP", 2**26, [24]),
    ("HYBRID_SHARD", 2**26, []),
])
def test_a_sharded_ema_keeps_its_shard_and_reads_as_the_whole_average(tmp_path, strategy, bucket_numel, gathers):
    """Each rank averages only its part of each parameter (FSDP's flat views, located by ``local_spans``, or its
    part of the gathered weights a forward without backward leaves); the state dict, a load into another sharded EMA
    and the swap into the full weights see the whole average, assembled with a gather per bucket of parameters.
    HYBRID_SHARD with two one-rank "nodes" is the case where FSDP shards nothing."""
    torch.manual_seed(0)
    start = {name: p.detach().clone() for name, p in _Model().unet.named_parameters()}
    out = on_two_ranks(_sharded_ema_rank, tmp_path / "store", strategy, bucket_numel)
    total = sum(p.numel() for p in start.values())
    for rank in (0, 1):
        r = out[rank]
        spans = r["spans"] or {n: (0, v.numel()) for n, v in start.items()}  # none: FSDP shards nothing
        assert r["views"] == {n: stop - begin for n, (begin, stop) in spans.items()}  # spans match the views
        for name, value in start.items():
            assert torch.allclose(torch.tensor(r["state"][name]), value + 1.0), (rank, name)
            assert r["fresh"][name] == r["state"][name]
            assert torch.allclose(torch.tensor(r["inside"][name]), value + 1.0)  # the averages swapped in
            assert torch.allclose(torch.tensor(r["after"][name]), value + 4.0)  # the trained weights back
        assert r["state"]["num_updates"] == 1
        assert r["gathers"] == gathers  # the state dict's gathers, and the size each rank sent
    assert out[0]["gathered"] == (strategy == "SHARD_GRAD_OP")  # the update read the gathered weights' part
    if strategy == "HYBRID_SHARD":  # each one-rank "node" holds everything (FSDP runs it as NO_SHARD)
        assert out[0]["kept"] == out[1]["kept"] == total
    else:  # the two ranks' parts tile each parameter
        assert out[0]["kept"] + out[1]["kept"] == total and 0 < out[0]["kept"] < total
        for name, value in start.items():
            (a0, b0), (a1, b1) = out[0]["spans"][name], out[1]["spans"][name]
            covered = set(range(a0, b0)) | set(range(a1, b1))
            assert covered == set(range(value.numel())) and not set(range(a0, b0)) & set(range(a1, b1))


@pytest.mark.parametrize("spans", [
    [{"weight": (0, 10), "bias": (0, 4)}, {"weight": (12, 16), "bias": (0, 0)}],  # elements 10 and 11 held by none
    [{"weight": (0, 10), "bias": (0, 4)}, {"weight": (8, 16), "bias": (0, 0)}],  # 8 and 9 held twice
])
def test_an_ema_refuses_shards_that_do_not_tile_a_parameter(spans):
    """Assembly writes every rank's part into an uninitialised tensor: a layout that leaves an element out (or holds
    one twice) is refused when the shards are kept, naming the parameter."""
    ema = EMA(torch.nn.Linear(4, 4))

    def gather(value: torch.Tensor) -> list[torch.Tensor]:
        raise AssertionError("nothing is gathered")

    with pytest.raises(ValueError, match="spans of weight .* do not cover its 16 elements once each"):
        ema.keep_shards(ShardLayout(spans, 0, gather))


def _stage_rank(rank: int) -> dict:
    torch.manual_seed(0)
    module = diffusion_module(torch.nn.Conv2d(4, 4, 3, padding=1), ema_decay=0.9)
    strategy = CPUFSDPStrategy(parallel_devices=[torch.device("cpu")] * 2)
    strategy.model = strategy._setup_model(module)
    module._trainer = SimpleNamespace(strategy=strategy)
    module.on_fit_start()  # Lightning calls it once the module is wrapped
    kept = sum(b.numel() for n, b in module.ema.named_buffers() if n != "num_updates")
    with FullyShardedDataParallel.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT):
        state = strategy.model.state_dict()
    return {"kept": kept, "ema": {k: v.tolist() for k, v in state.items() if k.startswith("ema.")}}


def test_the_ldm_stage_keeps_its_ema_in_shards_under_fsdp(tmp_path):
    """LatentDiffusionModule.on_fit_start shards its EMA like the UNet: each rank keeps half the averages, and the
    checkpoint's state dict still holds the whole ones."""
    torch.manual_seed(0)
    unet = torch.nn.Conv2d(4, 4, 3, padding=1)
    out = on_two_ranks(_stage_rank, tmp_path / "store")
    assert out[0]["kept"] + out[1]["kept"] == 148 and 0 < out[0]["kept"] < 148
    for rank in (0, 1):
        assert out[rank]["ema"]["ema.weight"] == unet.weight.tolist()
        assert out[rank]["ema"]["ema.bias"] == unet.bias.tolist()


def _nested_rank(rank: int) -> str:
    module = diffusion_module(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1)), ema_decay=0.9)
    strategy = CPUFSDPStrategy(parallel_devices=[torch.device("cpu")] * 2, auto_wrap_policy={torch.nn.Conv2d})
    strategy.model = strategy._setup_model(module)
    module._trainer = SimpleNamespace(strategy=strategy)
    try:
        module.on_fit_start()
    except ValueError as err:
        return str(err)
    return "no error"


def test_nested_fsdp_units_are_refused_when_the_fit_starts(tmp_path):
    """An auto_wrap_policy's units would free their weights after each forward inside the sampling's
    summon_full_params: refused with the setting to remove, before the first step."""
    out = on_two_ranks(_nested_rank, tmp_path / "store")
    assert out[0] == out[1] and "2 nested units" in out[0] and "remove trainer.strategy.auto_wrap_policy" in out[0]


def test_sharded_checkpoints_are_refused_before_training(tmp_path):
    """``state_dict_type=sharded`` writes each checkpoint as a folder, which resume=auto, sample.py and ldm.convert
    do not read: a requeued job would start again from step 0. Refused in the config check and by the strategy."""
    from hydra import compose, initialize_config_dir

    from ldm.errors import ConfigError
    from ldm.lightning.settings import check_run
    from ldm.lightning.sharding import FloatBuffersFSDPStrategy

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"out_dir={tmp_path}", "trainer=fsdp_cpu", "ldm_stage.cache_latents=false",
                                          "+trainer.strategy.state_dict_type=sharded"])
    said = r"state_dict_type='sharded': a sharded checkpoint is a folder .* Keep state_dict_type=full"
    with pytest.raises(ConfigError, match=said):
        check_run(cfg)
    with pytest.raises(ConfigError, match=said):
        FloatBuffersFSDPStrategy(state_dict_type="sharded")
    assert FloatBuffersFSDPStrategy(state_dict_type="full") is not None
