"""Reader throughput: samples/s of shard reading + PNG decoding + transforms, with 0, 1 and 2 DataLoader workers.

Makes ``shapes`` shards in a temporary folder, then times full epochs of ``ShardDataModule``. With
``ldm.autoencoder`` importable it also compares training input from cached latents (``source=latents``) against
encoding images on the fly with the tiny VAE (``conf/autoencoder/tiny.yaml``), the ratio that mosaicml reports as
about 1.4x at SD scale.

    python bench/data.py [--size 32] [--length 2000] [--batch-size 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import make_shards


def epoch_rate(dm: ShardDataModule, repeats: int, step=None) -> float:
    """Median samples/s over ``repeats`` full epochs (the first, which starts workers, included in each)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            if step is not None:
                step(batch)
            n += len(batch["caption"])
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--length", type=int, default=2000)
    p.add_argument("--maxcount", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shapes"
        t0 = time.perf_counter()
        make_shards("shapes", shards, maxcount=a.maxcount, length=a.length, size=a.size, log=None)
        print(f"make_shards: {a.length} shapes images at {a.size} px in {time.perf_counter() - t0:.1f} s")
        kw = {"batch_size": a.batch_size, "image_size": a.size, "shuffle_buffer": 1000}
        for nw in a.workers:
            rate = epoch_rate(ShardDataModule(str(shards), num_workers=nw, **kw), a.repeats)
            print(f"reader, images, {nw} workers: {rate:8.0f} samples/s")
        try:
            from hydra.utils import instantiate
            from omegaconf import OmegaConf

            from ldm.data.cache_latents import cache_latents

            conf = Path(__file__).resolve().parents[1] / "conf" / "autoencoder" / "tiny.yaml"
            vae = instantiate(OmegaConf.load(conf)).eval()
        except Exception as err:  # the VAE is optional here
            print(f"cached-vs-on-the-fly skipped: no tiny VAE ({type(err).__name__}: {err})")
            return
        t0 = time.perf_counter()
        cache_latents(shards, Path(tmp) / "latents", vae, image_size=a.size, batch_size=a.batch_size, log=None)
        print(f"cache_latents: {a.length} samples in {time.perf_counter() - t0:.1f} s")

        @torch.no_grad()
        def encode(batch: dict) -> None:
            vae.encode(batch["image"]).sample()

        nw = max(a.workers)
        fly = epoch_rate(ShardDataModule(str(shards), num_workers=nw, **kw), a.repeats, encode)
        cached = epoch_rate(ShardDataModule(str(Path(tmp) / "latents"), num_workers=nw, source="latents", **kw),
                            a.repeats)
        print(f"on-the-fly tiny-VAE encode, {nw} workers: {fly:8.0f} samples/s")
        print(f"cached latents, {nw} workers:            {cached:8.0f} samples/s  (x{cached / fly:.1f})")


if __name__ == "__main__":
    main()
