"""Conversion edge cases a review found: what a model carries through SD files, diffusers folders and ldm checkpoints
(the tokenizer's pad id, the default resolution, the prediction type), an export interrupted half-way, diffusers'
weight-file variants, and the errors that damaged or foreign files give. diffusers and transformers are the oracles.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldm.checkpoint import load_init_checkpoint, load_parts, read_checkpoint  # noqa: E402
from ldm.convert import (  # noqa: E402
    from_diffusers,
    load_sd_checkpoint,
    save_state_dict,
    sd_metadata,
    to_sd_state_dict,
)
from ldm.convert.__main__ import main as convert_main  # noqa: E402
from ldm.errors import ConfigError  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from ldm.text import HFCLIPTextEncoder  # noqa: E402
from ldm.text.tokenizer import HF_CLIP_PAD_ID, CLIPTokenizer  # noqa: E402
from tests.compat.test_convert import SD1_TINY, VAE_TINY, _randomize  # noqa: E402

UNET = {**SD1_TINY, "cross_attention_dim": 64}  # the CLIP tower's width
VAE = VAE_TINY
CLIP = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
VAE_SCALE_FACTOR = 2 ** (len(VAE["block_out_channels"]) - 1)  # diffusers' StableDiffusionPipeline.vae_scale_factor
PROMPT = "a red circle"


def _diffusers_parts(seed: int = 0, **unet):
    return (_randomize(diffusers.UNet2DConditionModel(**{**UNET, **unet}), seed),
            _randomize(diffusers.AutoencoderKL(**VAE), seed + 1))


def _text(seed: int = 3, **kwargs) -> HFCLIPTextEncoder:
    torch.manual_seed(seed)
    return HFCLIPTextEncoder(config=kwargs.pop("config", CLIP), **kwargs).eval()


def _sd_file(path: Path, seed: int = 0, metadata: dict | None = None, text: HFCLIPTextEncoder | None = None) -> Path:
    """An SD single file of a tiny SD 1.x-like model; without ``metadata``, like a file from another tool."""
    unet, vae = (from_diffusers(m) for m in _diffusers_parts(seed))
    save_state_dict(to_sd_state_dict(unet, vae, text or _text()), path, metadata)
    return path


def _folder(path: Path, seed: int = 0, **unet) -> Path:
    """A diffusers folder (unet/, vae/, text_encoder/) of a tiny SD 1.x-like model."""
    u, v = _diffusers_parts(seed, **unet)
    u.save_pretrained(path / "unet")
    v.save_pretrained(path / "vae")
    _text().model.save_pretrained(path / "text_encoder")
    return path


# ----------------------------------------------------------------------------------------------- tokenizer pad id


@torch.no_grad()
def test_an_sd2_style_folder_that_pads_with_bang_gives_diffusers_context_on_every_position(tmp_path: Path) -> None:
    """SD 2.x diffusers folders pad with '!' (id 0): the converted model's context equals what diffusers' pipeline
    encodes with the folder's tokenizer and text encoder, padded positions included (they were 49407 before)."""
    src = _folder(tmp_path / "sd2")
    _text(config={**CLIP, "hidden_act": "gelu"}).model.save_pretrained(src / "text_encoder")  # SD 2.x's activation
    CLIPTokenizer(context_length=77, pad_token_id=0).save_transformers_files(src / "tokenizer")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(src / "tokenizer")
    assert tokenizer.pad_token_id == 0
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(src / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(src / "text_encoder"), tokenizer=tokenizer,
        unet=diffusers.UNet2DConditionModel.from_pretrained(src / "unet"), scheduler=diffusers.DDPMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    for dst in ("m.safetensors", "m.ckpt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heads guessed, SD schedule assumed: not what this test is about
            assert convert_main([str(src), str(tmp_path / dst)] + (["--to", "ldm"] if dst == "m.ckpt" else [])) == 0
            text = load_parts(tmp_path / dst).text_encoder
        assert text.tokenizer.pad_token_id == 0, dst
        torch.testing.assert_close(text.encode([PROMPT]).hidden, theirs, rtol=0, atol=1e-5)


def test_the_pad_id_of_an_ldm_text_encoder_survives_an_sd_file(tmp_path: Path) -> None:
    """HFCLIPTextEncoder(pad_token_id=0) -> SD file (ldm metadata) -> load_parts keeps pad id 0; a file without the
    entry (another tool's) reads with SD 1.x's 49407."""
    unet, vae = (from_diffusers(m) for m in _diffusers_parts())
    own = _text(pad_token_id=0)
    path = tmp_path / "own.safetensors"
    save_state_dict(to_sd_state_dict(unet, vae, own), path, sd_metadata(unet, vae, "epsilon", None, None, own))
    assert load_parts(path).text_encoder.tokenizer.pad_token_id == 0
    assert convert_main([str(path), str(tmp_path / "own.ckpt"), "--to", "ldm"]) == 0
    assert load_parts(tmp_path / "own.ckpt").text_encoder.tokenizer.pad_token_id == 0
    with pytest.warns(UserWarning, match="attention heads"):
        other = load_parts(_sd_file(tmp_path / "other.safetensors", text=own))
    assert other.text_encoder.tokenizer.pad_token_id == HF_CLIP_PAD_ID


# ------------------------------------------------------------------------------------------- default resolution


def test_an_sd_file_converted_to_ldm_keeps_its_default_resolution(tmp_path: Path) -> None:
    """An SD file without metadata samples at 512 px read directly; its ldm checkpoint did at 32 px."""
    sd = _sd_file(tmp_path / "v1-5-like.safetensors")
    assert convert_main([str(sd), str(tmp_path / "v15.ckpt"), "--to", "ldm", "--num-heads", "2"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = LatentDiffusionPipeline.from_checkpoint(sd).check_call(["x"])
    converted = LatentDiffusionPipeline.from_checkpoint(tmp_path / "v15.ckpt").check_call(["x"])
    assert (converted.height, converted.width) == (direct.height, direct.width) == (512, 512)


def test_a_diffusers_folder_keeps_its_sample_size_both_ways(tmp_path: Path) -> None:
    """diffusers samples at unet.config.sample_size * vae_scale_factor: that is the ldm checkpoint's image size, and
    writing a folder gives sample_size = image_size // factor (it was always 64)."""
    src = _folder(tmp_path / "src", sample_size=96)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert convert_main([str(src), str(tmp_path / "m.ckpt"), "--to", "ldm"]) == 0
    assert load_parts(tmp_path / "m.ckpt").sampling.image_size == 96 * VAE_SCALE_FACTOR
    for source in (src, tmp_path / "m.ckpt"):
        dst = tmp_path / f"back_{source.stem}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert convert_main([str(source), str(dst)]) == 0
        assert diffusers.UNet2DConditionModel.load_config(dst / "unet")["sample_size"] == 96, source
        assert diffusers.AutoencoderKL.load_config(dst / "vae")["sample_size"] == 96 * VAE_SCALE_FACTOR, source


# ------------------------------------------------------------------------------------------------ prediction type


def test_prediction_type_reaches_a_folder_written_from_a_file_without_metadata(tmp_path: Path) -> None:
    """--prediction-type with an SD file from another tool: the folder gets scheduler/ with SD's schedule (and a
    warning saying so) and that prediction type, as --to ldm does; before, no scheduler/ was written."""
    sd = _sd_file(tmp_path / "other_tool.safetensors")
    with pytest.warns(UserWarning, match="records no noise schedule"):
        assert convert_main([str(sd), str(tmp_path / "folder"), "--prediction-type", "v_prediction",
                             "--num-heads", "2"]) == 0
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path / "folder", subfolder="scheduler")
    sd_scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert theirs.config.prediction_type == "v_prediction"
    torch.testing.assert_close(theirs.alphas_cumprod, sd_scheduler.alphas_cumprod)
    assert convert_main([str(tmp_path / "folder"), str(tmp_path / "back.ckpt"), "--to", "ldm"]) == 0
    assert read_checkpoint(tmp_path / "back.ckpt")["ldm"]["prediction_type"] == "v_prediction"


# ------------------------------------------------------------------------------------------- atomic folder export


def _conv_in(folder: Path) -> torch.Tensor:
    return diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").state_dict()["conv_in.weight"]


def test_an_interrupted_folder_export_leaves_the_previous_one_whole(tmp_path: Path, monkeypatch) -> None:
    """The export is written beside DST and renamed over it when complete: killed half-way, DST is the previous
    export (or absent), never a mix of two models; a finished export replaces the folder as a whole."""
    unet, vae = (from_diffusers(m) for m in _diffusers_parts())  # the configs the metadata records
    schedule = {"schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    a = _sd_file(tmp_path / "A.safetensors", 0, sd_metadata(unet, vae, "v_prediction", schedule, None, _text()))
    b = _sd_file(tmp_path / "B.safetensors", 100, sd_metadata(unet, vae, "epsilon", schedule, None, _text()))
    dst = tmp_path / "exported"
    assert convert_main([str(a), str(dst)]) == 0
    a_conv_in = _conv_in(dst)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing vae/")

    with monkeypatch.context() as m:
        m.setattr(diffusers.AutoencoderKL, "save_pretrained", killed)
        for target in (dst, tmp_path / "fresh"):
            with pytest.raises(KeyboardInterrupt):
                convert_main([str(b), str(target)])
    assert not (tmp_path / "fresh").exists()
    torch.testing.assert_close(_conv_in(dst), a_conv_in, rtol=0, atol=0)
    assert json.loads((dst / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
    # a finished export of B over A (no model_index.json is due with a latent shift): nothing of A stays
    assert convert_main([str(b), str(dst), "--latent-shift", "0.1"]) == 0
    assert not (dst / "model_index.json").exists() and not (dst / "tokenizer").exists()
    assert not torch.equal(_conv_in(dst), a_conv_in)
    # a folder that is not a diffusers model is not replaced
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert convert_main([str(b), str(other)]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


# ------------------------------------------------------------------------------------ text encoder weight variants


@pytest.mark.parametrize("how", ["fp16 variant", "sharded"])
def test_a_text_encoder_saved_as_a_variant_or_in_shards_is_converted(tmp_path: Path, how: str) -> None:
    """transformers' save_pretrained(variant="fp16") writes model.fp16.safetensors, max_shard_size a sharded index:
    the text encoder was silently left out of the SD file."""
    src = _folder(tmp_path / "src")
    for f in (src / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    text = _text().model
    if how == "fp16 variant":
        text.half().save_pretrained(src / "text_encoder", variant="fp16")
    else:
        text.save_pretrained(src / "text_encoder", max_shard_size="100KB")
        assert len(list((src / "text_encoder").glob("*.safetensors"))) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert convert_main([str(src), str(tmp_path / "m.safetensors"), "--num-heads", "2"]) == 0
    ours = load_parts(tmp_path / "m.safetensors").text_encoder
    reference = transformers.CLIPTextModel.from_pretrained(src / "text_encoder", variant="fp16" if "fp16" in how
                                                           else None).float()
    ids = ours.tokenizer([PROMPT])[0]
    with torch.no_grad():
        torch.testing.assert_close(ours.encode([PROMPT]).hidden, reference(ids).last_hidden_state, rtol=0, atol=1e-5)


def test_a_text_encoder_with_a_projection_head_is_converted_without_it(tmp_path: Path) -> None:
    """ldm writes an HFCLIPTextEncoder(with_projection=True) as transformers' CLIPTextModelWithProjection: reading
    the folder back dropped the whole text encoder (a warning only); now the tower converts, the head is named."""
    src = _folder(tmp_path / "src")
    for f in (src / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    _text(with_projection=True, config={**CLIP, "projection_dim": 16}).model.save_pretrained(src / "text_encoder")
    with pytest.warns(UserWarning, match="holds a text projection .*text_projection.weight.* not converted"):
        assert convert_main([str(src), str(tmp_path / "m.safetensors"), "--num-heads", "2"]) == 0
    ours = load_parts(tmp_path / "m.safetensors").text_encoder
    assert ours is not None
    reference = transformers.CLIPTextModelWithProjection.from_pretrained(src / "text_encoder")
    ids = ours.tokenizer([PROMPT])[0]
    with torch.no_grad():
        torch.testing.assert_close(ours.encode([PROMPT]).hidden, reference(ids).last_hidden_state, rtol=0, atol=1e-5)


def test_a_text_encoder_folder_without_weights_is_an_error(tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path / "src")
    for f in (src / "text_encoder").glob("model*.safetensors"):
        f.unlink()
    assert convert_main([str(src), str(tmp_path / "m.safetensors"), "--num-heads", "2"]) == 2
    assert "text_encoder holds no weights" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


# ----------------------------------------------------------------------------------------------- bad input files


class _Callback:
    """Stands in for the Lightning callback that CompVis' sd-v1-4.ckpt pickles."""


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"truncated{path.suffix}")
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_a_truncated_file_says_so_and_offers_no_unpickling(tmp_path: Path, capsys, suffix: str) -> None:
    cut = _truncated(_sd_file(tmp_path / f"full{suffix}"))
    for read in (load_sd_checkpoint, load_parts, load_init_checkpoint):
        with pytest.raises(ConfigError, match=rf"{cut} is truncated or corrupt .*copy it again") as err:
            read(cut)
        assert "unsafe" not in str(err.value), read
    for flags in ([], ["--unsafe-pickle"]):
        assert convert_main([str(cut), str(tmp_path / "o.safetensors"), *flags]) == 2
        assert "truncated or corrupt" in capsys.readouterr().err


def test_an_sd_ckpt_that_pickles_a_foreign_object_names_the_one_off_conversion(tmp_path: Path, capsys) -> None:
    """Every reader names the command that reads the file once and writes a .safetensors; the command works."""
    unet, vae = (from_diffusers(m) for m in _diffusers_parts())
    path = tmp_path / "sd-v1-4-like.ckpt"
    torch.save({"state_dict": to_sd_state_dict(unet, vae, _text()), "callbacks": {"cb": _Callback()}}, path)
    fix = f"python -m ldm.convert --unsafe-pickle {path} {path.with_suffix('.safetensors')}"
    for read in (load_parts, load_init_checkpoint, load_sd_checkpoint):
        with pytest.raises(ConfigError, match="pickled objects beyond tensors") as err:
            read(path)
        assert fix in str(err.value), read
    assert convert_main([str(path), str(tmp_path / "x.safetensors")]) == 2
    assert fix in capsys.readouterr().err
    with pytest.warns(UserWarning, match="trusted"):
        assert convert_main(fix.split()[3:] + ["--num-heads", "2"]) == 0
    assert load_parts(path.with_suffix(".safetensors")).unet.config["num_heads"] == 2


def test_a_damaged_or_unconditional_sd_file_names_the_missing_key(tmp_path: Path) -> None:
    unet, vae = (from_diffusers(m) for m in _diffusers_parts())
    full = to_sd_state_dict(unet, vae, _text())
    cross = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    resnet = "model.diffusion_model.input_blocks.1.0.out_layers.3.weight"
    unconditional = {k: v for k, v in full.items()
                     if not k.startswith(("model.diffusion_model.middle_block.1.", "cond_stage_model."))}
    unconditional["model.diffusion_model.middle_block.1.qkv.weight"] = torch.zeros(192, 64, 1)
    cases = {"damaged": ({k: v for k, v in full.items() if k != cross}, cross),
             "damaged2": ({k: v for k, v in full.items() if k != resnet}, resnet),
             "unconditional": (unconditional, cross)}
    for name, (state, key) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_state_dict(state, path)
        with pytest.raises(ConfigError, match=rf"{path}: .*missing {key}"):
            load_parts(path)
        assert convert_main([str(path), str(tmp_path / "o.safetensors"), "--num-heads", "2"]) == 2


@pytest.mark.parametrize("name,content", [("config.yaml", b"model:\n  lr: 1e-4\n"), ("notes.txt", b"hello\n"),
                                          ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(64))])
def test_a_file_that_is_no_checkpoint_at_all_says_so(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    for mmap in (False, True):
        with pytest.raises(ConfigError, match=rf"{path} is not a checkpoint torch can read \(.*\): give "
                                              r"RUN/ldm/checkpoints/last.ckpt or an SD .ckpt/.safetensors"):
            read_checkpoint(path, mmap=mmap)
    with pytest.raises(ConfigError, match="is not a checkpoint torch can read"):
        load_parts(path)


# --------------------------------------------------------------------------------------- diffusers-only UNet flags


def test_upcast_attention_of_an_sd21_folder_survives_sd_files_and_ldm_checkpoints(tmp_path: Path) -> None:
    """SD 2.1's UNet has upcast_attention=True (float32 attention scores in half precision), which ldm's UNet has no
    setting for: it travels in the metadata (ldm.diffusers, the ldm header) back to the folder; before, it came
    back False."""
    src = _folder(tmp_path / "src", upcast_attention=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in (("src", "m.safetensors"), ("m.safetensors", "back"), ("src", "m.ckpt"), ("m.ckpt", "back2")):
            to = ["--to", "ldm"] if b == "m.ckpt" else []
            assert convert_main([str(tmp_path / a), str(tmp_path / b), *to]) == 0
    for folder in (src, tmp_path / "back", tmp_path / "back2"):
        assert diffusers.UNet2DConditionModel.load_config(folder / "unet")["upcast_attention"] is True, folder
    plain = _folder(tmp_path / "plain")
    assert convert_main([str(plain), str(tmp_path / "plain_back")]) == 0
    assert diffusers.UNet2DConditionModel.load_config(tmp_path / "plain_back" / "unet")["upcast_attention"] is False


def test_a_text_encoder_of_another_configuration_than_the_files_is_refused(tmp_path: Path) -> None:
    """The SD layout's text weights load into any head count, clip_skip or pad id: a file whose ldm metadata
    records others than the run's encoder is refused, naming each, as the UNet's heads are; the same settings load."""
    from ldm.convert import init_from_sd

    unet, vae = (from_diffusers(m) for m in _diffusers_parts(0))
    src = _text(config={**CLIP, "num_attention_heads": 2}, clip_skip=2, pad_token_id=0)
    path = tmp_path / "m.safetensors"
    save_state_dict(to_sd_state_dict(unet, vae, src), path, sd_metadata(unet, vae, text_encoder=src))
    sd = load_sd_checkpoint(path)
    run_unet = from_diffusers(_diffusers_parts(0)[0])
    with pytest.raises(ConfigError, match=r"clip_skip: the file's 2, the run's 1, config.num_attention_heads: the "
                                          r"file's 2, the run's 1, pad_token_id: the file's 0, the run's 49407"):
        init_from_sd(sd, str(path), run_unet, _text())
    same = _text(config={**CLIP, "num_attention_heads": 2}, clip_skip=2, pad_token_id=0)
    assert init_from_sd(sd, str(path), run_unet, same)[-1] == "text encoder"
    with torch.no_grad():
        torch.testing.assert_close(same.encode([PROMPT]).hidden, src.encode([PROMPT]).hidden, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- wrong input


def test_a_checkpoint_that_cannot_be_sampled_is_a_config_error_not_a_traceback(tmp_path: Path) -> None:
    """An SD file without text encoder weights, an ldm checkpoint of a newer format and one whose weights lack a key
    are ConfigErrors naming the file and the fix, which sample.py and the judges print in one line (exit 2)."""
    unet, vae = (from_diffusers(m) for m in _diffusers_parts())
    no_text = tmp_path / "no_text.safetensors"
    save_state_dict(to_sd_state_dict(unet, vae), no_text, sd_metadata(unet, vae))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(no_text))} has no text encoder weights .* give a "
                                          "complete SD file"):
        load_parts(no_text)
    sd = _sd_file(tmp_path / "m.safetensors")
    assert convert_main([str(sd), str(tmp_path / "m.ckpt"), "--to", "ldm", "--num-heads", "2"]) == 0
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    newer = tmp_path / "newer.ckpt"
    torch.save({**ckpt, "ldm": {**ckpt["ldm"], "format": 99}}, newer)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(newer))} was written in checkpoint format 99, newer "
                                          r"than this ldm reads \(2\): upgrade ldm"):
        load_parts(newer)
    damaged = tmp_path / "damaged.ckpt"
    key = next(k for k in ckpt["state_dict"] if k.startswith("unet."))
    torch.save({**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if k != key}}, damaged)
    with pytest.raises(ConfigError, match=rf"{re.escape(str(damaged))}: the weights for the UNet do not fit .*"
                                          rf"{re.escape(key[len('unet.'):])}"):
        load_parts(damaged)


@pytest.mark.parametrize("flag,value", [("--num-heads", "0"), ("--num-head-channels", "-1"), ("--latent-scale", "0"),
                                        ("--latent-scale", "nan"), ("--latent-shift", "inf")])
def test_a_head_count_or_latent_normalisation_out_of_range_is_refused(tmp_path: Path, capsys, flag: str,
                                                                      value: str) -> None:
    """A zero or negative head count used to end in the UNet's traceback, and a latent scale of 0 or nan was written
    into a model whose decoder then gave non-finite images: argparse refuses them (exit 2) and writes nothing."""
    sd = _sd_file(tmp_path / "m.safetensors")
    with pytest.raises(SystemExit) as exit_:
        convert_main([str(sd), str(tmp_path / "o.safetensors"), flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_a_head_count_that_changes_the_weights_shapes_is_a_config_error(tmp_path: Path, capsys) -> None:
    """--num-heads on a diffusers folder or ldm checkpoint rebuilds the UNet: 3 heads of 32 channels give 30-wide
    projections, which the weights do not fit; an error naming the flag, not load_state_dict's traceback."""
    folder = _folder(tmp_path / "src")
    assert convert_main([str(folder), str(tmp_path / "o.safetensors"), "--num-heads", "3"]) == 2
    assert "give --num-heads a divisor of every attention level's width" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
