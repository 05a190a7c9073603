"""Checkpoint conversion against diffusers (the oracle) in both directions, SD single files, the CLI and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

from ldm.autoencoder import AutoencoderKL  # noqa: E402
from ldm.convert import (  # noqa: E402
    from_diffusers,
    infer_unet_config,
    load_sd_checkpoint,
    load_state_dict_checked,
    save_state_dict,
    to_diffusers,
    to_sd_state_dict,
    unet_config_from_diffusers,
)
from ldm.convert.__main__ import main as convert_main  # noqa: E402
from ldm.convert.diffusers_format import unet_config_to_diffusers  # noqa: E402
from ldm.convert.single_file import ema_key  # noqa: E402
from ldm.unet import UNet  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SD1_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=2)
SD2_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift",
                num_class_embeds=3)
VAE_TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _unet_inputs(ctx_dim: int, classes: bool = False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 5, ctx_dim, generator=g)
    return x, torch.tensor([3, 700]), ctx, (torch.tensor([0, 2]) if classes else None)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def diffusers_unet(request):
    cfg = SD1_TINY if request.param == "sd1" else SD2_TINY
    return _randomize(diffusers.UNet2DConditionModel(**cfg)), cfg


@pytest.fixture(scope="module")
def diffusers_vae():
    return _randomize(diffusers.AutoencoderKL(**VAE_TINY))


@torch.no_grad()
def test_unet_from_and_to_diffusers(diffusers_unet) -> None:
    theirs, cfg = diffusers_unet
    ours = from_diffusers(theirs).eval()
    x, t, ctx, y = _unet_inputs(cfg["cross_attention_dim"], "num_class_embeds" in cfg)
    expected = theirs(x, t, ctx, class_labels=y).sample
    assert _rel(ours(x, t, ctx, y), expected) <= 1e-4
    back = to_diffusers(ours).eval()
    assert _rel(back(x, t, ctx, class_labels=y).sample, expected) <= 1e-4


def test_dropout_is_in_the_residual_blocks_only_as_in_diffusers() -> None:
    """The UNet's dropout also dropped out inside every attention block (to_out, the feed-forward): a converted
    model then trained with other regularisation than diffusers' (and DDPM's, ADM's, SD's) residual-block dropout."""
    theirs = _randomize(diffusers.UNet2DConditionModel(**SD1_TINY, dropout=0.3))
    ours = from_diffusers(theirs)

    def dropouts(model: torch.nn.Module) -> int:
        return sum(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())

    assert dropouts(ours) == dropouts(theirs) == 8
    # in training mode with the residual blocks' dropout off, both are deterministic and equal
    for model in (ours, theirs):
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    x, t, ctx, _ = _unet_inputs(SD1_TINY["cross_attention_dim"])
    with torch.no_grad():
        assert _rel(ours(x, t, ctx), theirs(x, t, ctx).sample) <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("size", [(9, 7), (13, 10), (5, 5), (20, 12)])
def test_any_latent_size_matches_diffusers(size) -> None:
    """An odd size halved rounds up, and the upsampling meets the skip connection's size (diffusers'
    ``upsample_size``): 520 px at SD's factor 8 is a 65-latent. Sizes were refused unless multiples of 2**(levels-1)."""
    cfg = {**SD1_TINY, "block_out_channels": (32, 64, 64),
           "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}
    theirs = _randomize(diffusers.UNet2DConditionModel(**cfg))
    ours = from_diffusers(theirs).eval()
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, *size, generator=g), torch.randn(2, 5, 32, generator=g)
    expected = theirs(x, torch.tensor([3, 700]), ctx).sample
    assert expected.shape == x.shape and _rel(ours(x, torch.tensor([3, 700]), ctx), expected) <= 1e-4


@torch.no_grad()
def test_a_per_block_list_of_default_flags_converts() -> None:
    """diffusers accepts only_cross_attention=[False, False] (its default, per block); from_diffusers refused it."""
    theirs = _randomize(diffusers.UNet2DConditionModel(**SD1_TINY, only_cross_attention=[False, False]))
    x, t, ctx, _ = _unet_inputs(SD1_TINY["cross_attention_dim"])
    assert _rel(from_diffusers(theirs).eval()(x, t, ctx), theirs(x, t, ctx).sample) <= 1e-4
    with pytest.raises(ValueError, match=r"only_cross_attention=\[True, False\]"):
        unet_config_from_diffusers({**SD1_TINY, "only_cross_attention": [True, False], "in_channels": 4,
                                    "out_channels": 4})


