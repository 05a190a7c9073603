"""sample.py end to end on a checkpoint trained for a few steps: prompts, batches, GIFs, image-to-image, metadata."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from tests.integration.tiny_run import ROOT, run_train

S = 16  # tiny_run's image size


def _load_sample_module():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sample_cli = _load_sample_module()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A latent-diffusion checkpoint from train.py after a few steps of both stages (tiny_run's 16-px models)."""
    tmp = tmp_path_factory.mktemp("sample_cli_train")
    run_train(tmp, "vae_stage.max_steps=3", "ldm_stage.max_steps=3")
    return tmp / "run" / "ldm" / "checkpoints" / "last.ckpt"


def sample(ckpt: Path | None, out: Path, **settings) -> list[Path]:
    """Run sample.py's main logic in-process on the composed config (``key=value`` overrides, values quoted)."""
    overrides = [f"out={out}"] + ([f"ckpt={ckpt}"] if ckpt is not None else [])
    for key, value in settings.items():
        overrides.append(f"{key}={json.dumps(value) if isinstance(value, str | bool) else value}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    return sample_cli.run(cfg, {o.split("=", 1)[0] for o in overrides})  # the keys typed, as sample.py's main


def record_unet_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, torch.Tensor]]:
    """(timestep, rows, context) of every UNet call from now on in this test: a guided step denoises the
    [uncond; cond] pair (the latents given once with both contexts), an unguided one the conditional half."""
    from ldm.unet import UNet

    calls: list[tuple[int, int, torch.Tensor]] = []
    forward = UNet.forward

    def recording(self, x, t, context=None, *args, **kwargs):
        calls.append((int(t[0]), x.shape[0] * kwargs.get("contexts_per_input", 1), context.clone()))
        return forward(self, x, t, context, *args, **kwargs)

    monkeypatch.setattr(UNet, "forward", recording)
    return calls


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_regenerated(original: Path, again: Path) -> None:
    """Same pixels, up to rare off-by-one roundings (batched and single-image kernels differ in the last bits)."""
    a, b = pixels(original), pixels(again)
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"max {diff.max()}, {(diff > 0).mean():.2%} differ"


def test_prompt_n_steps_guidance_sampler_seed_out_metadata_grid(tiny_ckpt, tmp_path) -> None:
    out = tmp_path / "samples"
    written = sample(tiny_ckpt, out, prompt="a red circle in the top left", n=3, steps=3, guidance_scale=5,
                     sampler="dpm_solver++", seed=7, batch_size=2)
    assert [p.name for p in written] == ["00000.png", "00001.png", "00002.png"]
    metas = [json.loads((out / f"{i:05d}.json").read_text()) for i in range(3)]
    assert [m["seed"] for m in metas] == [7, 8, 9]
    assert all(m["prompt"] == "a red circle in the top left" and m["num_inference_steps"] == 3 and
               m["guidance_scale"] == 5 and m["sampler"] == "dpm_solver++" and m["height"] == S for m in metas)
    assert Image.open(out / "_previews" / "grid.png").size == (3 * S, S)
    imgs = [pixels(p) for p in written]
    assert imgs[0].shape == (S, S, 3) and not np.array_equal(imgs[0], imgs[1])
    # image 1 was sampled in a batch of 2; from its JSON alone it comes back
    again = sample(None, tmp_path / "again", regenerate=str(out / "00001.json"))
    assert_regenerated(out / "00001.png", again[0])
    assert json.loads((tmp_path / "again" / "00000.json").read_text())["seed"] == 8


