"""Inpainting against diffusers (the oracle): a 9-channel UNet converts to and from diffusers and through an SD single
file with the same outputs, and LatentDiffusionPipeline inpaints as StableDiffusionInpaintPipeline does on the
converted weights (same scheduler, steps, guidance, noise), for the 9-channel model and the 4-channel blend."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")

from ldm.autoencoder import AutoencoderKL  # noqa: E402
from ldm.convert import (  # noqa: E402
    from_diffusers,
    load_sd_checkpoint,
    save_state_dict,
    schedule_to_diffusers,
    to_diffusers,
    to_sd_state_dict,
)
from ldm.diffusion.schedules import SD_SCHEDULE  # noqa: E402
from ldm.pipeline import LatentDiffusionPipeline  # noqa: E402
from tests.module_factory import randomize as _randomize  # noqa: E402

TINY = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
SIZE = 32  # pixels; the tiny VAE downsamples by 2
PROMPTS = ["a red circle", "a blue square"]


class FixedText(torch.nn.Module):
    """A text encoder with a fixed embedding per prompt, so diffusers can take the same ones as prompt_embeds."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.table = {p: torch.randn(5, dim, generator=g) for p in ["", *PROMPTS]}

    def encode(self, prompts: list[str]) -> SimpleNamespace:
        return SimpleNamespace(hidden=torch.stack([self.table[p] for p in prompts]))


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    """A tiny VAE whose posterior is (numerically) its mean: diffusers encodes with a posterior sample, ldm with the
    mode, and the two then agree."""
    vae = _randomize(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1), 2)
    with torch.no_grad():
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-30.0)  # log-variance: std 3e-7
    return vae


def _unet(in_channels: int, seed: int = 1):
    theirs = _randomize(diffusers.UNet2DConditionModel(in_channels=in_channels, **TINY), seed)
    return theirs, from_diffusers(theirs).eval()


def _inputs():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[4:20, 8:30] = 255
    mask[20:24, 8:30] = 128  # >= 0.5: repainted
    mask[24:26, 8:30] = 127  # < 0.5: kept
    return image, Image.fromarray(mask)


def test_nine_channel_unet_converts_to_and_from_diffusers() -> None:
    theirs, ours = _unet(9)
    assert ours.in_channels == 9 and ours.out_channels == 4
    g = torch.Generator().manual_seed(3)
    x, cond, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 16, 16, generator=g), \
        torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        expected = theirs(torch.cat([x, cond], dim=1), t, encoder_hidden_states=ctx).sample
        got = ours(x, t, ctx, concat=cond)
        back = to_diffusers(ours)
        assert back.config.in_channels == 9
        again = back(torch.cat([x, cond], dim=1), t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_nine_channel_unet_round_trips_through_an_sd_single_file(vae, tmp_path: Path) -> None:
    _, ours = _unet(9)
    path = tmp_path / "inpaint.safetensors"
    save_state_dict(to_sd_state_dict(ours, vae), path)
    loaded = load_sd_checkpoint(path, unet_kwargs={"num_heads": 2})
    assert loaded.unet.in_channels == 9
    g = torch.Generator().manual_seed(4)
    x, cond, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, 16, 16, generator=g), \
        torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, 500, ctx, concat=cond), ours(x, 500, ctx, concat=cond),
                                   rtol=0, atol=0)


def _diffusers_pipe(unet, vae, sampler: str):
    kw = schedule_to_diffusers(SD_SCHEDULE, "epsilon")
    scheduler = (diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing", **kw) if sampler == "ddim"
                 else diffusers.DPMSolverMultistepScheduler(**kw))
    return diffusers.StableDiffusionInpaintPipeline(vae=to_diffusers(vae).eval(), text_encoder=None, tokenizer=None,
                                                    unet=unet, scheduler=scheduler, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)


@pytest.mark.parametrize(("sampler", "strength", "in_channels"), [
    ("dpm_solver++", 1.0, 9), ("ddim", 0.75, 9), ("ddim", 1.0, 4)])
@torch.no_grad()
def test_pipeline_inpaints_as_diffusers(vae, sampler: str, strength: float, in_channels: int) -> None:
    theirs, ours = _unet(in_channels)
    text = FixedText(32)
    pipe = LatentDiffusionPipeline(ours, text, vae, SD_SCHEDULE, "epsilon", {"image_size": SIZE})
    image, mask = _inputs()
    steps, scale = 4, 7.5
    kw = dict(num_inference_steps=steps, guidance_scale=scale, height=SIZE, width=SIZE, strength=strength)
    shape = (2, 4, SIZE // 2, SIZE // 2)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(11)) if strength == 1.0 else None
    ref = _diffusers_pipe(theirs, vae, sampler)(
        prompt_embeds=text.encode(PROMPTS).hidden, negative_prompt_embeds=text.encode(["", ""]).hidden, image=image,
        mask_image=mask, latents=latents, generator=torch.Generator().manual_seed(5), output_type="latent", **kw
    ).images
    g = torch.Generator().manual_seed(5)
    if latents is None:  # diffusers first draws the image's posterior sample (1 image), then the noise
        torch.randn((1, *shape[1:]), generator=g)
    got = pipe(PROMPTS, image=image, mask_image=mask, latents=latents, generator=g, sampler=sampler,
               output_type="latent", legacy_inpaint=in_channels == 4, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
