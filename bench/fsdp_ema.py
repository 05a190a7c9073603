"""The EMA update under FSDP: whole (every rank gathers the float32 UNet and updates a whole shadow) against sharded
(each rank updates its shard's part of the averages from its own shard views: ``EMA.keep_shards``).

Two gloo ranks on this machine (one thread each), a UNet of ``bench/unet.py``'s configs wrapped as Lightning wraps
the training module (one FSDP unit, ``use_orig_params=True``). The two updates alternate, ``--repeats`` times after
a warm-up; printed by rank 0: the median milliseconds of each, the ratio whole/sharded with its per-repeat range,
the shadow's bytes per rank. Then the assembly of the sharded averages for a checkpoint (the state dict), bucketed
(``ldm.nn.ema.ASSEMBLY_BUCKET_NUMEL`` elements per all-gather) against one all-gather per parameter, alternated.

    python bench/fsdp_ema.py --config small --repeats 9

On GPUs the gather runs over NCCL and also makes the host wait for the GPU; this measures the CPU (gloo) case only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from alternate import alternated_times
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from unet import CONFIGS

from ldm.lightning.sharding import shard_layout
from ldm.nn.ema import EMA
from ldm.unet import UNet


class _Stage(nn.Module):
    """The training module's layout: the UNet under ``unet.``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet


def _shadow_bytes(ema: EMA) -> int:
    return sum(b.numel() * b.element_size() for n, b in ema.named_buffers() if n != "num_updates")


def _rank(rank: int, store: str, config: str, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    cfg = dict(CONFIGS[config])
    cfg.pop("latent")
    torch.manual_seed(0)
    unet = UNet(**cfg)
    tensors = len(list(unet.parameters()))
    params = sum(p.numel() for p in unet.parameters())  # before FSDP makes them this rank's shard views
    whole, sharded, per_param = EMA(unet, decay=0.999), EMA(unet, decay=0.999), EMA(unet, decay=0.999)
    root = FullyShardedDataParallel(_Stage(unet), device_id=torch.device("cpu"), use_orig_params=True)
    layout = shard_layout(root, "unet.")
    sharded.keep_shards(layout)
    per_param.keep_shards(layout, bucket_numel=1)  # a bucket closes after each parameter
    model = root.module.unet

    def update_whole() -> None:
        with FullyShardedDataParallel.summon_full_params(root):
            whole.update(model)
        dist.barrier()

    def update_sharded() -> None:
        sharded.update(model)
        dist.barrier()

    update_whole(), update_sharded()  # warm-up
    times = alternated_times({"whole": update_whole, "sharded": update_sharded}, repeats)
    sharded.state_dict(), per_param.state_dict()  # warm-up
    saves = alternated_times({"bucketed": sharded.state_dict, "per parameter": per_param.state_dict},
                             max(3, repeats // 2))
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratios = [w / s for w, s in zip(times["whole"], times["sharded"], strict=True)]
        print(f"{config} UNet, {params / 1e6:.1f} M parameters, 2 gloo ranks, {repeats} alternated repeats")
        print(f"EMA update: whole {med['whole']:.1f} ms, sharded {med['sharded']:.1f} ms; ratio whole/sharded "
              f"{med['whole'] / med['sharded']:.2f} ({min(ratios):.2f}..{max(ratios):.2f})")
        print(f"shadow per rank: whole {_shadow_bytes(whole) / 2**20:.1f} MiB, sharded "
              f"{_shadow_bytes(sharded) / 2**20:.1f} MiB")
        save = {k: statistics.median(v) * 1e3 for k, v in saves.items()}
        ratios = [p / b for b, p in zip(saves["bucketed"], saves["per parameter"], strict=True)]
        print(f"assembling the averages for a checkpoint ({len(saves['bucketed'])} alternated repeats): bucketed "
              f"{save['bucketed']:.0f} ms, one all-gather per parameter ({tensors} tensors) "
              f"{save['per parameter']:.0f} ms; ratio {save['per parameter'] / save['bucketed']:.2f} "
              f"({min(ratios):.2f}..{max(ratios):.2f})")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        mp.spawn(_rank, args=(os.path.join(tmp, "store"), args.config, args.repeats), nprocs=2)


if __name__ == "__main__":
    main()
