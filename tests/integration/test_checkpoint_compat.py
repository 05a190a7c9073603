"""Checkpoints written before the checkpoint owner (format 1: EMA as ``ema.shadow_<i>``, no format number, a
``latent_shape`` in the sampling defaults) still load, sample the same images, and resume.

The fixture was written by the previous release's ``train.py`` (a VAE, then an unconditional LDM with EMA and an
autoguidance snapshot, 8-px shapes); ``expected.pt`` holds what that release's pipeline generated from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint import FORMAT_VERSION, ema_weights, load_parts, read_checkpoint
from ldm.pipeline import LatentDiffusionPipeline

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_v1"
CKPT = FIXTURE / "ldm_last.ckpt"


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(2)]


@pytest.mark.parametrize("use_ema", [True, False])
def test_a_format_1_checkpoint_samples_what_it_sampled_before(use_ema: bool) -> None:
    expected = torch.load(FIXTURE / "expected.pt", weights_only=True)
    pipe = LatentDiffusionPipeline.from_checkpoint(CKPT, use_ema=use_ema)
    assert pipe.guide_unet is not None and pipe.sampling.guidance_interval == (400.0, 1000.0)
    out = pipe(["", ""], num_inference_steps=3, generator=generators(), output_type="tensor")
    torch.testing.assert_close(out, expected[f"ema={use_ema}"], rtol=1e-5, atol=1e-5)
    auto = pipe(["", ""], num_inference_steps=3, generator=generators(), output_type="tensor",
                autoguidance_scale=2.0, sampler="ddpm")
    torch.testing.assert_close(auto, expected[f"ema={use_ema},auto=2,ddpm"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, auto)


def test_format_1_ema_maps_to_the_parameter_names() -> None:
    ckpt = read_checkpoint(CKPT)
    assert "format" not in ckpt["ldm"] and "ema.shadow_0" in ckpt["state_dict"]
    parts = load_parts(CKPT, use_ema=False)
    ema = ema_weights(ckpt["state_dict"], parts.unet)
    names = [n for n, p in parts.unet.named_parameters() if p.is_floating_point()]
    assert list(ema) == names
    torch.testing.assert_close(ema[names[0]], ckpt["state_dict"]["ema.shadow_0"])
    with_ema = load_parts(CKPT, use_ema=True)
    last = ckpt["state_dict"][f"ema.shadow_{len(names) - 1}"]
    torch.testing.assert_close(with_ema.unet.get_parameter(names[-1]), last)
    assert not torch.equal(with_ema.unet.get_parameter(names[-1]), parts.unet.get_parameter(names[-1]))


def test_a_format_1_checkpoint_resumes_into_the_current_module(tmp_path: Path) -> None:
    """Lightning's restore path: the EMA accepts the old ``shadow_<i>`` keys and saves them by name."""
    from ldm.checkpoint import build_module
    from ldm.nn.ema import EMA

    ckpt = read_checkpoint(CKPT)
    unet = build_module(ckpt["ldm"]["unet"])
    ema = EMA(unet, decay=0.9)
    ema.load_state_dict({k[len("ema."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")})
    assert int(ema.num_updates) == int(ckpt["state_dict"]["ema.num_updates"]) > 0
    saved = ema.state_dict()
    first = next(n for n, _ in unet.named_parameters())
    assert first in saved and "shadow_0" not in saved
    torch.testing.assert_close(saved[first], ckpt["state_dict"]["ema.shadow_0"])
    assert FORMAT_VERSION == 2
