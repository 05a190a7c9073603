"""Conversion keeps the model: a train.py-style ldm checkpoint -> SD single file / diffusers folder -> back samples
the same images, because what the SD layout cannot express (heads, latent scale and shift, prediction type,
schedule, sampling defaults) travels as metadata; files without it warn when heads are guessed; CLI overrides and
errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ldm.autoencoder import AutoencoderKL
from ldm.checkpoint import load_parts, read_checkpoint
from ldm.convert import load_sd_checkpoint, save_state_dict, to_sd_state_dict
from ldm.convert.__main__ import main as convert_main
from ldm.pipeline import LatentDiffusionPipeline
from ldm.unet import UNet
from tests.module_factory import diffusion_module
from tests.module_factory import randomize as _randomize

ROOT = Path(__file__).resolve().parents[2]
HF_TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
               max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
# 4 heads: shape inference assumes SD 1.x's 8; a latent scale and shift SD does not use; a schedule, prediction type
# and sampling defaults SD files do not record
HEADS = 4
SCALE, SHIFT = 0.5, 0.1
SCHEDULE = {"schedule": "linear", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
            "rescale_betas_zero_snr": False}
SAMPLING = {"image_size": 16, "num_inference_steps": 3, "sampler": "ddim", "guidance_scale": 3.0}
PROMPTS = ["a red circle", "a blue square"]


def read_sd_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An SD file's tensors and metadata, read with the libraries themselves."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    obj = torch.load(path, weights_only=True)
    return obj["state_dict"], obj.get("ldm_metadata", {})


@pytest.fixture(scope="module")
def ldm_ckpt(tmp_path_factory) -> Path:
    """A checkpoint as train.py writes it (header + module state dict, EMA weights that differ from the raw ones)."""
    from ldm.text import HFCLIPTextEncoder

    torch.manual_seed(0)
    text = HFCLIPTextEncoder(config=HF_TEXT)
    unet = _randomize(UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=HEADS, context_dim=64), 1)
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=SCALE, shift_factor=SHIFT), 2)
    module = diffusion_module(unet, text, vae, schedule=SCHEDULE, prediction_type="v_prediction", sampling=SAMPLING,
                              text_encoder_kwargs={"config": HF_TEXT})
    _randomize(unet, 3)  # the raw weights move on; the EMA keeps the seed-1 ones
    path = tmp_path_factory.mktemp("run") / "ldm" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"ldm": module.describe(), "state_dict": module.state_dict(), "global_step": 7}, path)
    return path


def _images(pipe: LatentDiffusionPipeline) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, height=16, width=16, generator=gens, output_type="tensor")


def _no_head_guess(record: list[warnings.WarningMessage]) -> None:
    assert not [w for w in record if "attention heads" in str(w.message)], [str(w.message) for w in record]


@pytest.fixture(scope="module")
def original(ldm_ckpt: Path) -> torch.Tensor:
    return _images(LatentDiffusionPipeline.from_checkpoint(ldm_ckpt))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ldm_checkpoint_to_sd_file_samples_the_same_images(ldm_ckpt: Path, original: torch.Tensor, tmp_path: Path,
                                                           suffix: str) -> None:
    out = tmp_path / f"model{suffix}"
    assert convert_main([str(ldm_ckpt), str(out)]) == 0
    _, metadata = read_sd_file(out)
    assert json.loads(metadata["ldm.unet"]) == {"num_heads": HEADS, "num_head_channels": -1}
    assert json.loads(metadata["ldm.vae"])["scale_factor"] == SCALE
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        pipe = LatentDiffusionPipeline.from_checkpoint(out)
    _no_head_guess(record)
    assert pipe.unet.config["num_heads"] == HEADS
    assert (pipe.vae.config["scale_factor"], pipe.vae.config["shift_factor"]) == (SCALE, SHIFT)
    assert pipe.schedule == SCHEDULE and pipe.prediction_type == "v_prediction"
    assert pipe.sampling.sampler == "ddim" and pipe.sampling.image_size == 16
    torch.testing.assert_close(_images(pipe), original, rtol=0, atol=1e-5)


def test_ldm_to_diffusers_to_ldm_samples_the_same_images(ldm_ckpt: Path, original: torch.Tensor,
                                                         tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    folder, back = tmp_path / "diffusers", tmp_path / "back.ckpt"
    assert convert_main([str(ldm_ckpt), str(folder)]) == 0
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["prediction_type"]) == ("linear", "v_prediction")
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == SCALE
    assert convert_main([str(folder), str(back), "--to", "ldm"]) == 0
    parts = load_parts(back)
    assert parts.unet.config["num_heads"] == HEADS and parts.schedule == SCHEDULE
    assert parts.prediction_type == "v_prediction" and parts.sampling.sampler == "ddim"
    torch.testing.assert_close(_images(LatentDiffusionPipeline.from_parts(parts)), original, rtol=0, atol=1e-5)
    # and an SD file to an ldm checkpoint
    sd, sd_back = tmp_path / "model.safetensors", tmp_path / "from_sd.ckpt"
    assert convert_main([str(folder), str(sd)]) == 0
    assert convert_main([str(sd), str(sd_back), "--to", "ldm"]) == 0
    torch.testing.assert_close(_images(LatentDiffusionPipeline.from_checkpoint(sd_back)), original, rtol=0, atol=1e-5)


def test_a_diffusers_folder_of_an_sd1_model_loads_as_diffusers_pipeline_and_samples_our_images(
        tmp_path: Path) -> None:
    """With a CLIP text encoder, a schedule and a plain latent scale, the folder is a whole StableDiffusionPipeline
    (model_index.json, tokenizer/): diffusers loads it, tokenizes the prompts itself and samples our images. A VAE
    with a latent shift gets no model_index.json: that pipeline would decode without it."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ldm.text import HFCLIPTextEncoder

    torch.manual_seed(0)
    text = HFCLIPTextEncoder(config=HF_TEXT)
    unet = _randomize(UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=8, context_dim=64), 1)
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=SCALE), 2)
    module = diffusion_module(unet, text, vae, schedule=SCHEDULE, prediction_type="v_prediction", sampling=SAMPLING,
                              text_encoder_kwargs={"config": HF_TEXT}, ema_decay=None)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"ldm": module.describe(), "state_dict": module.state_dict(), "global_step": 1}, ckpt)
    assert convert_main([str(ckpt), str(tmp_path / "pipe")]) == 0
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config, clip_sample=False,
                                                 timestep_spacing="trailing")  # ldm's ddim
    ours = LatentDiffusionPipeline.from_checkpoint(ckpt)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(height=16, width=16, num_inference_steps=3, guidance_scale=3.0)
    expected = ours(PROMPTS, latents=noise, sampler="ddim", output_type="tensor", **kw)
    got = theirs(PROMPTS, latents=noise, output_type="pt", **kw).images * 2 - 1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    for name, kw in (("shifted", {"shift_factor": SHIFT}), ("centred", {"latent_mean": [0.5, -0.5, 0.25, 0.0]})):
        assert convert_main([str(ldm_ckpt_with_shift(tmp_path, text, **kw)), str(tmp_path / name)]) == 0
        assert (tmp_path / name / "unet").is_dir() and not (tmp_path / name / "model_index.json").exists(), name


