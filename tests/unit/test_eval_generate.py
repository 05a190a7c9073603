"""The evaluation-set generator (ldm.eval.generate): an image depends on its index alone (not the batch, not the
rank), two ranks together write exactly one rank's set, a rerun regenerates only what is missing, EMA weights are the
default, and wrong input exits 2 with its message. A tiny random checkpoint with 2 sampler steps keeps it fast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.autoencoder import AutoencoderKL
from ldm.checkpoint import describe_ldm
from ldm.diffusion import SamplingDefaults
from ldm.diffusion.schedules import SD_SCHEDULE
from ldm.errors import ConfigError
from ldm.eval import generate as gen
from ldm.pipeline import LatentDiffusionPipeline
from ldm.text import ScratchTextEncoder
from ldm.unet import UNet

TEXT_KWARGS = dict(width=32, layers=1, heads=2, context_length=12)
CAPTIONS = ["a red circle in the top left", "a blue square in the center", "a green triangle in the bottom right"]
N = 7
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _randomize(module: torch.nn.Module, g: torch.Generator, std: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    torch.set_num_threads(1)
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A 16-px latent diffusion checkpoint (f=4 VAE, 2-level UNet, 1-layer text tower) whose EMA weights differ from
    its raw ones; 2 DPM-Solver++ steps by default."""
    g = torch.Generator().manual_seed(0)
    text = _randomize(ScratchTextEncoder(**TEXT_KWARGS), g, std=0.5)
    unet = _randomize(UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=2, context_dim=32), g)
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1), g)
    header = describe_ldm(unet=unet, text_encoder=text, first_stage=vae, schedule=SD_SCHEDULE,
                          prediction_type="epsilon", ema=True, text_encoder_kwargs=TEXT_KWARGS,
                          sampling=SamplingDefaults.from_dict({"image_size": 16, "num_inference_steps": 2,
                                                               "guidance_scale": 3.0}))
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state |= {f"text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"first_stage.{k}": v for k, v in vae.state_dict().items()}
    state |= {f"ema.{k}": p.detach() + 0.05 * torch.randn(p.shape, generator=g) for k, p in unet.named_parameters()}
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"ldm": header, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text(f"{CAPTIONS[0]}\n\n{CAPTIONS[1]}\n   \n{CAPTIONS[2]}\n")  # blank lines are ignored
    return path


@pytest.fixture(scope="module")
def reference(ckpt, captions_file, tmp_path_factory) -> Path:
    """One single-rank run of N images, batch 3 (the set the other tests compare with)."""
    out = tmp_path_factory.mktemp("ref") / "gen"
    assert gen.main([str(ckpt), "--captions", str(captions_file), "--n", str(N), "--out", str(out),
                     "--batch-size", "3", "--seed", "5"]) == 0
    return out


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _args(ckpt: Path, captions: Path, out: Path, *extra: str) -> list[str]:
    return [str(ckpt), "--captions", str(captions), "--n", str(N), "--out", str(out), "--seed", "5", *extra]


def test_an_image_depends_on_its_index_not_the_batching(ckpt) -> None:
    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt)
    indices = [4, 0, 9]
    texts = [CAPTIONS[i % 3] for i in indices]
    kw = dict(sampler="ddpm", num_inference_steps=2)  # a stochastic sampler: step noise per image as well
    one = gen.generate_images(pipe, texts, indices, seed=1, batch_size=1, **kw)
    three = gen.generate_images(pipe, texts, indices, seed=1, batch_size=3, **kw)
    alone = gen.generate_images(pipe, texts[2:], indices[2:], seed=1, batch_size=16, **kw)
    assert len(one) == len(three) == 3 and one[0].size == (16, 16)
    for a, b in zip(one, three, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(one[2]))
    assert not np.array_equal(np.asarray(one[0]), np.asarray(one[1]))  # the images are not all alike
    with pytest.raises(ConfigError, match="generator"):
        gen.generate_images(pipe, texts, indices, generator=torch.Generator())
    with pytest.raises(ConfigError, match="3 captions for 2 indices"):
        gen.generate_images(pipe, texts, indices[:2])


def test_single_rank_run_writes_images_and_captions(reference, capsys) -> None:
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted([f"{i:06d}.png" for i in range(N)] + [f"{i:06d}.txt" for i in range(N)]
                           + [gen.SETTINGS_FILE])
    for i in range(N):  # image i uses caption i modulo the number of captions
        assert (reference / f"{i:06d}.txt").read_text() == CAPTIONS[i % 3]
        assert _pixels(reference / f"{i:06d}.png").shape == (16, 16, 3)


def test_two_ranks_together_give_the_single_rank_set(ckpt, captions_file, reference, tmp_path, monkeypatch,
                                                     capsys) -> None:
    out = tmp_path / "ranks"
    for rank, batch in ((1, "1"), (0, "2")):  # rank 1 first, other batch sizes: neither may matter
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert gen.main(_args(ckpt, captions_file, out, "--batch-size", batch)) == 0
        mine = len(range(rank, N, 2))
        assert capsys.readouterr().out.strip().splitlines()[-1] == \
            f"rank {rank}/2: wrote {mine} images (skipped 0 existing) to {out}"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for i in range(N):
        np.testing.assert_array_equal(_pixels(out / f"{i:06d}.png"), _pixels(reference / f"{i:06d}.png"))


