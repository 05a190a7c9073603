"""Latent / text-embedding cache: stand-in encoders for the format, then a real AutoencoderKL end to end (make_shards
-> vae.ckpt -> the cache_latents CLI -> LatentDiffusionModule training from the cache), cached text embeddings in
training_step, and train.py's refusals for a latent source."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ldm.checkpoint import load_autoencoder
from ldm.data.cache_latents import cache_latents, main
from ldm.data.datamodule import ShardDataModule
from ldm.data.make_shards import make_shards
from ldm.data.shards import iter_shard, read_index
from ldm.data.transforms import decode_image, load_npy, to_tensor
from ldm.errors import ConfigError
from ldm.lightning import stages
from ldm.lightning.settings import check_cache_run, check_run


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
        posterior = TinyVAE().encode(to_tensor(decode_image(img["png"]))[None])
    assert torch.allclose(torch.from_numpy(load_npy(raw["latent_mean.npy"])), posterior.mean[0], atol=1e-6)
    assert torch.allclose(torch.from_numpy(load_npy(raw["latent_std.npy"])), posterior.std[0], atol=1e-6)
    assert load_npy(raw["text_hidden.npy"]).shape == (6, 3)
    assert float(load_npy(raw["text_pooled.npy"])[0]) == len(raw["txt"].decode())


def test_rerun_skips_complete_shards(cached):
    root, _ = cached
    before = (root / "lat" / "000001.tar").stat().st_mtime_ns
    (root / "lat" / "000002.tar").unlink()
    with pytest.raises(ConfigError, match=r"other settings \(text True -> False\)"):  # shards without text embeddings
        cache_latents(root / "img", root / "lat", TinyVAE(), image_size=32, log=None)
    index = cache_latents(root / "img", root / "lat", TinyVAE(), TinyText(), image_size=32, log=None)
    assert (root / "lat" / "000001.tar").stat().st_mtime_ns == before and index["total"] == 20
    assert "text_hidden.npy" in next(iter_shard(root / "lat" / "000002.tar"))


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


def _tiny_images(tmp_path: Path, n: int = 20) -> tuple[Path, torch.Tensor]:
    """``n`` shapes images of 32 px as shards, and the same images as the cache's encoder gets them, in key order."""
    make_shards("shapes", tmp_path / "img", maxcount=8, length=n, log=None)
    images = [to_tensor(decode_image(r["png"])) for p in sorted((tmp_path / "img").glob("*.tar"))
              for r in iter_shard(p)]
    return tmp_path / "img", torch.stack(images)


def _cached_means(folder: Path) -> torch.Tensor:
    return torch.stack([torch.from_numpy(load_npy(r["latent_mean.npy"])) for p in sorted(folder.glob("*.tar"))
                        for r in iter_shard(p)])


def test_the_encoders_run_in_the_chosen_precision(tmp_path):
    """precision=bfloat16: the VAE (and a frozen text encoder) run under bf16 autocast, as a bf16-mixed training
    run encodes images without the cache; the latents are the bf16 forward's, not float32's, stored as float32."""
    shards, x = _tiny_images(tmp_path)
    vae = TinyVAE()
    seen: list[torch.dtype] = []

    class RecordingText(TinyText):
        def encode(self, prompts):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
            return super().encode(prompts)

    index = cache_latents(shards, tmp_path / "bf16", vae, RecordingText(), image_size=32, batch_size=6, log=None,
                          precision="bfloat16")
    assert index["latents"]["precision"] == "bfloat16" and index["latents"]["dtype"] == "float32"
    assert seen and set(seen) == {torch.bfloat16}
    got = _cached_means(tmp_path / "bf16")
    with torch.no_grad():
        fp32 = vae.encode(x).mean
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = vae.encode(x).mean.float()
    torch.testing.assert_close(got, bf16, atol=0, rtol=0)
    assert (got - fp32).abs().max() > 1e-3  # not the float32 forward
    with pytest.raises(ConfigError, match="--precision must be one of float32, bfloat16, float16, got 'fp8'"):
        cache_latents(shards, tmp_path / "x", vae, image_size=32, log=None, precision="fp8")
    assert not (tmp_path / "x").exists()


