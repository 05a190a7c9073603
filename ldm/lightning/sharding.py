"""Data parallelism for the training stages: gathering full weights under FSDP (the EMA and sampling read whole UNet
weights, which FSDP keeps sharded), and the strategies (DDP without the per-step buffer broadcast; FSDP with float32
buffers on GPUs, and a CPU variant for tests).

Outside its forward and backward, an FSDP-wrapped module (Lightning wraps the whole LightningModule, with
``use_orig_params=True``) holds each original parameter as a flat view of this rank's shard. Code that reads the
weights outside forward runs inside ``full_params(trainer)``: every rank then holds the full parameters (one
all-gather). Under any other strategy it is a no-op.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext

import lightning as L
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from ldm.errors import ConfigError
from ldm.lightning.settings import SHARDED_CHECKPOINTS
from ldm.nn.ema import ShardLayout


def is_fsdp(trainer: L.Trainer | None) -> bool:
    """Whether ``trainer`` trains with Lightning's FSDP strategy."""
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def full_params(trainer: L.Trainer | None, writeback: bool = False) -> AbstractContextManager:
    """A context in which every rank holds the full, unsharded parameters (FSDP), else a no-op.

    Every rank must enter it (it is a collective). Code that changes the weights inside it restores them itself
    (``EMA.swapped_in`` does): ``writeback=False`` discards changes only where the parameters are really sharded,
    not with one rank or ``NO_SHARD``. With ``writeback=True`` the changes reach each rank's shard (to run FSDP's own
    forward on other weights, e.g. the EMA's, and to restore them later the same way).
    """
    if not is_fsdp(trainer):
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=writeback)


def all_ranks(value: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """``value`` reduced over the ranks (``sum`` or ``max``; of ``group``, default all), left on its device. A bare
    all-reduce, not Lightning's ``strategy.reduce``, which puts a barrier first: that blocks the host until the GPU
    has run everything queued."""
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return value


def shard_sum(trainer: L.Trainer | None, value: torch.Tensor) -> torch.Tensor:
    """Sum ``value`` (e.g. squared gradient norms of this rank's shard) over the ranks that hold different shards
    under FSDP, else return it as it is. That is FSDP's sharding group: every rank under ``FULL_SHARD`` and
    ``SHARD_GRAD_OP``, one node's ranks under ``HYBRID_SHARD`` (the other nodes hold the same shards), none under
    ``NO_SHARD`` (every rank holds every gradient). A sum over all ranks would count replicated shards again."""
    if not is_fsdp(trainer):
        return value
    return sharded_sum(trainer.strategy.model, value)


def sharded_sum(root: torch.nn.Module, value: torch.Tensor) -> torch.Tensor:
    """``shard_sum`` for the FSDP-wrapped ``root``."""
    from torch.distributed.fsdp import ShardingStrategy

    if root.sharding_strategy == ShardingStrategy.NO_SHARD:
        return value
    return all_ranks(value, group=root.process_group)


def local_spans(root: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, int]]:
    """For each parameter whose name starts with ``prefix`` in the FSDP-wrapped ``root``, named without the prefix:
    the elements [start, stop) of the flattened parameter that this rank's shard holds ((0, 0): none). Empty under
    ``NO_SHARD``, where every rank holds everything.

    Outside forward and backward, FSDP (``use_orig_params=True``) keeps each parameter as a flat view of exactly
    these elements. torch has no public accessor for them: this reads each ``FlatParameter``'s ``_fqns`` and
    ``_shard_param_infos`` (FSDP1), which ``tests/unit/test_sharding.py`` checks against the views."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    if root.sharding_strategy == ShardingStrategy.NO_SHARD:
        return {}
    spans = {}
    for path, module in root.named_modules():
        flat = getattr(module, "_flat_param", None) if isinstance(module, FullyShardedDataParallel) else None
        if flat is None:
            continue
        base = clean_tensor_name(path)
        for fqn, info in zip(flat._fqns, flat._shard_param_infos, strict=True):
            name = f"{base}.{fqn}" if base else fqn
            if name.startswith(prefix):
                spans[name[len(prefix):]] = ((info.intra_param_start_idx, info.intra_param_end_idx + 1)
                                             if info.in_shard else (0, 0))
    return spans


def shard_layout(root: torch.nn.Module, prefix: str = "") -> ShardLayout | None:
    """The ``ShardLayout`` of the parameters under ``prefix`` in the FSDP-wrapped ``root`` (named without the
    prefix), over FSDP's sharding group: every rank's ``local_spans`` (exchanged once: a collective) and an
    all-gather over the group. None where nothing is sharded (``NO_SHARD``)."""
    import torch.distributed as dist

    spans = local_spans(root, prefix)
    if not spans:
        return None
    group = root.process_group
    every: list[dict[str, tuple[int, int]] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, spans, group=group)

    def gather(value: torch.Tensor) -> list[torch.Tensor]:
        received = [torch.empty_like(value) for _ in every]
        dist.all_gather(received, value, group=group)
        return received

    return ShardLayout([dict(s) for s in every], dist.get_rank(group), gather)


def refuse_nested_units(root: torch.nn.Module) -> None:
    """Raise if the FSDP-wrapped ``root`` holds FSDP units of its own (an ``auto_wrap_policy``). Sampling (the grid,
    ``generate``) runs the UNet inside ``summon_full_params``, where a nested ``FULL_SHARD`` unit frees its gathered
    weights again after its own forward, and the EMA's swap back would then meet shard views."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    nested = [name for name, m in root.named_modules() if name and isinstance(m, FullyShardedDataParallel)]
    if nested:
        raise ValueError(f"the ldm stage trains under FSDP as one unit, and this wrapping has {len(nested)} nested "
                         f"units (e.g. {nested[0]}): remove trainer.strategy.auto_wrap_policy")