def test_head_config_translation() -> None:
    sd1 = unet_config_from_diffusers(diffusers.UNet2DConditionModel(**SD1_TINY).config)
    assert (sd1["num_heads"], sd1["num_head_channels"], sd1["attention_resolutions"]) == (2, -1, [1])
    sd2 = unet_config_from_diffusers(diffusers.UNet2DConditionModel(**SD2_TINY).config)
    assert (sd2["num_heads"], sd2["num_head_channels"], sd2["attention_resolutions"]) == (-1, 16, [1, 2])
    with pytest.raises(ValueError, match="neither the head count nor the head width is constant"):
        unet_config_from_diffusers({**SD2_TINY, "attention_head_dim": (2, 8), "in_channels": 4, "out_channels": 4})
    with pytest.raises(ValueError, match="unsupported UNet2DConditionModel config: act_fn='gelu'"):
        unet_config_from_diffusers({**SD1_TINY, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="unsupported down block type"):
        unet_config_from_diffusers({**SD1_TINY, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")})


@torch.no_grad()
def test_vae_from_and_to_diffusers(diffusers_vae) -> None:
    ours = from_diffusers(diffusers_vae).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    theirs_post = diffusers_vae.encode(x).latent_dist
    ours_post = ours.encode(x)
    assert _rel(ours_post.mean, theirs_post.mean) <= 1e-4 and _rel(ours_post.std, theirs_post.std) <= 1e-4
    z = theirs_post.mean
    expected = diffusers_vae.decode(z).sample
    assert _rel(ours.decode(z), expected) <= 1e-4
    assert ours.state_dict()["encoder.mid.attn_1.q.weight"].ndim == 4
    assert _rel(to_diffusers(ours).decode(z).sample, expected) <= 1e-4
    assert ours.config["scale_factor"] == diffusers_vae.config.scaling_factor


@torch.no_grad()
def test_sd_state_dict_matches_diffusers_own_converter(diffusers_unet, diffusers_vae) -> None:
    theirs, cfg = diffusers_unet
    ours_unet, ours_vae = from_diffusers(theirs).eval(), from_diffusers(diffusers_vae).eval()
    sd = to_sd_state_dict(ours_unet, ours_vae, {"transformer.w": torch.zeros(1)})
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith("model.diffusion_model.") for k in sd if k.startswith("model."))
    # diffusers' own LDM -> diffusers converters read our single-file layout
    unet2 = diffusers.UNet2DConditionModel(**cfg).eval()
    unet2.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet2.config)), strict=True)
    x, t, ctx, y = _unet_inputs(cfg["cross_attention_dim"], "num_class_embeds" in cfg)
    assert _rel(unet2(x, t, ctx, class_labels=y).sample, theirs(x, t, ctx, class_labels=y).sample) <= 1e-4
    vae2 = diffusers.AutoencoderKL(**VAE_TINY).eval()
    vae_sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    vae2.load_state_dict(convert_ldm_vae_checkpoint(vae_sd, dict(vae2.config)), strict=True)
    z = torch.randn(1, 4, 8, 8)
    assert _rel(vae2.decode(z).sample, diffusers_vae.decode(z).sample) <= 1e-4


def _tiny_ours(seed: int = 0) -> tuple[UNet, AutoencoderKL]:
    unet = UNet(4, 4, 32, (1, 2), 1, (1, 2), num_heads=8, context_dim=32)  # num_heads=8: what inference assumes
    vae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    return _randomize(unet, seed), _randomize(vae, seed + 1)


