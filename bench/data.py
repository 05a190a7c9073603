"""Data benchmarks: the reader's samples/s from local files, HTTP and pipes, ldm's tar reader against webdataset's,
and the training-step time with cached latents vs on-the-fly VAE encoding, against which the reader must keep up.

1. Reader: samples/s of shard reading + PNG decoding + transforms + collation over full epochs of
   ``ShardDataModule``, with 0, 1 and 2 DataLoader workers (``shapes`` shards made in a temporary folder); then with
   0 workers over ``http://127.0.0.1`` (a server this script starts and stops) and ``pipe:cat``, as ratios to local.
   Tar parsing alone: members/s of ``ldm.data.shards._tar_members`` against webdataset's ``tar_file_iterator`` on
   the same shards (no decoding), alternated.
2. Training step: ms per step of the quickstart-size diffusion step (the tiny UNet, ``conf/unet/tiny.yaml``,
   forward + backward + AdamW, with noise, timesteps and the v/min-SNR loss of ``conf/diffusion/cosine_v.yaml``), fed
   either by the latent cache (``source=latents``, normalised by the VAE's ``normalize_latents``) or by image batches
   encoded on the fly by the quickstart VAE (``conf/autoencoder/tiny.yaml``); both include reading the batch.
   A fixed random context stands in for the text encoder in both. The two arms alternate step by step (so both see
   the same load on a shared machine); prints the median ms/step of each and their ratio.

The last line compares the reader (cached latents, the quickstart's source, 0 workers) with what the training step
consumes (batch / step time): it must stay >= 3x.

    python bench/data.py [--size 32] [--length 2000] [--batch-size 64] [--repeats 2] [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.data.cache_latents import cache_latents
from ldm.data.datamodule import POS_KEY, ShardDataModule
from ldm.data.make_shards import make_shards
from ldm.data.shards import _tar_members
from ldm.data.urls import serve_directory
from ldm.diffusion import DiffusionLoss, NoiseSchedule

CONF = Path(__file__).resolve().parents[1] / "conf"


def epoch_rate(dm: ShardDataModule, repeats: int) -> float:
    """Median samples/s over ``repeats`` full epochs (worker start-up, once per epoch, included)."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            n += len(batch["caption"])
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def tar_rates(shards: list[Path], repeats: int) -> tuple[float, float]:
    """Members/s of ldm's tar reader and of webdataset's ``tar_file_iterator`` over ``shards``, alternated; the
    medians over ``repeats`` passes each."""
    from webdataset.tariterators import tar_file_iterator

    def ours() -> int:
        return sum(1 for p in shards for _ in _tar_members(p))

    def theirs() -> int:
        n = 0
        for p in shards:
            with open(p, "rb") as f:
                n += sum(1 for _ in tar_file_iterator(f))
        return n

    rates: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("theirs", theirs)):
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return statistics.median(rates["ours"]), statistics.median(rates["theirs"])


