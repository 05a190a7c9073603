"""Build a LatentDiffusionModule from the flat settings of a stage config (as ldm.lightning.stages does), so the
tests read like the config they mirror."""

from __future__ import annotations

import torch

from ldm.diffusion import DiffusionLoss, NoiseSchedule, SamplingDefaults
from ldm.lightning.diffusion_module import LatentDiffusionModule, NaNPolicy
from ldm.lightning.optim import LRSchedule
from ldm.nn.ema import EMASettings


def diffusion_module(unet, text_encoder=None, first_stage=None, *, schedule: dict | None = None,
                     prediction_type: str = "epsilon", loss_weighting: str = "uniform", snr_gamma: float = 5.0,
                     offset_noise: float = 0.0, timestep_shift: float = 1.0, lr_schedule: str = "constant",
                     warmup_steps: int = 0, max_steps: int = 1, lr_decay_fraction: float = 0.2,
                     ema_decay: float | None = 0.9999, ema_warmup: bool = True, nan_policy: str = "stop",
                     max_nan_skips: int = 10, sampling: dict | None = None, **kwargs) -> LatentDiffusionModule:
    loss = DiffusionLoss(NoiseSchedule.from_name(**(schedule or {})), prediction_type, loss_weighting, snr_gamma,
                         offset_noise, timestep_shift)
    return LatentDiffusionModule(
        unet, text_encoder, first_stage, loss=loss,
        lr_schedule=LRSchedule(lr_schedule, warmup_steps, max_steps, lr_decay_fraction),
        ema=EMASettings(ema_decay, ema_warmup) if ema_decay is not None else None,
        sampling=SamplingDefaults.from_dict(sampling), nan=NaNPolicy(nan_policy, max_nan_skips), **kwargs)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with seeded N(0, std) values (a trained-looking model, not its init); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()