def test_a_compiled_encoder_caches_the_same_latents(tmp_path, monkeypatch):
    """compile=True: the encoder runs through torch.compile (graphs were compiled) and the latents equal eager's."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    shards, _ = _tiny_images(tmp_path)
    torch._dynamo.reset()
    counters.clear()
    try:
        cache_latents(shards, tmp_path / "compiled", TinyVAE(), image_size=32, batch_size=6, log=None, compile=True)
        assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
    cache_latents(shards, tmp_path / "eager", TinyVAE(), image_size=32, batch_size=6, log=None)
    torch.testing.assert_close(_cached_means(tmp_path / "compiled"), _cached_means(tmp_path / "eager"),
                               atol=1e-5, rtol=1e-5)


def test_a_folder_cached_with_other_settings_is_refused_not_mixed(tmp_path):
    """A rerun into a folder skips the shards already there: with another precision, stored dtype, size or VAE
    they would be mixed with new ones, so it is refused, naming what changed. Shards cached before the settings
    were recorded count as float32 with their index's dtype and size."""
    shards, _ = _tiny_images(tmp_path)
    out = tmp_path / "lat"
    cache_latents(shards, out, TinyVAE(), image_size=32, log=None)
    (out / "000001.tar").unlink()
    with pytest.raises(ConfigError, match=r"other settings \(precision 'float32' -> 'bfloat16'\).*another folder"):
        cache_latents(shards, out, TinyVAE(), image_size=32, log=None, precision="bfloat16")
    other = TinyVAE()
    with torch.no_grad():
        other.conv.weight.add_(1.0)
    with pytest.raises(ConfigError, match=r"other settings \(vae '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        cache_latents(shards, out, other, image_size=32, log=None)
    with pytest.raises(ConfigError, match=r"dtype 'float32' -> 'float16', image_size 32 -> 16"):
        cache_latents(shards, out, TinyVAE(), image_size=16, dtype="float16", log=None)
    assert not (out / "000001.tar").exists()  # nothing was written by the refused runs
    assert cache_latents(shards, out, TinyVAE(), image_size=32, log=None)["total"] == 20  # same settings: resumes

    (out / "cache_settings.json").unlink()  # as a cache written before the settings were recorded
    with pytest.raises(ConfigError, match=r"precision 'float32' -> 'bfloat16'"):
        cache_latents(shards, out, TinyVAE(), image_size=32, log=None, precision="bfloat16")
    cache_latents(shards, out, TinyVAE(), image_size=32, log=None)  # float32 at its size: adopted
    assert json.loads((out / "cache_settings.json").read_text())["precision"] == "float32"


class FrozenText(nn.Module):
    """A frozen text encoder whose embeddings are its one weight."""

    frozen = True

    def __init__(self, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((1,), value))

    def encode(self, prompts: list[str]):
        n = len(prompts)
        return (torch.full((n, 4, 3), float(self.w)), torch.full((n, 3), float(self.w)),
                torch.ones(n, 4, dtype=torch.bool))


def test_a_folder_cached_with_another_text_encoder_is_refused_not_mixed(tmp_path):
    shards, _ = _tiny_images(tmp_path)
    out = tmp_path / "lat"
    cache_latents(shards, out, TinyVAE(), FrozenText(1.0), image_size=32, log=None)
    (out / "000001.tar").unlink()
    with pytest.raises(ConfigError, match=r"other settings \(text_encoder '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        cache_latents(shards, out, TinyVAE(), FrozenText(2.0), image_size=32, log=None)
    assert cache_latents(shards, out, TinyVAE(), FrozenText(1.0), image_size=32, log=None)["total"] == 20


def test_shards_of_several_folders_with_the_same_names_are_all_cached(tmp_path):
    """``{a,b}/{000000..000001}.tar``: each input shard gets its own latent shard, none taken for another's."""
    for folder, seed in (("a", 1), ("b", 2)):
        make_shards("shapes", tmp_path / folder, maxcount=4, length=8, size=16, seed=seed, log=None)
    spec = [str(tmp_path / folder / "{000000..000001}.tar") for folder in ("a", "b")]
    index = cache_latents(spec, tmp_path / "lat", TinyVAE(), image_size=16, log=None)
    names = [s["name"] for s in index["shards"]]
    assert len(set(names)) == 4 and index["total"] == 16
    captions = sorted(r["txt"] for folder in ("a", "b") for shard in ("000000", "000001")
                      for r in iter_shard(tmp_path / folder / f"{shard}.tar"))
    assert sorted(r["txt"] for name in names for r in iter_shard(tmp_path / "lat" / name)) == captions
    again = cache_latents(spec, tmp_path / "lat", TinyVAE(), image_size=16, log=None)  # a rerun reuses them all
    assert [s["name"] for s in again["shards"]] == names and again["total"] == 16


def test_cli_needs_config(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "o")])  # --vae is required