def test_rerun_regenerates_only_missing_images(ckpt, captions_file, reference, tmp_path, capsys) -> None:
    out = tmp_path / "resume"
    args = _args(ckpt, captions_file, out, "--batch-size", "4")
    assert gen.main(args) == 0
    capsys.readouterr()
    for name in ("000002.png", "000005.png", "000005.txt"):
        (out / name).unlink()
    (out / ".000003.png.abc123.tmp").write_bytes(b"half a png")  # a killed writer's temporary
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    assert gen.main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote 2 images (skipped 5 existing) to {out}"
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert set(after) == set(before) | {"000002.png", "000005.png", "000005.txt"}  # the temporary is gone
    assert all(after[k] == v for k, v in before.items())  # nothing else rewritten
    for i in range(N):
        np.testing.assert_array_equal(_pixels(out / f"{i:06d}.png"), _pixels(reference / f"{i:06d}.png"))
    assert (out / "000005.txt").read_text() == CAPTIONS[2]
    # other settings into the same folder are refused, before any image
    assert gen.main(_args(ckpt, captions_file, out, "--guidance", "1")) == 2
    assert "other settings (sampling differ" in capsys.readouterr().err


def test_compile_compiles_the_unet_once_and_is_off_by_default(ckpt, captions_file, reference, tmp_path,
                                                              monkeypatch) -> None:
    compiled = []
    monkeypatch.setattr(LatentDiffusionPipeline, "compile_unet", lambda self: compiled.append(self) or self)
    assert gen.main(_args(ckpt, captions_file, tmp_path / "compiled", "--n", "2", "--compile")) == 0
    assert len(compiled) == 1 and isinstance(compiled[0], LatentDiffusionPipeline)
    assert gen.main(_args(ckpt, captions_file, tmp_path / "eager", "--n", "2")) == 0
    assert len(compiled) == 1
    for i in range(2):  # the flag is not a sampling setting: the images are the reference's
        np.testing.assert_array_equal(_pixels(tmp_path / "compiled" / f"{i:06d}.png"),
                                      _pixels(reference / f"{i:06d}.png"))


def test_ema_weights_are_the_default(ckpt, captions_file, reference, tmp_path, monkeypatch) -> None:
    seen = []
    original = gen.load_parts

    def spy(path, use_ema=True, **kw):
        seen.append(use_ema)
        return original(path, use_ema=use_ema, **kw)

    monkeypatch.setattr(gen, "load_parts", spy)
    assert gen.main(_args(ckpt, captions_file, tmp_path / "raw", "--no-ema", "--n", "2")) == 0
    assert seen == [False]
    assert json.loads((reference / "generate.json").read_text())["use_ema"] is True
    for i in range(2):  # the EMA weights differ from the raw ones, and so do the images
        assert not np.array_equal(_pixels(tmp_path / "raw" / f"{i:06d}.png"), _pixels(reference / f"{i:06d}.png"))
    ema = gen.generate_images(LatentDiffusionPipeline.from_checkpoint(ckpt), CAPTIONS[:1], [0], seed=5)
    np.testing.assert_array_equal(np.asarray(ema[0]), _pixels(reference / "000000.png"))


def test_a_checkpoint_without_ema_weights_says_so(ckpt, captions_file, tmp_path) -> None:
    """Without EMA weights the raw ones sample: a warning, ``use_ema: false`` recorded, and a ``--no-ema`` rerun
    (the same weights) continues the folder instead of being refused."""
    state = torch.load(ckpt, weights_only=False)
    state["ldm"]["ema"] = False
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("ema.")}
    torch.save(state, tmp_path / "raw.ckpt")
    with pytest.warns(UserWarning, match="holds no EMA weights: generating with its raw weights"):
        assert gen.main(_args(tmp_path / "raw.ckpt", captions_file, tmp_path / "out", "--n", "2")) == 0
    assert json.loads((tmp_path / "out" / "generate.json").read_text())["use_ema"] is False
    assert gen.main(_args(tmp_path / "raw.ckpt", captions_file, tmp_path / "out", "--n", "3", "--no-ema")) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


@pytest.mark.parametrize("case, message", [
    ("missing_ckpt", "checkpoint .*nope.ckpt does not exist"),
    ("empty_captions", "holds no captions"),
    ("missing_captions", "no such file"),
    ("zero_n", r"--n \(the number of images\) must be >= 1, got 0"),
    ("negative_n", "must be >= 1, got -3"),
    ("bad_steps", "num_inference_steps"),
    ("bad_rank", "RANK=2 is outside"),
    ("bad_device", "--device 'foo' is not a torch device"),
    ("unmakeable_out", r"--out=.*afile/o: cannot create the folder"),
])
def test_bad_input_exits_2_with_one_line(case, message, ckpt, captions_file, tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    args = {"missing_ckpt": _args(tmp_path / "nope.ckpt", captions_file, tmp_path / "o"),
            "empty_captions": _args(ckpt, empty, tmp_path / "o"),
            "missing_captions": _args(ckpt, tmp_path / "none.txt", tmp_path / "o"),
            "zero_n": _args(ckpt, captions_file, tmp_path / "o", "--n", "0"),
            "negative_n": _args(ckpt, captions_file, tmp_path / "o", "--n", "-3"),
            "bad_steps": _args(ckpt, captions_file, tmp_path / "o", "--steps", "0"),
            "bad_rank": _args(ckpt, captions_file, tmp_path / "o"),
            "bad_device": _args(ckpt, captions_file, tmp_path / "o", "--device", "foo"),
            "unmakeable_out": _args(ckpt, captions_file, tmp_path / "afile" / "o")}[case]
    (tmp_path / "afile").write_text("a file, not a folder")
    if case == "bad_rank":
        monkeypatch.setenv("RANK", "2")
        monkeypatch.setenv("WORLD_SIZE", "2")
    assert gen.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.png"))


def test_rank_environment(monkeypatch) -> None:
    assert gen.rank_and_world() == (0, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert gen.rank_and_world() == (1, 4)
    monkeypatch.setenv("RANK", "3")  # RANK / WORLD_SIZE win over the local pair
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert gen.rank_and_world() == (3, 8)