def test_strict_loading_of_sd_layout_and_config_inference() -> None:
    unet, vae = _tiny_ours()
    sd = to_sd_state_dict(unet, vae)
    unet_sd = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    assert infer_unet_config(unet_sd) == {k: v for k, v in unet.config.items()
                                          if k not in ("dropout", "gradient_checkpointing", "attention_backend")}
    pooled = UNet(**{**unet.config, "pool_context": True})
    pooled_sd = {k[len("model.diffusion_model."):]: v for k, v in to_sd_state_dict(pooled, vae).items()
                 if k.startswith("model.diffusion_model.")}
    assert infer_unet_config(pooled_sd)["pool_context"] is True
    UNet(**infer_unet_config(pooled_sd)).load_state_dict(pooled_sd, strict=True)
    with pytest.raises(ValueError, match="pool_context=true .* has no UNet2DConditionModel equivalent"):
        unet_config_to_diffusers(pooled.config)
    fresh = UNet(**unet.config)
    fresh.load_state_dict(unet_sd, strict=True)
    bad = dict(unet_sd)
    bad.pop("out.2.weight")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \(first: \['out.2.weight'\]\), 1 unexpected keys "
                                         r"\(first: \['extra.weight'\]\)"):
        load_state_dict_checked(fresh, bad, "UNet")
    bad = dict(unet_sd, **{"out.2.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"1 shape mismatches \(first: \['out.2.bias: \(7,\) vs \(4,\)'\]\)"):
        load_state_dict_checked(fresh, bad, "UNet")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_load_sd_checkpoint_prefers_ema(tmp_path: Path, suffix: str) -> None:
    unet, vae = _tiny_ours()
    ema_unet, _ = _tiny_ours(seed=10)
    sd = to_sd_state_dict(unet, vae, {"transformer.text_model.w": torch.ones(2)})
    for k, v in to_sd_state_dict(ema_unet, vae).items():
        if k.startswith("model.diffusion_model."):
            sd[ema_key(k)] = v
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10)
    sd["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only, ignored
    path = tmp_path / f"model{suffix}"
    save_state_dict(sd, path)
    ckpt = load_sd_checkpoint(path)
    for k, v in ema_unet.state_dict().items():
        torch.testing.assert_close(ckpt.unet.state_dict()[k], v)
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(ckpt.vae.state_dict()[k], v)
    assert list(ckpt.cond_stage_state_dict) == ["transformer.text_model.w"]
    raw = load_sd_checkpoint(path, prefer_ema=False)
    torch.testing.assert_close(raw.unet.state_dict()["out.2.weight"], unet.state_dict()["out.2.weight"])
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(raw.unet.eval()(x, t, ctx), unet(x, t, ctx))
    assert load_sd_checkpoint(path, unet_kwargs={"num_head_channels": 16}).unet.config["num_heads"] == -1


def test_load_sd_checkpoint_errors(tmp_path: Path) -> None:
    unet, vae = _tiny_ours()
    with pytest.raises(FileNotFoundError):
        load_sd_checkpoint(tmp_path / "missing.ckpt")
    path = tmp_path / "unet_only.safetensors"
    save_state_dict({k: v for k, v in to_sd_state_dict(unet, vae).items() if k.startswith("model.")}, path)
    with pytest.raises(ValueError, match="not an SD single-file checkpoint.*0 'first_stage_model"):
        load_sd_checkpoint(path)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": to_sd_state_dict(unet, vae), "callbacks": {"cb": _Opaque()}}, pickled)
    with pytest.raises(ValueError, match="weights_only=True.*unsafe_pickle=True"):
        load_sd_checkpoint(pickled)
    with pytest.warns(UserWarning, match="trusted"):
        assert load_sd_checkpoint(pickled, unsafe_pickle=True).unet is not None
    with pytest.raises(ValueError, match="unknown checkpoint suffix"):
        save_state_dict({}, tmp_path / "x.bin")
    with pytest.raises(TypeError, match="from_diffusers supports"):
        from_diffusers(torch.nn.Linear(2, 2))


class _Opaque:
    """A pickled non-tensor object, like the Lightning callback state in some SD .ckpt files."""


def test_cli_round_trip(tmp_path: Path, diffusers_vae) -> None:
    unet = _randomize(diffusers.UNet2DConditionModel(**SD1_TINY))
    unet.save_pretrained(tmp_path / "src" / "unet")
    diffusers_vae.save_pretrained(tmp_path / "src" / "vae")
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "model.safetensors")]) == 0
    assert convert_main([str(tmp_path / "model.safetensors"), str(tmp_path / "back")]) == 0
    # the weights survive the round trip unchanged (the head count travels in the file's metadata)
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "back" / "unet")
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    back_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "back" / "vae").eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back_vae.decode(z).sample, diffusers_vae.decode(z).sample)
    # `python -m ldm.convert` from a single file to a .ckpt, in a fresh process
    out = subprocess.run([sys.executable, "-m", "ldm.convert", str(tmp_path / "model.safetensors"),
                          str(tmp_path / "model.ckpt")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert load_sd_checkpoint(tmp_path / "model.ckpt").vae is not None


SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD2 = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
           upcast_attention=True)


@pytest.mark.slow
@pytest.mark.parametrize("name,cfg", [("sd15", SD15), ("sd2", SD2)])
@torch.no_grad()
def test_full_size_unets(name: str, cfg: dict) -> None:
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**cfg).eval()
    ours = from_diffusers(theirs).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in theirs.parameters())
    if name == "sd15":
        assert n_params == 859_520_964
        assert (ours.config["num_heads"], ours.config["num_head_channels"]) == (8, -1)
    else:
        assert (ours.config["num_heads"], ours.config["num_head_channels"]) == (-1, 64)
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"])
    assert _rel(ours(x, t, ctx), theirs(x, t, ctx).sample) <= 1e-4