def test_cli_precision_and_compile(tmp_path, monkeypatch, capsys):
    """--precision and --compile reach the encoder; a precision it does not know exits with 2."""
    import ldm.data.cache_latents as cache_module
    from ldm.autoencoder import AutoencoderKL
    from ldm.checkpoint import atomic_torch_save, module_spec

    compiled: list = []  # the compile itself is tested above; here, that --compile asks for it
    monkeypatch.setattr(cache_module, "compile_function", lambda fn: compiled.append(fn) or fn)
    make_shards("shapes", tmp_path / "img", maxcount=4, length=4, size=16, log=None)
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    atomic_torch_save({"kind": "autoencoder", "spec": module_spec(vae), "state_dict": vae.state_dict(),
                       "latent_scale": 1.0, "config": {}}, tmp_path / "vae.ckpt")
    args = [str(tmp_path / "img"), str(tmp_path / "lat"), "--vae", str(tmp_path / "vae.ckpt"), "--size", "16",
            "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--precision", "fp8"])
    assert exit_.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    assert main([*args, "--precision", "bfloat16", "--compile"]) == 0 and len(compiled) == 1
    assert read_index(tmp_path / "lat")["latents"]["precision"] == "bfloat16"
    x = torch.stack([to_tensor(decode_image(r["png"])) for r in iter_shard(tmp_path / "img" / "000000.tar")])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = vae.encode(x).mean.float()
    torch.testing.assert_close(_cached_means(tmp_path / "lat"), expected, atol=3e-2, rtol=3e-2)
    with torch.no_grad():
        assert (_cached_means(tmp_path / "lat") - vae.encode(x).mean).abs().max() > 1e-4  # not float32's


def test_trainable_text_encoder_is_not_cached(tmp_path):
    make_shards("shapes", tmp_path / "img", maxcount=4, length=4, size=16, log=None)
    text = TinyText()
    text.frozen = False
    with pytest.warns(UserWarning, match="not caching text embeddings"):
        index = cache_latents(tmp_path / "img", tmp_path / "lat", TinyVAE(), text, image_size=16, log=None)
    assert index["latents"]["text"] is False
    raw = next(iter_shard(tmp_path / "lat" / "000000.tar"))
    assert "latent_mean.npy" in raw and not any(k.startswith("text_") for k in raw)


# ------------------------------------------------------------------------- the real models

ROOT = Path(__file__).resolve().parents[2]


def _unet(context_dim: int):
    from ldm.unet import UNet

    torch.manual_seed(1)
    return UNet(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(1, 2), num_heads=2, context_dim=context_dim)


def _text_encoder():
    from ldm.text import ScratchTextEncoder

    torch.manual_seed(2)
    return ScratchTextEncoder(width=32, layers=1, heads=2, context_length=16, frozen=True)


def _trainer(steps: int, tmp_path: Path, callbacks=()) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=list(callbacks))


