"""The quickstart's two training steps (LDM and VAE) as closures, built from the repository's configs, for the
benchmarks that time them (host_memory.py, precision.py, token_embedding.py). ``dtype`` autocasts the forward as
Lightning's ``bf16-mixed`` does: weights, gradients and the optimizer stay float32."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _autocast(dtype: torch.dtype | None):
    return nullcontext() if dtype in (None, torch.float32) else torch.autocast("cpu", dtype=dtype)


def text_encoder_config(preset: str = "scratch_quickstart"):
    """A ``conf/text_encoder`` preset as Hydra composes it for ``train.py`` (its defaults list included)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"text_encoder={preset}", "out_dir=."]).text_encoder


def ldm_step(
    dtype: torch.dtype | None = None, text_encoder: str = "scratch_quickstart",
    train_token_embedding: bool | None = None, clip_norm: float | None = None,
) -> Callable[[], None]:
    """The quickstart's LDM step: its text encoder (``text_encoder``, a ``conf/text_encoder`` preset;
    ``train_token_embedding`` overrides the preset's) and the tiny UNet (cross-attention at 8x8) at batch 48, v-loss,
    fused AdamW over the parameters that train. ``clip_norm``: the gradients' norm computed and clipped to it before
    the step, as the stage does."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ldm.lightning.optim import grad_norm

    tcfg = text_encoder_config(text_encoder)
    if train_token_embedding is not None:
        tcfg.train_token_embedding = train_token_embedding
    text = instantiate(tcfg)
    ucfg = OmegaConf.load(ROOT / "conf/unet/tiny.yaml")
    ucfg.context_dim, ucfg.attention_resolutions = text.width, [1]
    unet = instantiate(ucfg)
    params = [p for p in (*unet.parameters(), *text.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    captions = ["a red circle at the top left"] * 24 + ["a blue square in the middle"] * 24
    x, target = torch.randn(48, 4, 8, 8), torch.randn(48, 4, 8, 8)
    t = torch.randint(0, 1000, (48,))

    def step() -> None:
        with _autocast(dtype):
            out = unet(x, t, text.encode(captions).hidden)
        loss = (out.float() - target).square().mean()
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, clip_norm, grad_norm(params))
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def vae_step(dtype: torch.dtype | None = None) -> Callable[[], None]:
    """The quickstart's VAE step: the tiny f4 autoencoder on 16 images of 32 px, L2 + KL, fused AdamW."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    vae = instantiate(OmegaConf.load(ROOT / "conf/autoencoder/tiny.yaml"))
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=True)
    x = torch.rand(16, 3, 32, 32) * 2 - 1

    def step() -> None:
        with _autocast(dtype):
            posterior = vae.encode(x)
            recon = vae.decode(posterior.sample())
        loss = (recon.float() - x).square().mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


STEPS = {"ldm": ldm_step, "vae": vae_step}
