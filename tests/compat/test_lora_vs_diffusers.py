"""LoRA files against diffusers (the oracle): an adapter ldm writes in the diffusers or the kohya format loads into
diffusers' UNet2DConditionModel (and transformers' CLIP text model) with the same outputs; both formats read back
into ldm; merging changes nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import StableDiffusionPipeline  # noqa: E402

from ldm.convert import from_diffusers, to_diffusers  # noqa: E402
from ldm.lora import add_lora, load_lora, lora_layers, merge_lora, save_lora  # noqa: E402
from ldm.text import HFCLIPTextEncoder  # noqa: E402

SD1_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
SD2_TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, transformer_layers_per_block=2)
CLIP_TINY = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)
PROMPTS = ["a red circle in the top left", "a blue square"]


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def _randomize_lora_b(model: torch.nn.Module, seed: int) -> None:
    """peft starts B at zero (no change); random B makes every comparison able to fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unets(request):
    """(base UNet, the same UNet with random LoRA on attention, feed-forward, proj and convs, alpha != rank)."""
    cfg = SD1_TINY if request.param == "sd1" else SD2_TINY
    base = from_diffusers(_randomize(diffusers.UNet2DConditionModel(**cfg), 0)).eval()
    adapted = add_lora(copy.deepcopy(base), 4, alpha=8, targets=["transformer", "conv", "time_emb"])
    _randomize_lora_b(adapted, 1)
    return base, adapted, cfg["cross_attention_dim"]


@pytest.fixture(scope="module")
def texts():
    torch.manual_seed(0)
    base = _randomize(HFCLIPTextEncoder(config=CLIP_TINY), 2)
    adapted = add_lora(copy.deepcopy(base), 2, alpha=3, targets=["text_attention", "text_mlp"])
    _randomize_lora_b(adapted, 3)
    return base, adapted


def _inputs(ctx_dim: int):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 700]), torch.randn(2, 7, ctx_dim, generator=g)


@torch.no_grad()
def _ours(unet, ctx_dim: int) -> torch.Tensor:
    x, t, c = _inputs(ctx_dim)
    return unet(x, t, c)


@torch.no_grad()
def _theirs(unet, ctx_dim: int) -> torch.Tensor:
    x, t, c = _inputs(ctx_dim)
    return unet(x, t, encoder_hidden_states=c).sample


@torch.no_grad()
def _text_ours(text) -> torch.Tensor:
    return text.encode(PROMPTS).hidden


@torch.no_grad()
def _text_theirs(text, clip) -> torch.Tensor:
    ids, _ = text.tokenizer(PROMPTS)
    return clip(input_ids=ids).last_hidden_state


def test_the_adapter_changes_the_output(unets, texts) -> None:
    base, adapted, ctx = unets
    assert (_ours(base, ctx) - _ours(adapted, ctx)).abs().max() > 1e-2
    assert (_text_ours(texts[0]) - _text_ours(texts[1])).abs().max() > 1e-2


def test_diffusers_format_loads_into_diffusers(unets, texts, tmp_path: Path) -> None:
    base, adapted, ctx = unets
    text_base, text_adapted = texts
    path = save_lora(adapted, tmp_path / "lora.safetensors", format="diffusers", text_encoder=text_adapted)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    assert any(k.startswith("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A") for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B") for k in keys)

    # a bare UNet: diffusers' load_lora_adapter reads the file and its adapter metadata (alpha != rank)
    theirs = to_diffusers(copy.deepcopy(base)).eval()
    theirs.load_lora_adapter(str(path), prefix="unet", use_safetensors=True)
    torch.testing.assert_close(_theirs(theirs, ctx), _ours(adapted, ctx), atol=1e-5, rtol=1e-5)

    # the pipeline's own path: lora_state_dict + load_lora_into_unet / load_lora_into_text_encoder
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    theirs = to_diffusers(copy.deepcopy(base)).eval()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, theirs, metadata=meta)
    torch.testing.assert_close(_theirs(theirs, ctx), _ours(adapted, ctx), atol=1e-5, rtol=1e-5)
    clip = copy.deepcopy(text_base.model).eval()
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, clip, prefix="text_encoder", metadata=meta)
    torch.testing.assert_close(_text_theirs(text_base, clip), _text_ours(text_adapted), atol=1e-5, rtol=1e-5)