def test_cache_end_to_end_with_a_real_vae(tmp_path):
    """make_shards -> a vae.ckpt as train.py writes it -> the cache_latents CLI -> training from the cache."""
    from ldm.autoencoder import AutoencoderKL
    from ldm.checkpoint import atomic_torch_save, module_spec
    from tests.module_factory import diffusion_module

    make_shards("shapes", tmp_path / "img", maxcount=4, length=8, size=16, log=None)
    torch.manual_seed(0)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, scale_factor=0.7,
                        shift_factor=0.1)  # a non-trivial normalisation, to see who applies it
    atomic_torch_save({"kind": "autoencoder", "spec": module_spec(vae), "state_dict": vae.state_dict(),
                       "latent_scale": 0.7, "config": {}}, tmp_path / "vae.ckpt")  # train.py's train_vae format
    text = _text_encoder()
    torch.save(text.state_dict(), tmp_path / "text.pt")
    (tmp_path / "text.yaml").write_text("_target_: ldm.text.ScratchTextEncoder\nwidth: 32\nlayers: 1\nheads: 2\n"
                                        "context_length: 16\nfrozen: true\n")
    assert main([str(tmp_path / "img"), str(tmp_path / "lat"), "--vae", str(tmp_path / "vae.ckpt"), "--size", "16",
                 "--text-encoder-config", str(tmp_path / "text.yaml"), "--text-encoder", str(tmp_path / "text.pt"),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    index = read_index(tmp_path / "lat")
    assert index["total"] == 8 and index["latents"]["shape"] == [4, 8, 8] and index["latents"]["text"]

    first_stage = load_autoencoder(tmp_path / "vae.ckpt")  # what the ldm stage loads from vae_ckpt
    module = diffusion_module(_unet(32), text, first_stage, schedule={"schedule": "cosine"},
                                   caption_dropout=0.0, ema_decay=None, max_steps=3)
    seen: list[tuple[list[str], torch.Tensor, bool]] = []
    latents_of = module.latents_of

    def recording(batch: dict) -> torch.Tensor:
        z = latents_of(batch)
        seen.append((list(batch["key"]), z.detach().clone(), "text_hidden" in batch))
        return z

    module.latents_of = recording
    before = [p.detach().clone() for p in module.unet.parameters()]
    dm = ShardDataModule(str(tmp_path / "lat"), source="latents", sample_latents=False, batch_size=4,
                         shuffle_buffer=0)
    _trainer(3, tmp_path).fit(module, datamodule=dm)
    assert len(seen) == 3 and all(has_text for _, _, has_text in seen)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.unet.parameters(), strict=True))

    images = {s["__key__"]: s["png"] for p in ("000000.tar", "000001.tar") for s in iter_shard(tmp_path / "img" / p)}
    with torch.no_grad():
        for keys, z, _ in seen:
            x = torch.stack([to_tensor(decode_image(images[k])) for k in keys])
            expected = vae.normalize_latents(vae.encode(x).mean)
            assert torch.allclose(z, expected, atol=1e-5), keys
            assert not torch.allclose(z, vae.encode(x).mean, atol=1e-2)  # the scale and shift were applied


def test_cached_text_embedding_gives_the_same_loss_as_captions():
    """A frozen encoder's cached embeddings (dropped rows -> its null embedding) train exactly like the captions."""
    from ldm.text.conditioner import drop_captions
    from tests.module_factory import diffusion_module

    captions = ["a red circle in the top left", "a blue square in the center", "a white triangle in the center",
                "a green circle in the bottom right", "a purple square in the top right", "a red square"]
    p = 0.5
    dropped = drop_captions(captions, p, torch.Generator().manual_seed(7))
    assert "" in dropped and any(dropped)  # this seed drops some rows and keeps others
    text = _text_encoder()
    hidden = text.encode(captions).hidden.detach()
    latent = torch.randn(len(captions), 4, 8, 8, generator=torch.Generator().manual_seed(3))
    raw_batch = {"latent": latent, "caption": captions}
    cached_batch = {**raw_batch, "text_hidden": hidden}  # as cache_latents stores it (float32)
    losses, contexts = [], []
    for batch in (raw_batch, cached_batch):
        module = diffusion_module(_unet(32), text, None, schedule={"schedule": "cosine"},
                                       prediction_type="v_prediction", caption_dropout=p, ema_decay=None)
        module.generator.manual_seed(7)
        context = module.text_context(batch)
        loss = module.loss_fn(module.denoise, latent, context, generator=module.generator)
        contexts.append(context)
        losses.append(loss)
    null = text.encode([""]).hidden[0]
    for i, caption in enumerate(dropped):
        torch.testing.assert_close(contexts[1][i], null if caption == "" else hidden[i])
    torch.testing.assert_close(contexts[0], contexts[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)


def test_training_step_uses_the_cache_only_for_a_frozen_encoder(tmp_path):
    """Through Lightning: with the cache, a frozen encoder is not run on the captions; a trainable one is."""
    from tests.module_factory import diffusion_module

    captions = ["a red circle in the top left", "a blue square in the center"]
    for frozen in (True, False):
        text = _text_encoder()
        text.frozen = frozen
        batch = {"latent": torch.randn(2, 4, 8, 8), "caption": captions,
                 "text_hidden": text.encode(captions).hidden.detach()}
        calls: list[list[str]] = []
        encode = text.encode
        text.encode = lambda prompts, encode=encode, calls=calls: calls.append(list(prompts)) or encode(prompts)
        module = diffusion_module(_unet(32), text, None, schedule={"schedule": "cosine"}, caption_dropout=0.5,
                                       ema_decay=None, max_steps=2)
        _trainer(2, tmp_path).fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))
        if frozen:
            assert all(c == [""] for c in calls)  # at most the null embedding, never the captions
        else:
            assert len(calls) == 2 and all(len(c) == 2 for c in calls)


