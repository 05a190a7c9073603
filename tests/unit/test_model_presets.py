"""The conf/unet and conf/autoencoder presets instantiate through Hydra and run on their intended shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.autoencoder import AutoencoderKL
from ldm.unet import UNet

CONF = Path(__file__).resolve().parents[2] / "conf"


def _build(group: str, name: str):
    return instantiate(OmegaConf.load(CONF / group / f"{name}.yaml"))


@torch.no_grad()
def test_tiny_presets_run_together() -> None:
    vae, unet = _build("autoencoder", "tiny"), _build("unet", "tiny")
    assert isinstance(vae, AutoencoderKL) and isinstance(unet, UNet)
    z = vae.encode_latents(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 4, 8, 8)
    assert unet(z, torch.tensor([1, 2]), torch.randn(2, 7, 256)).shape == z.shape


@pytest.mark.parametrize("group,name", [("unet", "small"), ("autoencoder", "kl_f8")])
def test_medium_presets_instantiate(group: str, name: str) -> None:
    model = _build(group, name)
    assert isinstance(model, UNet if group == "unet" else AutoencoderKL)


@pytest.mark.slow
@pytest.mark.parametrize("name,params", [("sd15", 859_520_964), ("sd2", None)])
def test_sd_unet_presets(name: str, params: int | None) -> None:
    unet = _build("unet", name)
    if params is not None:
        assert sum(p.numel() for p in unet.parameters()) == params