def ddp_strategy(forward_sync_buffers: bool = False, **kwargs) -> DDPStrategy:
    """Lightning's DDP without the broadcast of every buffer from rank 0 before each forward (torch's
    ``forward_sync_buffers=False``; buffers are still synced once, when DDP wraps the model).

    The EMA's shadow weights are buffers: by default DDP would send a float32 copy of the UNet to every rank at every
    step, though each rank updates the EMA identically from the same all-reduced weights. torch before 2.13 has no
    such option (its ``broadcast_buffers=False`` also skips the first sync), so there the broadcast stays.
    """
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        kwargs["forward_sync_buffers"] = forward_sync_buffers
    return DDPStrategy(**kwargs)


def frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The largest submodules of ``model`` that have parameters, none of them trainable: what FSDP need not shard.
    A child that trains only in part is searched in turn, so a frozen part inside it counts too (the scratch text
    encoder's fixed token table, ``text_encoder.train_token_embedding=false``)."""
    frozen = []
    for child in model.children():
        params = list(child.parameters())
        trainable = sum(p.requires_grad for p in params)
        if params and not trainable:
            frozen.append(child)
        elif 0 < trainable < len(params):
            frozen += frozen_modules(child)
    return frozen


class FloatBuffersFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy, with buffers kept in their own dtype and gradients reduced in float32, and the
    frozen parts left out of the sharding.

    Under ``bf16-mixed`` Lightning asks FSDP to cast every buffer to bfloat16 at the first forward. The EMA shadows
    are buffers (so checkpoints hold them): in bfloat16 an update of (1 - decay) = 1e-4 of the difference is lost,
    and the float32 lerp refuses the mix of dtypes. The VAE's latent scale is a buffer too. Parameters still compute
    in the precision's dtype.

    The frozen parts of the wrapped module (``frozen_modules``: the VAE, a frozen text encoder, a fixed token table)
    are FSDP ``ignored_states``: every rank keeps them whole, as under DDP. In the one flat parameter Lightning's
    wrapping makes, they would be gathered for every forward and reduce-scattered with zero gradients after every
    backward (SD's VAE and CLIP text encoder: 207 M parameters against the UNet's 860 M). Set ``ignored_states`` (or
    ``ignored_modules``) yourself to choose otherwise.
    """

    def __init__(self, *args, state_dict_type: str = "full", **kwargs) -> None:
        if state_dict_type != "full":
            raise ConfigError(SHARDED_CHECKPOINTS.format(value=state_dict_type))
        super().__init__(*args, state_dict_type=state_dict_type, **kwargs)

    def _ignore_frozen(self, model: torch.nn.Module) -> None:
        """Put ``model``'s frozen parts in FSDP's ``ignored_states``, on the device (FSDP moves only what it
        manages)."""
        if "ignored_states" in self.kwargs or "ignored_modules" in self.kwargs:
            return
        frozen = frozen_modules(model)
        if frozen:
            for child in frozen:
                child.to(self.root_device)
            self.kwargs["ignored_states"] = frozen

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            self._ignore_frozen(model)
        return super()._setup_model(model)

    @property
    def mixed_precision_config(self):
        from torch.distributed.fsdp import MixedPrecision

        config = super().mixed_precision_config
        if config is None or self.mixed_precision:  # no mixed precision, or the user's own config
            return config
        return MixedPrecision(param_dtype=config.param_dtype, reduce_dtype=torch.float32, buffer_dtype=None)


class CPUFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision with a CPU autocast for the mixed precisions, as on GPUs: its own opens a CUDA
    autocast, which leaves CPU ops alone, so the frozen parts (float32, unsharded) and the UNet (FSDP's bf16
    parameters) would meet in different dtypes. Every step (training, validation, test, predict) runs in it."""

    def forward_context(self) -> AbstractContextManager:
        if "mixed" in self.precision:
            return torch.autocast("cpu", dtype=torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16)
        return super().forward_context()


class CPUFSDPStrategy(FloatBuffersFSDPStrategy):
    """Lightning's FSDP strategy on CPU processes (gloo), to exercise the sharded code paths without a GPU.

    Lightning refuses ``strategy="fsdp"`` with ``accelerator="cpu"`` (by name and exact class) and hands FSDP no
    device, which FSDP then rejects on a machine without an accelerator; torch's FSDP itself runs on CPU given
    ``device_id=cpu``. So the module is wrapped here, as Lightning would, and Lightning keeps the wrapped module.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            self._ignore_frozen(model)
            model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                             mixed_precision=self.mixed_precision_config,
                                             sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                             **self.kwargs)
        return super()._setup_model(model)

    def setup(self, trainer: L.Trainer) -> None:
        """Lightning's setup, with the precision plugin's forward context on the CPU (``CPUFSDPPrecision``)."""
        plugin = self.precision_plugin
        self.precision_plugin = CPUFSDPPrecision(plugin.precision, scaler=getattr(plugin, "scaler", None))
        super().setup(trainer)

    def optimizer_state(self, optimizer) -> dict:
        """Lightning's full optimizer state, gathered without ``offload_to_cpu``.

        With it, torch's gather returns, on CPU, views of one buffer that it reuses for each state: every ``exp_avg``
        then holds the ``exp_avg_sq`` values and a resumed run diverges (on GPUs the offload copies, so the bug does
        not show). On CPU there is nothing to offload, and without it torch clones each state.
        """
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        with FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                                  FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)):
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # keyed by parameter index, as Lightning stores it
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
        return state