def test_guidance_interval_default_override_and_regenerate(tiny_ckpt, tmp_path, monkeypatch) -> None:
    """The checkpoint's interval (the quickstart's [400, 1000]) is used and recorded; an override changes which steps
    are guided, is recorded, and regenerates. The guided steps are read off the UNet's calls (a guided step runs the
    [uncond; cond] pair, an unguided one the conditional half): a model trained for 3 steps conditions too weakly for
    the interval to show in 8-bit pixels."""
    calls = record_unet_calls(monkeypatch)
    kw = dict(prompt="a red square in the center", steps=4, guidance_scale=5, sampler="ddim")
    default = sample(tiny_ckpt, tmp_path / "default", **kw)
    assert json.loads(default[0].with_suffix(".json").read_text())["guidance_interval"] == [400, 1000]
    assert len(calls) == 4 and any(t < 400 for t, _, _ in calls)
    assert all(batch == (2 if 400 <= t <= 1000 else 1) for t, batch, _ in calls), [c[:2] for c in calls]
    calls.clear()
    everywhere = sample(tiny_ckpt, tmp_path / "everywhere", guidance_interval=[0, 1000], **kw)
    assert json.loads(everywhere[0].with_suffix(".json").read_text())["guidance_interval"] == [0, 1000]
    assert len(calls) == 4 and all(batch == 2 for _, batch, _ in calls), [c[:2] for c in calls]
    again = sample(None, tmp_path / "again", regenerate=str(everywhere[0].with_suffix(".json")))
    assert_regenerated(everywhere[0], again[0])
    calls.clear()  # a setting typed beside regenerate= wins over the JSON's (it was silently dropped)
    varied = sample(None, tmp_path / "varied", regenerate=str(everywhere[0].with_suffix(".json")), steps=2)
    meta = json.loads(varied[0].with_suffix(".json").read_text())
    assert meta["num_inference_steps"] == 2 and meta["guidance_interval"] == [0, 1000] and len(calls) == 2
    with pytest.raises(ValueError, match=r"two timesteps \[lo, hi\].*got '0-1000'"):
        sample(tiny_ckpt, tmp_path / "bad", guidance_interval="0-1000", **kw)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_autoguidance_needs_a_guide_snapshot(tiny_ckpt, tmp_path) -> None:
    """This checkpoint was trained without ldm_stage.guide_snapshot_step (the quickstart's default): autoguidance is
    off, asking for it fails before anything is written, and a saved default it cannot honour is dropped with a
    warning (the guided path itself runs on train_and_sample's checkpoint)."""
    kw = dict(prompt="a red square in the center", steps=3)
    off = sample(tiny_ckpt, tmp_path / "off", **kw)
    assert json.loads(off[0].with_suffix(".json").read_text())["autoguidance_scale"] == 1.0
    with pytest.raises(ValueError, match="needs a guide snapshot.*ldm_stage.guide_snapshot_step"):
        sample(tiny_ckpt, tmp_path / "bad", autoguidance_scale=2.0, **kw)
    assert not (tmp_path / "bad").exists()
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    ckpt["ldm"]["sampling"]["autoguidance_scale"] = 2.0  # as a checkpoint saved before its snapshot step says
    early = tmp_path / "early.ckpt"
    torch.save(ckpt, early)
    with pytest.warns(UserWarning, match="holds no guide snapshot"):
        written = sample(early, tmp_path / "early", **kw)
    assert json.loads(written[0].with_suffix(".json").read_text())["autoguidance_scale"] == 1.0
    assert np.array_equal(pixels(written[0]), pixels(off[0]))


