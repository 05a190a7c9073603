"""Latent / text-embedding cache end to end with stand-in encoders (no dependency on ldm.autoencoder)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ldm.data.cache_latents import cache_latents, main
from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import make_shards
from ldm.data.shards import iter_shard, read_index
from ldm.data.transforms import decode_image, load_npy, to_tensor


class TinyVAE(nn.Module):
    """A strided conv whose output halves are the posterior mean and log-variance (f=4, 2 channels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 4, stride=4)

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        mean, logvar = self.conv(x).chunk(2, dim=1)
        return SimpleNamespace(mean=mean, std=torch.exp(0.5 * logvar.clamp(-6, 2)))


class TinyText:
    """Caption length and character codes as 'embeddings'."""

    def encode(self, prompts: list[str]):
        hidden = torch.zeros(len(prompts), 6, 3)
        for i, p in enumerate(prompts):
            hidden[i, :, 0] = torch.tensor([ord(c) for c in p[:6]], dtype=torch.float32)
        pooled = torch.tensor([[float(len(p))] for p in prompts])
        mask = torch.ones(len(prompts), 6, dtype=torch.bool)
        return hidden, pooled, mask


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    make_shards("shapes", root / "img", maxcount=8, length=20, log=None)
    index = cache_latents(root / "img", root / "lat", TinyVAE(), TinyText(), image_size=32, batch_size=6, log=None)
    return root, index


def test_cache_contents(cached):
    root, index = cached
    assert index["total"] == 20 and index["latents"]["shape"] == [2, 8, 8] and index["latents"]["text"]
    raw = next(iter_shard(root / "lat" / "000000.tar"))
    img = next(iter_shard(root / "img" / "000000.tar"))
    assert raw["__key__"] == img["__key__"] and raw["txt"] == img["txt"] and raw["json"] == img["json"]
    with torch.no_grad():
        expected = TinyVAE().encode(to_tensor(decode_image(img["png"]))[None]).mean[0]
    assert torch.allclose(torch.from_numpy(load_npy(raw["latent_mean.npy"])), expected, atol=1e-6)
    assert load_npy(raw["text_hidden.npy"]).shape == (6, 3)
    assert float(load_npy(raw["text_pooled.npy"])[0]) == len(raw["txt"].decode())


def test_rerun_skips_complete_shards(cached):
    root, _ = cached
    before = (root / "lat" / "000001.tar").stat().st_mtime_ns
    (root / "lat" / "000002.tar").unlink()
    index = cache_latents(root / "img", root / "lat", TinyVAE(), image_size=32, log=None)
    assert (root / "lat" / "000001.tar").stat().st_mtime_ns == before and index["total"] == 20


def test_reader_yields_latents(cached):
    root, _ = cached
    kw = {"batch_size": 5, "source": "latents", "shuffle_shards": False, "shuffle_buffer": 0}
    dm = ShardDataModule(str(root / "lat"), sample_latents=False, **kw)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (5, 2, 8, 8) and "image" not in batch
    assert batch["text_hidden"].shape == (5, 6, 3) and batch["text_mask"].dtype == torch.bool
    mean = torch.from_numpy(load_npy(next(iter_shard(root / "lat" / "000000.tar"))["latent_mean.npy"]))
    assert torch.equal(batch["latent"][0], mean)
    sampled = ShardDataModule(str(root / "lat"), **kw)
    sampled.setup("fit")
    b1 = next(iter(sampled.train_dataloader()))
    again = ShardDataModule(str(root / "lat"), **kw)
    again.setup("fit")
    b2 = next(iter(again.train_dataloader()))
    assert not torch.equal(b1["latent"], batch["latent"]) and torch.equal(b1["latent"], b2["latent"])
    assert b1["caption"] == batch["caption"]
    assert read_index(root / "lat")["latents"]["dtype"] == "float32"


def test_cli_needs_config(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "o")])  # --vae is required