@pytest.mark.parametrize("pad", [0, 49407])
def test_a_pad_id_of_0_is_noted_where_transformers_tokenizes_a_bang_as_padding(tmp_path: Path, capsys, pad) -> None:
    """transformers' CLIPTokenizer splits the pad token out of the text: with pad id 0 ('!') a prompt's '!' becomes
    the pad id in the converted folder, which the converter notes; with the SD 1.x pad id (eot) it tokenizes as ldm."""
    from transformers import CLIPTokenizer as HFTokenizer

    from ldm.text import HFCLIPTextEncoder

    text = HFCLIPTextEncoder(config=HF_TEXT, pad_token_id=pad)
    unet = _randomize(UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=8, context_dim=64), 1)
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=SCALE), 2)
    module = diffusion_module(unet, text, vae, schedule=SCHEDULE, prediction_type="v_prediction", sampling=SAMPLING,
                              text_encoder_kwargs={"config": HF_TEXT, "pad_token_id": pad}, ema_decay=None)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"ldm": module.describe(), "state_dict": module.state_dict(), "global_step": 1}, ckpt)
    capsys.readouterr()
    assert convert_main([str(ckpt), str(tmp_path / "pipe")]) == 0
    noted = "pads with id 0" in capsys.readouterr().err
    theirs = HFTokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer")
    n = text.tokenizer.context_length
    ours = text.tokenizer(["stop! a cat"])[0][0].tolist()
    same = theirs("stop! a cat", padding="max_length", max_length=n).input_ids == ours
    assert (noted, same) == ((True, False) if pad == 0 else (False, True))