def test_kohya_format_loads_through_diffusers_conversion(unets, texts, tmp_path: Path) -> None:
    base, adapted, ctx = unets
    text_base, text_adapted = texts
    path = save_lora(adapted, tmp_path / "kohya.safetensors", format="kohya", text_encoder=text_adapted)
    from safetensors.torch import load_file

    raw = load_file(str(path))
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"} <= set(raw)
    assert float(raw[f"{q}.alpha"]) == 8.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in raw
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in raw
    assert raw["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (4, 32, 3, 3)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in raw)

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))  # diffusers' non-diffusers conversion
    assert any(k.startswith("unet.") for k in state) and alphas
    theirs = to_diffusers(copy.deepcopy(base)).eval()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, theirs)
    torch.testing.assert_close(_theirs(theirs, ctx), _ours(adapted, ctx), atol=1e-5, rtol=1e-5)
    clip = copy.deepcopy(text_base.model).eval()
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, clip, prefix="text_encoder")
    torch.testing.assert_close(_text_theirs(text_base, clip), _text_ours(text_adapted), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_each_format_reads_back_into_ldm(unets, texts, tmp_path: Path, fmt: str) -> None:
    base, adapted, ctx = unets
    text_base, text_adapted = texts
    path = save_lora(adapted, tmp_path / f"{fmt}.safetensors", format=fmt, text_encoder=text_adapted)
    unet = load_lora(copy.deepcopy(base), path)
    text = load_lora(copy.deepcopy(text_base), path)
    torch.testing.assert_close(_ours(unet, ctx), _ours(adapted, ctx), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_text_ours(text), _text_ours(text_adapted), atol=1e-6, rtol=1e-6)
    off = load_lora(copy.deepcopy(base), path, scale=0.0)  # the scale multiplies every update: 0 is the base
    torch.testing.assert_close(_ours(off, ctx), _ours(base, ctx), atol=1e-6, rtol=1e-6)
    half = load_lora(copy.deepcopy(base), path, scale=0.5)
    assert {layer.scaling["default"] for layer in lora_layers(half).values()} == {0.5 * 8 / 4}


def test_a_diffusers_trained_adapter_loads_into_ldm(unets, tmp_path: Path) -> None:
    """The other direction: an adapter diffusers' own save_lora_weights wrote gives ldm the same outputs."""
    base, _, ctx = unets
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = to_diffusers(copy.deepcopy(base)).eval()
    theirs.add_adapter(LoraConfig(r=3, lora_alpha=6, target_modules=["to_q", "to_v", "ff.net.2"]))
    _randomize_lora_b(theirs, 7)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs),
                                              unet_lora_adapter_metadata=theirs.peft_config["default"].to_dict())
    ours = load_lora(copy.deepcopy(base), tmp_path / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(_ours(ours, ctx), _theirs(theirs, ctx), atol=1e-5, rtol=1e-5)


def test_merge_gives_the_adapters_outputs(unets, texts) -> None:
    base, adapted, ctx = unets
    merged = merge_lora(copy.deepcopy(adapted))
    assert not lora_layers(merged) and not hasattr(merged, "peft_config")
    assert set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_ours(merged, ctx), _ours(adapted, ctx), atol=1e-5, rtol=1e-5)
    text = merge_lora(copy.deepcopy(texts[1]))
    torch.testing.assert_close(_text_ours(text), _text_ours(texts[1]), atol=1e-5, rtol=1e-5)