HF_TEXT_TINY = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=1, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
                    bos_token_id=49406, eos_token_id=49407)


@torch.no_grad()
def test_hf_text_encoder_goes_to_sd1_layout_and_back() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.convert import load_sd_text_encoder, text_encoder_sd_state_dict
    from ldm.text import HFCLIPTextEncoder

    torch.manual_seed(0)
    enc = HFCLIPTextEncoder(config=HF_TEXT_TINY).eval()
    sd = to_sd_state_dict(*_tiny_ours(), enc)
    text_sd = {k: v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    # SD 1.x's FrozenCLIPEmbedder: cond_stage_model.transformer = CLIPTextModel, whose text_model is the tower
    ref = CLIPTextModel(CLIPTextConfig(**HF_TEXT_TINY))
    tower = ref.text_model if hasattr(ref, "text_model") else ref  # transformers >= 5 flattens CLIPTextModel
    assert set(text_sd) == {f"cond_stage_model.transformer.text_model.{k}" for k in tower.state_dict()}
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight" in text_sd
    back = load_sd_text_encoder({k[len("cond_stage_model."):]: v for k, v in text_sd.items()})
    assert back.model.config.num_attention_heads == 1 and back.model.config.num_hidden_layers == 2
    a, b = enc.encode(["a red circle", ""]), back.encode(["a red circle", ""])
    torch.testing.assert_close(b.hidden, a.hidden, rtol=0, atol=0)
    proj = HFCLIPTextEncoder(config=HF_TEXT_TINY, with_projection=True)
    with pytest.warns(UserWarning, match="no text projection"):
        proj_sd = text_encoder_sd_state_dict(proj)
    assert set(proj_sd) == {k[len("cond_stage_model."):] for k in text_sd}


def test_text_encoder_layout_errors_and_config_inference() -> None:
    from ldm.convert import infer_clip_text_config, infer_open_clip_text_config, load_sd_text_encoder
    from ldm.text import ScratchTextEncoder

    unet, vae = _tiny_ours()
    with pytest.raises(TypeError, match="no place for a ScratchTextEncoder"):
        to_sd_state_dict(unet, vae, ScratchTextEncoder(width=32, layers=1, heads=2, context_length=8))
    with pytest.raises(ValueError, match="unknown SD text encoder layout"):
        load_sd_text_encoder({"transformer.w": torch.zeros(1)})
    # full-size shapes on the meta device: CLIP ViT-L/14 (SD 1.x) and OpenCLIP ViT-H/14 (SD 2.x)
    meta = dict(device="meta")
    vit_l = {"transformer.text_model.embeddings.token_embedding.weight": torch.empty(49408, 768, **meta),
             "transformer.text_model.embeddings.position_embedding.weight": torch.empty(77, 768, **meta)}
    for i in range(12):
        vit_l[f"transformer.text_model.encoder.layers.{i}.mlp.fc1.weight"] = torch.empty(3072, 768, **meta)
    cfg = infer_clip_text_config(vit_l)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"],
            cfg["max_position_embeddings"], cfg["vocab_size"]) == (768, 12, 12, 3072, 77, 49408)
    vit_h = {"model.token_embedding.weight": torch.empty(49408, 1024, **meta),
             "model.positional_embedding": torch.empty(77, 1024, **meta),
             "model.text_projection": torch.empty(1024, 1024, **meta)}
    for i in range(24):
        vit_h[f"model.transformer.resblocks.{i}.mlp.c_fc.weight"] = torch.empty(4096, 1024, **meta)
    assert infer_open_clip_text_config(vit_h) == dict(
        embed_dim=1024, text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24,
                                      mlp_ratio=4.0))