def ldm_ckpt_with_shift(tmp_path: Path, text, **normalization) -> Path:
    """A checkpoint whose VAE subtracts something before scaling (``shift_factor`` or ``latent_mean``), which
    diffusers' StableDiffusionPipeline would not."""
    unet = _randomize(UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=8, context_dim=64), 1)
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=SCALE, **normalization), 2)
    module = diffusion_module(unet, text, vae, schedule=SCHEDULE, prediction_type="v_prediction", sampling=SAMPLING,
                              text_encoder_kwargs={"config": HF_TEXT}, ema_decay=None)
    path = tmp_path / f"{next(iter(normalization), 'plain')}.ckpt"
    torch.save({"ldm": module.describe(), "state_dict": module.state_dict(), "global_step": 1}, path)
    return path


def test_cli_takes_the_ema_weights_unless_no_ema(ldm_ckpt: Path, tmp_path: Path) -> None:
    state = read_checkpoint(ldm_ckpt)["state_dict"]
    name = "out.2.weight"
    assert not torch.equal(state[f"ema.{name}"], state[f"unet.{name}"])
    assert convert_main([str(ldm_ckpt), str(tmp_path / "ema.safetensors")]) == 0
    assert convert_main([str(ldm_ckpt), str(tmp_path / "raw.safetensors"), "--no-ema"]) == 0
    for file, key in (("ema.safetensors", "ema."), ("raw.safetensors", "unet.")):
        tensors, _ = read_sd_file(tmp_path / file)
        torch.testing.assert_close(tensors[f"model.diffusion_model.{name}"], state[key + name], rtol=0, atol=0)


def _bare_sd_file(ldm_ckpt: Path, path: Path, unet: UNet | None = None) -> None:
    """The checkpoint's model (or ``unet`` with its VAE and text encoder) as an SD file without ldm metadata, as
    other tools write it."""
    parts = load_parts(ldm_ckpt)
    save_state_dict(to_sd_state_dict(unet or parts.unet, parts.first_stage, parts.text_encoder), path)


def test_reading_an_sd_file_without_metadata_warns_that_heads_are_guessed(ldm_ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "bare.safetensors"
    # weights large enough for attention to be far from uniform, so the head count shows in the outputs
    reference = _randomize(UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=HEADS, context_dim=64), 5, std=0.3)
    _bare_sd_file(ldm_ckpt, path, reference)
    with pytest.warns(UserWarning, match=r"does not record the UNet's attention heads.*guessed num_heads=8"):
        guessed = load_sd_checkpoint(path)
    assert guessed.unet.config["num_heads"] == 8 and guessed.vae.config["scale_factor"] == 0.18215
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        told = load_sd_checkpoint(path, unet_kwargs={"num_heads": HEADS})
    _no_head_guess(record)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 64)
    with torch.no_grad():
        expected = reference(x, t, ctx)
        torch.testing.assert_close(told.unet.eval()(x, t, ctx), expected)
        wrong = guessed.unet.eval()(x, t, ctx)
    assert ((wrong - expected).norm() / expected.norm()).item() > 0.01