def _compose(tmp_path: Path, *overrides: str, cache_latents: bool = False):
    """The quickstart on a latent cache (docs/data.md: the quickstart's own caching off)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"out_dir={tmp_path / 'out'}", "data=shapes_latents",
                                           f"data.train_shards={tmp_path / 'lat'}",
                                           f"ldm_stage.cache_latents={str(cache_latents).lower()}", *overrides])


def test_train_py_latent_source_refusals(tmp_path):
    with pytest.raises(ValueError, match="latent cache already; set ldm_stage.cache_latents=false"):
        check_run(_compose(tmp_path, "stages=[ldm]", cache_latents=True))  # before any stage runs
    with pytest.raises(ValueError, match="vae stage trains on images"):
        stages.run(_compose(tmp_path))
    with pytest.raises(ValueError, match="needs vae_ckpt"):
        stages.run(_compose(tmp_path, "stages=[ldm]"))
    with pytest.raises(ValueError, match="first_stage=vae"):
        stages.run(_compose(tmp_path, "stages=[ldm]", "first_stage=pixel"))
    (tmp_path / "x.ckpt").write_bytes(b"")  # exists: the missing cache is what is refused
    with pytest.raises(ConfigError, match="no latent cache"):
        stages.run(_compose(tmp_path, "stages=[ldm]", f"vae_ckpt={tmp_path / 'x.ckpt'}"))
    assert not (tmp_path / "lat").exists()  # no image shards were written into the cache's place
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "index.json").write_text(json.dumps({"shards": [], "total": 0,
                                                             "latents": {"shape": [4, 4, 4]}}))
    cfg = _compose(tmp_path, "stages=[ldm]")
    stages.check_cache_shape(cfg, [4, 4, 4])
    with pytest.raises(ValueError, match=r"shape \[4, 4, 4\].*\[4, 8, 8\]"):
        stages.check_cache_shape(cfg, [4, 8, 8])


@pytest.mark.parametrize(("precision", "suffix"), [("32-true", ""), ("bf16-mixed", "-bfloat16")])
def test_train_py_caches_the_run_vae_latents_for_the_ldm_stage(tmp_path, precision, suffix):
    """ldm_stage.cache_latents: train.py encodes the shards once with the VAE it just trained and trains on those,
    encoding in the training precision (as the ldm stage would without the cache) into a folder named by the
    VAE's fingerprint and that precision."""
    from tests.integration.tiny_run import run_train

    run_train(tmp_path, "ldm_stage.cache_latents=true", "vae_stage.max_steps=2", "ldm_stage.max_steps=3",
              f"trainer.precision={precision}")
    run = tmp_path / "run"
    caches = list((run / "latents").iterdir())
    assert len(caches) == 1 and len(caches[0].name) == 16 + len(suffix) and caches[0].name.endswith(suffix)
    index = read_index(caches[0])
    assert index["total"] == 48 and index["latents"]["shape"] == [4, 4, 4]
    assert (run / "ldm" / "checkpoints" / "last.ckpt").is_file()
    vae = load_autoencoder(run / "vae" / "vae.ckpt")
    first = next(iter_shard(tmp_path / "shards" / "000000.tar"))
    cached = next(iter_shard(caches[0] / "000000.tar"))
    assert cached["__key__"] == first["__key__"] and cached["txt"] == first["txt"]
    x = to_tensor(decode_image(first["png"]))[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(suffix)):
        mean = vae.encode(x).mean[0].float()
    tol = 3e-2 if suffix else 1e-5  # bf16: the cache encodes in batches of 48, oneDNN may block them otherwise
    torch.testing.assert_close(torch.from_numpy(load_npy(cached["latent_mean.npy"])), mean, atol=tol, rtol=tol)


