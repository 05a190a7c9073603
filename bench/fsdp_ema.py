"""The EMA update under FSDP: whole (every rank gathers the float32 UNet and updates a whole shadow) against sharded
(each rank updates its shard's part of the averages from its own shard views: ``EMA.keep_shards``).

Two gloo ranks on this machine (one thread each), a UNet of ``bench/unet.py``'s configs wrapped as Lightning wraps
the training module (one FSDP unit, ``use_orig_params=True``). The two updates alternate, ``--repeats`` times after
a warm-up; printed by rank 0: the median milliseconds of each, the ratio whole/sharded with its per-repeat range,
the shadow's bytes per rank, and the one-off cost of assembling the sharded averages for a checkpoint.

    python bench/fsdp_ema.py --config small --repeats 9

On GPUs the gather runs over NCCL and also makes the host wait for the GPU; this measures the CPU (gloo) case only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from alternate import alternated_times
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from unet import CONFIGS

from ldm.lightning.sharding import local_spans, sharded_sum
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
    params = sum(p.numel() for p in unet.parameters())  # before FSDP makes them this rank's shard views
    whole, sharded = EMA(unet, decay=0.999), EMA(unet, decay=0.999)
    root = FullyShardedDataParallel(_Stage(unet), device_id=torch.device("cpu"), use_orig_params=True)
    sharded.keep_shards(local_spans(root, "unet."), lambda t: sharded_sum(root, t))
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
    start = time.perf_counter()
    sharded.state_dict()
    assemble = time.perf_counter() - start
    if rank == 0:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratios = [w / s for w, s in zip(times["whole"], times["sharded"], strict=True)]
        print(f"{config} UNet, {params / 1e6:.1f} M parameters, 2 gloo ranks, {repeats} alternated repeats")
        print(f"EMA update: whole {med['whole']:.1f} ms, sharded {med['sharded']:.1f} ms; ratio whole/sharded "
              f"{med['whole'] / med['sharded']:.2f} ({min(ratios):.2f}..{max(ratios):.2f})")
        print(f"shadow per rank: whole {_shadow_bytes(whole) / 2**20:.1f} MiB, sharded "
              f"{_shadow_bytes(sharded) / 2**20:.1f} MiB")
        print(f"assembling the sharded averages for a checkpoint: {assemble * 1e3:.0f} ms (once per save)")
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