def forever(dm: ShardDataModule) -> Iterable[dict]:
    """The training loader's batches, epoch after epoch."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    while True:
        yield from loader


class TrainStep:
    """The quickstart diffusion step on a fresh tiny UNet: read batch, latents, noise + loss, backward, AdamW."""

    def __init__(self, batches: Iterable[dict], latents: Callable[[dict], torch.Tensor], context: torch.Tensor):
        diffusion = OmegaConf.load(CONF / "diffusion" / "cosine_v.yaml")
        self.loss_fn = DiffusionLoss(NoiseSchedule.from_name(**diffusion.schedule), diffusion.prediction_type,
                                     diffusion.loss_weighting, diffusion.snr_gamma, diffusion.offset_noise)
        torch.manual_seed(0)
        self.unet = instantiate(OmegaConf.load(CONF / "unet" / "tiny.yaml"), context_dim=context.shape[-1]).train()
        self.opt = instantiate(OmegaConf.load(CONF / "optimizer" / "adamw.yaml"))(self.unet.parameters())
        self.generator = torch.Generator().manual_seed(0)
        self.batches, self.latents, self.context = iter(batches), latents, context
        self.times: list[float] = []

    def __call__(self, record: bool = True) -> None:
        t0 = time.perf_counter()
        batch = next(self.batches)
        batch.pop(POS_KEY, None)
        x0 = self.latents(batch)
        loss = self.loss_fn(lambda x, t, c: self.unet(x, t, c), x0, self.context[: x0.shape[0]],
                            generator=self.generator)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if record:
            self.times.append(time.perf_counter() - t0)

    def ms(self) -> float:
        """Median ms per recorded step."""
        return 1000 * statistics.median(self.times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--length", type=int, default=2000)
    p.add_argument("--maxcount", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20, help="timed training steps per arm (after 3 warm-up steps)")
    p.add_argument("--step-workers", type=int, default=0, help="DataLoader workers feeding the training steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the training steps")
    p.add_argument("--context", type=int, nargs=2, default=[24, 128], help="context length and width (scratch_tiny)")
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
        n = len(list(shards.glob("*.tar")))
        spec = f"{{{0:06d}..{n - 1:06d}}}.tar"
        with serve_directory(shards) as url:
            arms = {"local": str(shards), "http": f"{url}/{spec}", "pipe:cat": f"pipe:cat {shards}/{spec}"}
            rates: dict[str, list[float]] = {k: [] for k in arms}
            for _ in range(a.repeats):  # alternated, so each sees the same load
                for name, where in arms.items():
                    rates[name].append(epoch_rate(ShardDataModule(where, **kw), 1))
        local = statistics.median(rates["local"])
        for name in arms:
            rate = statistics.median(rates[name])
            print(f"reader, images, 0 workers, {name:8s}: {rate:8.0f} samples/s  ({rate / local:.2f} x local)")
        ours, theirs = tar_rates(sorted(shards.glob("*.tar")), max(3, a.repeats))
        print(f"tar parsing: ldm {ours:9.0f} members/s, webdataset tar_file_iterator {theirs:9.0f} members/s "
              f"(ldm/webdataset {ours / theirs:.2f})")

        torch.manual_seed(0)
        vae = instantiate(OmegaConf.load(CONF / "autoencoder" / "tiny.yaml")).eval().requires_grad_(False)
        t0 = time.perf_counter()
        cache_latents(shards, Path(tmp) / "latents", vae, image_size=a.size, batch_size=a.batch_size, log=None)
        print(f"cache_latents: {a.length} samples in {time.perf_counter() - t0:.1f} s")

        torch.set_num_threads(a.threads)
        context = torch.randn(a.batch_size, *a.context, generator=torch.Generator().manual_seed(0))
        skw = {**kw, "num_workers": a.step_workers}

        @torch.no_grad()
        def encoded(batch: dict) -> torch.Tensor:
            return vae.encode_latents(batch["image"])

        @torch.no_grad()
        def cached(batch: dict) -> torch.Tensor:
            return vae.normalize_latents(batch["latent"])

        # Interleave the two arms step by step, so that both see the same load on a shared machine.
        fly = TrainStep(forever(ShardDataModule(str(shards), **skw)), encoded, context)
        lat = TrainStep(forever(ShardDataModule(str(Path(tmp) / "latents"), source="latents", **skw)), cached, context)
        for i in range(3 + a.steps):
            for arm in (fly, lat) if i % 2 else (lat, fly):
                arm(record=i >= 3)
        print(f"train step, tiny UNet, batch {a.batch_size}, {a.threads} threads, {a.step_workers} workers "
              f"(median of {a.steps} interleaved steps):")
        print(f"  on-the-fly tiny-VAE encoding: {fly.ms():7.1f} ms/step")
        print(f"  cached latents:               {lat.ms():7.1f} ms/step  (x{fly.ms() / lat.ms():.2f} faster)")
        torch.set_num_threads(1)
        latent_rate = epoch_rate(ShardDataModule(str(Path(tmp) / "latents"), source="latents", **kw), a.repeats)
        consumed = a.batch_size / (lat.ms() / 1000)
        print(f"reader, cached latents, 0 workers: {latent_rate:8.0f} samples/s; the training step consumes "
              f"{consumed:6.0f} samples/s: the reader is {latent_rate / consumed:.1f}x faster (bar: >= 3x)")


if __name__ == "__main__":
    main()
