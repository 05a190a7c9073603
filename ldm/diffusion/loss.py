"""The denoising training loss: sample t and noise, build x_t, and regress the chosen prediction target."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldm.diffusion.noise_schedule import NoiseSchedule
from ldm.diffusion.parameterization import canonical_prediction_type, make_prediction

LOSS_WEIGHTINGS = ("uniform", "min_snr")


def loss_weights(snr: torch.Tensor, prediction_type: str, weighting: str = "uniform", gamma: float = 5.0):
    """Per-sample loss weights for ``weighting`` given the SNR of each sample's timestep.

    ``min_snr`` (Hang et al., 2023) weights the x0-space loss by min(SNR, gamma); expressed for an epsilon target
    that is min(SNR, gamma) / SNR, for a v target min(SNR, gamma) / (SNR + 1).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; expected one of {list(LOSS_WEIGHTINGS)}")
    if weighting == "uniform":
        return torch.ones_like(snr)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"min-SNR gamma must be a finite number > 0, got {gamma}")
    kind = canonical_prediction_type(prediction_type)
    clipped = snr.clamp(max=gamma)
    if kind == "epsilon":
        return clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny)
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def check_timestep_shift(shift: float) -> None:
    """Refuse a timestep shift that is not positive (it would map the draw outside [0, T))."""
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"timestep shift must be a finite number > 0, got {shift}; 1 draws t uniformly, > 1 favours "
                         "the noisy end")


def sample_timesteps(
    n: int,
    num_train_timesteps: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` integer training timesteps in [0, T): uniform, or with ``shift`` > 1 moved toward the noisy end.

    The shift is SD3's (Esser et al., 2024): u ~ U(0, 1) becomes shift * u / (1 + (shift - 1) * u), so with shift 2
    the fraction of samples above t = 0.8 T grows from 20% to 33% and the fraction below 0.2 T falls to 11%. At the
    noisy end a model decides the layout; at the clean end of a VAE's latents, the posterior noise makes the target
    all but unpredictable. ``shift`` 1 is the plain uniform draw (``torch.randint``).
    """
    check_timestep_shift(shift)
    if shift == 1.0:
        return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device)
    u = torch.rand((n,), generator=generator, device=device, dtype=torch.float64)
    shifted = shift * u / (1 + (shift - 1) * u)
    return (shifted * num_train_timesteps).long().clamp(max=num_train_timesteps - 1)


@dataclass
class DiffusionLoss:
    """Configuration of the training objective; call it with a ``denoise(x_t, t, cond)`` function and clean x0."""

    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    weighting: str = "uniform"
    snr_gamma: float = 5.0
    offset_noise: float = 0.0
    timestep_shift: float = 1.0

    def __post_init__(self) -> None:
        self.prediction_type = canonical_prediction_type(self.prediction_type)
        loss_weights(torch.ones(1), self.prediction_type, self.weighting, self.snr_gamma)  # validate early
        if self.schedule.has_zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError(
                "a zero-terminal-SNR schedule needs prediction_type 'v_prediction' or 'sample': epsilon prediction "
                "is undefined at the last timestep"
            )
        if not math.isfinite(self.offset_noise) or self.offset_noise < 0:
            raise ValueError(f"offset_noise must be a finite number >= 0, got {self.offset_noise}")
        check_timestep_shift(self.timestep_shift)

    def sample_noise(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise, plus per-channel constant offset noise if configured (Guttenberg, 2023)."""
        device = generator.device if generator is not None else x0.device  # a CPU generator serves any device
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device)
        if self.offset_noise > 0:
            shape = (x0.shape[0], x0.shape[1], *([1] * (x0.ndim - 2)))
            noise = noise + self.offset_noise * torch.randn(shape, generator=generator, dtype=x0.dtype, device=device)
        # non-blocking: a blocking copy to a GPU would first wait for all the work already queued there
        return noise.to(x0.device, non_blocking=True)

    def __call__(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
        x0: torch.Tensor,
        cond: object = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The mean weighted MSE between ``denoise(x_t, t, cond)`` and the target; t and noise drawn if not given.

        Drawn here, the timesteps stay on the generator's device (the host, usually) for the schedule lookups, so a
        training step on a GPU reads nothing back from it."""
        B = x0.shape[0]
        drawn = t is None
        if drawn:
            device = generator.device if generator is not None else x0.device
            t = sample_timesteps(B, self.schedule.num_train_timesteps, self.timestep_shift, generator, device)
        if noise is None:
            noise = self.sample_noise(x0, generator)
        per_sample = self.per_sample_mse(denoise, x0, cond, t, noise, check=not drawn)
        snr = self.schedule.snr(t, check=not drawn).to(per_sample.device, non_blocking=True)
        w = loss_weights(snr, self.prediction_type, self.weighting, self.snr_gamma).to(per_sample.dtype)
        return (w * per_sample).mean()

    def per_sample_mse(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
        x0: torch.Tensor,
        cond: object,
        t: torch.Tensor,
        noise: torch.Tensor,
        *,
        check: bool = True,
    ) -> torch.Tensor:
        """The unweighted MSE [B] (float32) between ``denoise(x_t, t, cond)`` and the target of the prediction type:
        the training objective before its weighting, shared with the validation loss. ``check=False``: ``t`` is
        known to be in range (``NoiseSchedule.alpha_bar``).

        The forward process runs in float32 whatever the latents' dtype (bf16 from a VAE under autocast, or a batch
        cast by FSDP): in bf16, 1 - alpha_bar rounds to 0 at the first timesteps, which then get no noise, and every
        noise level is coarse. ``denoise`` gets x_t in the latents' dtype."""
        dtype = x0.dtype
        x0, noise = x0.float(), noise.float()
        a = self.schedule.alpha_bar(t, like=x0, check=check)
        x_t = self.schedule.add_noise(x0, noise, t, check=check)
        target = make_prediction(x0, noise, a, self.prediction_type)
        pred = denoise(x_t.to(dtype), t.to(x0.device, non_blocking=True), cond)
        return ((pred.float() - target) ** 2).mean(dim=list(range(1, x0.ndim)))