def test_the_cache_precision_follows_the_training_precision(tmp_path):
    """ldm_stage.cache_precision: null takes the precision the trainer encodes in (auto resolved as training
    resolves it); a name is taken as given and checked."""
    from ldm.lightning.precision import resolve_precision
    from ldm.lightning.settings import check_ldm_stage

    auto = "bfloat16" if resolve_precision("auto", "cpu") == "bf16-mixed" else "float32"
    for trainer, expected in (("32-true", "float32"), ("bf16-mixed", "bfloat16"), ("16-mixed", "float16"),
                              ("auto", auto)):
        cfg = _compose(tmp_path, f"trainer.precision={trainer}", "trainer.accelerator=cpu")
        assert stages.cache_precision(cfg) == expected, trainer
    cfg = _compose(tmp_path, "trainer.precision=bf16-mixed", "ldm_stage.cache_precision=float32")
    assert stages.cache_precision(cfg) == "float32"
    with pytest.raises(ConfigError, match=r"ldm_stage.cache_precision must be one of \['float32', 'bfloat16'"):
        check_ldm_stage(_compose(tmp_path, "ldm_stage.cache_precision=bf16").ldm_stage)
    with pytest.raises(ConfigError, match="ldm_stage.cache_compile must be true or false"):
        check_ldm_stage(_compose(tmp_path, "ldm_stage.cache_compile=maybe").ldm_stage)


def test_train_py_cache_latents_refusals(tmp_path):
    from hydra import compose, initialize_config_dir

    with pytest.raises(ValueError, match="latent cache already; set ldm_stage.cache_latents=false"):
        check_cache_run(_compose(tmp_path, "stages=[ldm]", cache_latents=True))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"out_dir={tmp_path}", "trainer=ddp_cpu", "ldm_stage.cache_latents=true"])
    one_process = r"runs in one process \(trainer.devices=2.*ldm_stage.cache_latents=false.*python -m ldm.data"
    with pytest.raises(ValueError, match=one_process):
        check_cache_run(cfg)
    assert not (tmp_path / "latents").exists()
    with pytest.raises(ValueError, match=r"cache_latents=true with data.buckets.*ldm_stage.cache_latents=false"):
        check_run(_compose(tmp_path, "data.source=images", "ldm_stage.cache_latents=true",
                           "data.buckets={pixels: 256, step: 8, max_ratio: 2.0}"))  # before the vae stage
    for override, said in (("data.crop=random", "data.crop=random data.hflip=false"),
                           ("data.hflip=true", "data.crop=center data.hflip=true")):
        with pytest.raises(ValueError, match=rf"encodes each image once.*{said} would augment nothing"):
            check_run(_compose(tmp_path, "data.source=images", "ldm_stage.cache_latents=true", override))


class CaptionCodes:
    """The first six character codes of each caption (zeros after it) as its 'embedding'."""

    def encode(self, prompts: list[str]):
        hidden = torch.zeros(len(prompts), 6, 3)
        for i, p in enumerate(prompts):
            hidden[i, : len(p[:6]), 0] = torch.tensor([float(ord(c)) for c in p[:6]])
        return hidden, torch.zeros(len(prompts), 3), torch.ones(len(prompts), 6, dtype=torch.bool)


