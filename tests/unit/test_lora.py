"""ldm.lora: adding, saving, loading, scaling and merging adapters on our UNet and text encoders, and its errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from ldm.errors import ConfigError  # noqa: E402
from ldm.lora import (  # noqa: E402
    add_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    merge_lora,
    resolve_targets,
    save_lora,
    set_lora_scale,
)
from ldm.text import ScratchTextEncoder  # noqa: E402
from ldm.unet import UNet  # noqa: E402


def _unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(4, 4, 32, (1, 2), 1, (1,), num_heads=2, context_dim=16)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval()


def _randomize_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)


@torch.no_grad()
def _run(unet: UNet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900]), torch.randn(2, 3, 16, generator=g))


def test_add_lora_freezes_the_base_and_starts_as_the_identity() -> None:
    unet = _unet()
    before = _run(unet)
    add_lora(unet, 4)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    names = set(lora_layers(unet))
    assert names == set(resolve_targets(_unet()))  # the default: the attention projections
    assert {n.rsplit(".", 1)[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}
    torch.testing.assert_close(_run(unet), before)  # B = 0
    layer = next(iter(lora_layers(unet).values()))
    assert layer.scaling["default"] == 1.0  # alpha = None: alpha = rank
    assert set(lora_state_dict(unet)) == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}


def test_presets_and_module_names_select_layers() -> None:
    unet = _unet()
    conv = resolve_targets(unet, "conv")
    assert any(n.endswith("in_layers.2") for n in conv) and any(n.endswith(".op") for n in conv)
    assert resolve_targets(unet, ["ff.net.2"]) == sorted(n for n in resolve_targets(unet, "feed_forward")
                                                         if n.endswith("ff.net.2"))
    text = ScratchTextEncoder(width=16, layers=1, heads=2, context_length=8)
    assert resolve_targets(text) == ["blocks.0.attn.out", "blocks.0.attn.qkv"]


def test_errors_name_the_fix() -> None:
    unet = _unet()
    with pytest.raises(ConfigError, match=r"'to_qq' matches no Linear.*valid presets: attention, feed_forward"):
        add_lora(unet, 4, targets=["to_qq"])
    for rank in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
            add_lora(unet, rank)
    with pytest.raises(ConfigError, match="alpha must be a finite number > 0"):
        add_lora(unet, 4, alpha=0)
    with pytest.raises(ConfigError, match="dropout must lie in"):
        add_lora(unet, 4, dropout=1.0)
    assert not lora_layers(unet)  # nothing was injected by the refused calls
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        merge_lora(unet)
    add_lora(unet, 2)
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        add_lora(unet, 2)


def test_save_load_scale_merge_round_trip(tmp_path: Path) -> None:
    base = _unet()
    unet = add_lora(copy.deepcopy(base), 3, alpha=6, dropout=0.1, targets=["attention", "conv"])
    _randomize_b(unet)
    want = _run(unet)
    for fmt in ("diffusers", "kohya"):
        path = save_lora(unet, tmp_path / f"{fmt}.safetensors", format=fmt)
        torch.testing.assert_close(_run(load_lora(copy.deepcopy(base), path)), want)
    set_lora_scale(unet, 0.0)
    torch.testing.assert_close(_run(unet), _run(base))
    set_lora_scale(unet, 1.0)
    merged = merge_lora(unet)
    assert not lora_layers(merged) and set(merged.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_run(merged), want, atol=1e-5, rtol=1e-5)


def test_a_file_that_matches_nothing_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    unet = _unet()
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
               torch.zeros(4, 32), "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q.lora_up"
               ".weight": torch.zeros(32, 4)}, str(path))
    with pytest.raises(ConfigError, match="name no module of the unet"):
        load_lora(unet, path)
    save_file({"model.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ConfigError, match="is not a LoRA file"):
        load_lora(unet, path)
    with pytest.raises(ConfigError, match="no LoRA file at"):
        load_lora(unet, tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="unknown LoRA format"):
        save_lora(add_lora(unet, 2), tmp_path / "x.safetensors", format="ckpt")