def test_cli_overrides_set_what_the_file_does_not_record(ldm_ckpt: Path, original: torch.Tensor,
                                                         tmp_path: Path) -> None:
    bare, fixed = tmp_path / "bare.safetensors", tmp_path / "fixed.safetensors"
    _bare_sd_file(ldm_ckpt, bare)
    argv = [str(bare), str(fixed), "--num-heads", str(HEADS), "--latent-scale", str(SCALE), "--latent-shift",
            str(SHIFT), "--prediction-type", "v", "--schedule", json.dumps(SCHEDULE)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert convert_main(argv) == 0
        loaded = load_sd_checkpoint(fixed)
    _no_head_guess(record)
    assert loaded.unet.config["num_heads"] == HEADS and loaded.unet.config["num_head_channels"] == -1
    assert (loaded.vae.config["scale_factor"], loaded.vae.config["shift_factor"]) == (SCALE, SHIFT)
    assert loaded.prediction_type == "v_prediction" and loaded.schedule == SCHEDULE
    # without overrides the guesses are not written down as if they were known: the next reader warns again
    relay = tmp_path / "relay.safetensors"
    with pytest.warns(UserWarning, match="guessed num_heads=8"):
        assert convert_main([str(bare), str(relay)]) == 0
    _, metadata = read_sd_file(relay)
    assert "ldm.unet" not in metadata and "ldm.vae" not in metadata
    pipe = LatentDiffusionPipeline.from_checkpoint(fixed)
    # the sampling defaults were lost with the metadata: sample with the original's
    pipe.sampling = load_parts(ldm_ckpt).sampling
    torch.testing.assert_close(_images(pipe), original, rtol=0, atol=1e-5)


def test_cli_errors_exit_2_with_one_line(ldm_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = subprocess.run([sys.executable, "-m", "ldm.convert", str(tmp_path / "missing.ckpt"),
                          str(tmp_path / "x.safetensors")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "missing.ckpt does not exist" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "x.safetensors").exists()
    assert convert_main([str(ldm_ckpt), str(tmp_path / "x.bin"), "--to", "sd"]) == 2
    assert "error: an SD single file ends in one of" in capsys.readouterr().err
    legacy = ROOT / "tests" / "fixtures" / "legacy_v1" / "ldm_last.ckpt"  # an unconditional model
    assert convert_main([str(legacy), str(tmp_path / "x.safetensors")]) == 2
    assert "error: the SD single-file layout holds text-conditioned UNets only" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_flow_model_converts_both_ways_with_its_objective_and_shift(tmp_path: Path) -> None:
    """A flow-matching checkpoint -> SD file and diffusers folder (FlowMatchEulerDiscreteScheduler) -> ldm: the
    objective, shift and flow_euler default travel, and the images are the same."""
    pytest.importorskip("diffusers")
    from ldm.diffusion.flow import FlowMatchingLoss
    from ldm.lightning.diffusion_module import LatentDiffusionModule
    from ldm.text import HFCLIPTextEncoder

    torch.manual_seed(0)
    text = HFCLIPTextEncoder(config=HF_TEXT)
    unet = _randomize(UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=HEADS, context_dim=64), 4)
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=SCALE), 5)
    module = LatentDiffusionModule(unet, text, vae, loss=FlowMatchingLoss(shift=3.0), ema=None,
                                   text_encoder_kwargs={"config": HF_TEXT})
    ckpt = tmp_path / "run" / "ldm" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"ldm": module.describe(), "state_dict": module.state_dict(), "global_step": 1}, ckpt)
    spec = {"objective": "flow_matching", "num_train_timesteps": 1000, "shift": 3.0, "resolution_shift": False}
    pipe = LatentDiffusionPipeline.from_checkpoint(ckpt)
    assert pipe.schedule == spec and pipe.sampling.sampler == "flow_euler"
    original = _images(pipe)

    folder, back = tmp_path / "diffusers", tmp_path / "back.ckpt"
    assert convert_main([str(ckpt), str(folder)]) == 0
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    assert convert_main([str(folder), str(back), "--to", "ldm"]) == 0
    parts = load_parts(back)
    assert parts.schedule == spec and parts.prediction_type == "flow" and parts.sampling.sampler == "flow_euler"
    torch.testing.assert_close(_images(LatentDiffusionPipeline.from_parts(parts)), original, rtol=0, atol=1e-5)

    sd = tmp_path / "flow.safetensors"
    assert convert_main([str(ckpt), str(sd)]) == 0
    from_sd = LatentDiffusionPipeline.from_checkpoint(sd)
    assert from_sd.schedule == spec and from_sd.prediction_type == "flow"
    torch.testing.assert_close(_images(from_sd), original, rtol=0, atol=1e-5)