def test_cached_text_embeddings_encode_the_caption_field_training_reads(tmp_path):
    """With ``caption_field`` the embeddings encode the json's field, as the reader's caption is; the .txt by
    default; a folder cached from one field refuses another; a missing field warns and encodes ''."""
    make_shards("shapes", tmp_path / "img", maxcount=4, length=6, size=16, log=None)
    raws = list(iter_shard(tmp_path / "img" / "000000.tar"))
    shapes = [json.loads(r["json"])["shape"] for r in raws]
    txts = [r["txt"].decode() for r in raws]
    assert shapes != txts

    def encoded(folder: Path) -> list[str]:
        """TinyText's 'embedding' holds the first six character codes of the caption it encoded."""
        return ["".join(chr(int(c)) for c in load_npy(r["text_hidden.npy"])[:, 0] if c)
                for r in iter_shard(folder / "000000.tar")]

    cache_latents(tmp_path / "img", tmp_path / "by_field", TinyVAE(), CaptionCodes(), image_size=16, log=None,
                  caption_field="shape")
    assert encoded(tmp_path / "by_field") == [s[:6] for s in shapes]
    cache_latents(tmp_path / "img", tmp_path / "by_txt", TinyVAE(), CaptionCodes(), image_size=16, log=None)
    assert encoded(tmp_path / "by_txt") == [t[:6] for t in txts]
    (tmp_path / "by_field" / "000001.tar").unlink()
    with pytest.raises(ConfigError, match=r"other settings \(caption_field 'shape' -> None\)"):
        cache_latents(tmp_path / "img", tmp_path / "by_field", TinyVAE(), CaptionCodes(), image_size=16, log=None)
    with pytest.warns(UserWarning, match="no field data.caption_field='alt'"):
        cache_latents(tmp_path / "img", tmp_path / "missing", TinyVAE(), CaptionCodes(), image_size=16, log=None,
                      caption_field="alt")
    assert encoded(tmp_path / "missing") == [""] * len(raws)


def test_cli_caption_field(tmp_path):
    """``--caption-field`` reaches the cache (recorded in its settings)."""
    from ldm.autoencoder import AutoencoderKL
    from ldm.checkpoint import atomic_torch_save, module_spec

    make_shards("shapes", tmp_path / "img", maxcount=4, length=4, size=16, log=None)
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    atomic_torch_save({"kind": "autoencoder", "spec": module_spec(vae), "state_dict": vae.state_dict(),
                       "latent_scale": 1.0, "config": {}}, tmp_path / "vae.ckpt")
    text = FrozenText(1.0)
    torch.save(text.state_dict(), tmp_path / "text.pt")
    (tmp_path / "text.yaml").write_text(f"_target_: {__name__}.FrozenText\nvalue: 1.0\n")
    assert main([str(tmp_path / "img"), str(tmp_path / "lat"), "--vae", str(tmp_path / "vae.ckpt"),
                 "--text-encoder-config", str(tmp_path / "text.yaml"), "--text-encoder", str(tmp_path / "text.pt"),
                 "--size", "16", "--device", "cpu", "--caption-field", "color"]) == 0
    assert json.loads((tmp_path / "lat" / "cache_settings.json").read_text())["caption_field"] == "color"


def test_training_refuses_cached_text_embeddings_of_another_encoder_or_caption_field(tmp_path):
    """A frozen text encoder trains on the cache's embeddings instead of its own: a cache made by another encoder,
    or from another caption field, is refused before training; a trainable encoder ignores them."""
    from omegaconf import OmegaConf

    shards, _ = _tiny_images(tmp_path)
    cache_latents(shards, tmp_path / "lat", TinyVAE(), FrozenText(1.0), image_size=32, log=None)

    def cfg(**data):
        return OmegaConf.create({"data": {"source": "latents", "train_shards": str(tmp_path / "lat"), **data}})

    stages.check_cache_text(cfg(), FrozenText(1.0))  # the encoder that made them
    with pytest.raises(ConfigError, match=r"holds text embeddings of another text encoder \(weights [0-9a-f]{16}"):
        stages.check_cache_text(cfg(), FrozenText(2.0))
    with pytest.raises(ConfigError, match=r"caption field None \(None: the .txt\), but data.caption_field='alt'"):
        stages.check_cache_text(cfg(caption_field="alt"), FrozenText(1.0))
    trainable = FrozenText(2.0)
    trainable.frozen = False
    stages.check_cache_text(cfg(), trainable)