def test_prompts_file_and_negative_prompt(tiny_ckpt, tmp_path, monkeypatch) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green square in the center\n\n  a blue triangle in the bottom right \n")
    written = sample(tiny_ckpt, tmp_path / "file", prompts_file=str(prompts), n=2, steps=2, seed=0)
    metas = [json.loads(p.with_suffix(".json").read_text()) for p in written]
    lines = ["a green square in the center", "a blue triangle in the bottom right"]
    assert [m["prompt"] for m in metas] == [lines[0], lines[0], lines[1], lines[1]]
    assert [m["seed"] for m in metas] == [0, 1, 2, 3]
    assert Image.open(tmp_path / "file" / "_previews" / "grid.png").size == (4 * S, S)
    # the unconditional half of each guided UNet call is the negative prompt's encoding, not the empty prompt's (read
    # off the calls: a model trained for 3 steps conditions too weakly for a new prompt to show in 8-bit pixels)
    calls = record_unet_calls(monkeypatch)
    sample(tiny_ckpt, tmp_path / "plain", prompt="a red square in the center", steps=2, guidance_scale=4)
    negative = sample(tiny_ckpt, tmp_path / "negative", prompt="a red square in the center", steps=2,
                      guidance_scale=4, negative_prompt="a blue circle, in the top left")
    meta = json.loads(negative[0].with_suffix(".json").read_text())
    assert meta["negative_prompt"] == "a blue circle, in the top left"
    assert len(calls) == 4 and all(batch == 2 for _, batch, _ in calls)  # two guided steps each
    uncond = [context[: len(context) // 2] for _, _, context in calls]
    assert torch.equal(uncond[0], uncond[1]) and torch.equal(uncond[2], uncond[3])
    assert (uncond[0] - uncond[2]).abs().max() > 0.1


def test_a_prompts_file_is_utf8_and_a_recorded_prompt_regenerates_as_written(tiny_ckpt, tmp_path,
                                                                              monkeypatch) -> None:
    """The prompts file is read as UTF-8 whatever the locale (a Latin-1 file is a clear error), and ``regenerate``
    takes the recorded prompt as written: ``${seed}`` in it is text, not an interpolation of the config."""
    monkeypatch.setattr(Path, "read_text", _read_text_in_ascii_locale)
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a poster that reads ${seed} dollars, café ☃\n".encode())
    written = sample(tiny_ckpt, tmp_path / "file", prompts_file=str(prompts), steps=2, seed=3)
    assert json.loads(written[0].with_suffix(".json").read_text(encoding="utf-8"))["prompt"] == \
        "a poster that reads ${seed} dollars, café ☃"
    again = sample(None, tmp_path / "again", regenerate=str(written[0].with_suffix(".json")))
    assert json.loads(again[0].with_suffix(".json").read_text(encoding="utf-8"))["prompt"] == \
        "a poster that reads ${seed} dollars, café ☃"
    assert_regenerated(written[0], again[0])
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts_file=.*prompts.txt is not UTF-8 text"):
        sample(tiny_ckpt, tmp_path / "latin", prompts_file=str(prompts), steps=2)


_read_text = Path.read_text


def _read_text_in_ascii_locale(self: Path, encoding: str | None = None, errors: str | None = None) -> str:
    """``Path.read_text`` as under LC_ALL=C: no encoding given reads ASCII."""
    return _read_text(self, encoding=encoding or "ascii", errors=errors)


def test_a_second_run_into_the_same_folder_numbers_its_images_after_the_first(tiny_ckpt, tmp_path, capsys) -> None:
    """Nothing is overwritten: the second run's images follow the first's, whose files stay as they were."""
    first = sample(tiny_ckpt, tmp_path, prompt="a red circle in the top left", n=3, steps=2)
    before = {p.name: p.read_bytes() for p in first}
    second = sample(tiny_ckpt, tmp_path, prompt="a blue square in the center", n=2, steps=2)
    assert [p.name for p in second] == ["00003.png", "00004.png"]
    assert {p.name: p.read_bytes() for p in first} == before
    assert json.loads((tmp_path / "00003.json").read_text())["prompt"] == "a blue square in the center"
    assert "holds images up to 00002.png" in capsys.readouterr().err


def test_gif_of_the_reverse_process(tiny_ckpt, tmp_path) -> None:
    sample(tiny_ckpt, tmp_path, prompt="a yellow circle in the top right", steps=3, gif=True, sampler="ddim")
    gif = Image.open(tmp_path / "_previews" / "00000.gif")
    assert gif.is_animated and gif.n_frames > 1 and gif.size == (S, S)


def test_a_gif_decodes_its_frames_in_the_tiles_the_image_is_decoded_in(tiny_ckpt, tmp_path) -> None:
    """With a small ``vae_tile_size`` the frames are decoded with the call's tile overlap (a quarter of the tile),
    not the VAE's default of 8, which a 4-pixel tile cannot take."""
    sample(tiny_ckpt, tmp_path, prompt="a yellow circle in the top right", steps=2, gif=True, sampler="ddim",
           height=2 * S, width=2 * S, vae_tile_size=4)
    gif = Image.open(tmp_path / "_previews" / "00000.gif")
    assert gif.is_animated and gif.size == (2 * S, 2 * S)


def test_image_to_image_per_image_seeds(tiny_ckpt, tmp_path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (S, S), (200, 30, 30)).save(init)
    out = tmp_path / "img2img"
    written = sample(tiny_ckpt, out, prompt="a red square in the center", init_image=str(init), strength=0.6, n=2,
                     steps=5, seed=3, batch_size=2, sampler="ddpm")
    meta = json.loads(written[1].with_suffix(".json").read_text())
    assert (meta["init_image"], meta["strength"], meta["seed"]) == (str(init), 0.6, 4)
    assert not np.array_equal(pixels(written[0]), pixels(written[1]))  # each image has its own noise
    again = sample(None, tmp_path / "again", regenerate=str(written[1].with_suffix(".json")))
    assert_regenerated(written[1], again[0])


def test_given_the_vae_checkpoint_sample_py_names_the_file_to_pass(tiny_ckpt, tmp_path) -> None:
    vae = tiny_ckpt.parents[2] / "vae" / "vae.ckpt"
    with pytest.raises(ValueError, match=r"autoencoder checkpoint \(vae/vae.ckpt\): it encodes and decodes images but "
                                         r"cannot generate them\. Pass the latent diffusion checkpoint: .*last\.ckpt"):
        sample(vae, tmp_path / "out", prompt="a red circle")
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_zero_and_wrong_outputs_are_errors_not_defaults(tiny_ckpt, tmp_path) -> None:
    from ldm.errors import ConfigError

    for key, match in [("n", "n must be an integer >= 1, got 0"), ("batch_size", "batch_size must be an integer >= 1"),
                       ("steps", r"\bsteps must be an integer >= 1, got 0"),
                       ("height", "height and width must be positive")]:
        with pytest.raises(ConfigError, match=match):
            sample(tiny_ckpt, tmp_path / "out", prompt="a red circle", **{key: 0})
    for key, value, match in [
        ("guidance_scale", "nan", "guidance_scale must be a finite number >= 0"),
        ("guidance_scale", "inf", "guidance_scale must be a finite number >= 0"),
        ("guidance_scale", "true", r"guidance_scale must be .* got True \(bool\)"),
        ("guidance_rescale", "nan", r"guidance_rescale must lie in \[0, 1\]"),
        ("autoguidance_scale", "nan", "autoguidance_scale must be a finite number >= 1"),
        ("guidance_interval", "[0,inf]", "guidance_interval must be two timesteps"),
        ("steps", "2.5", r"\bsteps must be an integer >= 1, got 2.5 \(float\)"),
        ("steps", "abc", r"\bsteps must be an integer >= 1, got 'abc' \(str\)"),
        ("steps", "5000", r"\bsteps must lie in \[1, 1000\]"),
        ("height", "-16", "height and width must be positive"), ("width", "99999999", "at most 16384"),
        ("eta", "-1", "eta must be a finite number >= 0"), ("eta", "nan", "eta must be a finite number >= 0"),
        ("strength", "0", r"strength must lie in \(0, 1\]"), ("strength", "inf", r"strength must lie in \(0, 1\]"),
        ("seed", "-1", r"seed must be an integer in \[0, 2\*\*64 - 1\]"), ("seed", "1.5", "seed must be an integer"),
        ("n", "true", "n must be an integer >= 1"), ("n", "99999999", "more than 1000000"),
        ("batch_size", "2.0", "batch_size must be an integer >= 1"),
        ("vae_tile_size", "0", "vae_tile_size must be a positive number"), ("dtype", "int8", "unknown dtype"),
        ("sampler", "euler_x", "unknown sampler 'euler_x'"), ("gif", "1", "gif must be true or false"),
        ("prompt", "1984", r"prompt 1984 is not text: quote it"),
        ("negative_prompt", "[a,b]", "negative_prompt must be text"),
        ("init_image", "missing.png", "init_image=missing.png: no such file"),
        ("prompts_file", "missing.txt", "prompts_file=missing.txt: no such file"),
    ]:
        settings = {"prompt": "a red circle"} if key != "prompt" else {}
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("sample", overrides=[f"ckpt={tiny_ckpt}", f"out={tmp_path / 'out'}", f"{key}={value}",
                                               *(f"{k}={v}" for k, v in settings.items() if k != key)])
        with pytest.raises(ConfigError, match=match):
            sample_cli.run(cfg)
        assert not (tmp_path / "out").exists(), key  # refused before anything is written
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file: give a folder"):
        sample(tiny_ckpt, tmp_path / "file.png", prompt="a red circle")


def test_an_interrupted_write_leaves_no_truncated_image_and_an_unmakeable_out_is_an_error(tiny_ckpt, tmp_path,
                                                                                             monkeypatch) -> None:
    """Ctrl-C while a PNG is written (here: after its signature) leaves no truncated PNG that the next run numbers
    after or FID fails on: the image goes to a temporary file renamed into place, after its JSON. An out= that
    cannot be created (a parent is a file) is a ConfigError naming it, not mkdir's traceback."""
    from PIL import PngImagePlugin

    from ldm.errors import ConfigError

    def interrupted(im, fp, filename, *args, **kwargs):
        fp.write(PngImagePlugin._MAGIC)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setitem(Image.SAVE, "PNG", interrupted)
        with pytest.raises(KeyboardInterrupt):
            sample(tiny_ckpt, tmp_path / "out", prompt="a red circle", steps=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00000.json"]
    assert [p.name for p in sample(tiny_ckpt, tmp_path / "out", prompt="a red circle", steps=1)] == ["00001.png"]
    Image.open(tmp_path / "out" / "00001.png").load()
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"out=.*file/sub: cannot create the folder \(.*\): give a folder"):
        sample(tiny_ckpt, tmp_path / "file" / "sub", prompt="a red circle", steps=1)


def test_cli_exit_status_and_unknown_keys(tiny_ckpt, tmp_path) -> None:
    """A wrong value prints ``error: ...`` and exits 2 without a traceback; an unknown key (a typo) is refused by
    Hydra's struct mode before sample.py runs."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "sample.py"), f"ckpt={tiny_ckpt}", *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)

    bad = cli("prompt=a cat", "steps=0", f"out={tmp_path / 'out'}")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("error: steps must be an integer >= 1, got 0")
    assert "Traceback" not in bad.stderr and not (tmp_path / "out").exists()
    typo = cli("prompt=a cat", "stpes=3", f"out={tmp_path / 'out'}")
    assert typo.returncode != 0 and "Key 'stpes' is not in struct" in typo.stderr
    assert not (tmp_path / "out").exists()


def test_a_class_label_for_a_model_without_classes_is_refused(tiny_ckpt, tmp_path) -> None:
    with pytest.raises(ValueError, match="is not class-conditional .*drop class_label"):
        sample(tiny_ckpt, tmp_path / "out", prompt="a red circle", class_label=1)
    assert not (tmp_path / "out").exists()
    written = sample(tiny_ckpt, tmp_path / "plain", prompt="a red circle", steps=1)
    assert json.loads(written[0].with_suffix(".json").read_text())["class_label"] is None


def test_compile_true_compiles_the_unet_once_before_sampling(tiny_ckpt, tmp_path, monkeypatch) -> None:
    from ldm.pipeline import LatentDiffusionPipeline

    compiled = []
    monkeypatch.setattr(LatentDiffusionPipeline, "compile_unet", lambda self: compiled.append(self) or self)
    assert len(sample(tiny_ckpt, tmp_path / "compiled", prompt="a red circle", n=2, compile=True)) >= 2
    assert len(compiled) == 1 and isinstance(compiled[0], LatentDiffusionPipeline)
    sample(tiny_ckpt, tmp_path / "eager", prompt="a red circle", n=2)
    assert len(compiled) == 1  # off by default
