"""Rectified flow (flow matching), the objective of SD3 and Flux: x_t = (1 - s) x0 + s eps at a noise level s in
(0, 1), and the network regresses the velocity eps - x0. The network sees the timestep s * T, as SD3's does.

Noise levels are drawn uniformly, logit-normally or by SD3's "mode" density, then moved toward the noisy end by a
shift (a fixed value, or one that grows with the image's token count, as SD3 and Flux do at high resolution). The
shift is part of the model: the checkpoint records it, so the sampler uses the same one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
FLOW_PREDICTION = "flow"  # the prediction type of a flow-matching model: the velocity eps - x0


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift of noise levels in (0, 1): shift * s / (1 + (shift - 1) * s); 1 leaves them as they are."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """The resolution-dependent shift exp(mu) of SD3/Flux, mu linear in the token count between (base_tokens,
    base_shift) and (max_tokens, max_shift): larger images are noised further for the same draw."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return math.exp(base_shift + slope * (tokens - base_tokens))


def latent_tokens(x0: torch.Tensor, patch: int = 2) -> int:
    """The token count SD3's transformer would see for latents ``x0`` (2x2 patches), the resolution shift's input."""
    return (x0.shape[-2] // patch) * (x0.shape[-1] // patch)


def sample_noise_levels(
    n: int,
    sampling: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = "cpu",
) -> torch.Tensor:
    """``n`` noise levels u in [0, 1) before the shift (``torch.rand`` can draw 0): uniform, sigmoid of
    N(logit_mean, logit_std) (SD3's default, which favours the middle), or SD3's "mode" density (mode_scale > 0
    favours the middle, < 0 the ends). Drawn on the generator's device in the order diffusers' training utilities draw
    them, so a shared generator gives the same levels."""
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {sampling!r}; expected one of {list(TIMESTEP_SAMPLINGS)}")
    if sampling == "logit_normal":
        return torch.sigmoid(torch.normal(logit_mean, logit_std, (n,), generator=generator, device=device))
    u = torch.rand((n,), generator=generator, device=device)
    if sampling == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def flow_loss_weights(sigma: torch.Tensor, weighting: str = "none", min_sigma: float = 0.0) -> torch.Tensor:
    """Per-sample weights of the velocity loss: none, 1 / sigma^2 (``sigma_sqrt``) or SD3's ``cosmap``.
    ``min_sigma``: levels below it weigh as it does (1 / sigma^2 is infinite at a level of 0)."""
    if weighting not in FLOW_WEIGHTINGS:
        raise ValueError(f"unknown flow loss weighting {weighting!r}; expected one of {list(FLOW_WEIGHTINGS)}")
    if weighting == "sigma_sqrt":
        return sigma.clamp(min=min_sigma).pow(-2.0)
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


@dataclass
class FlowMatchingLoss:
    """The flow-matching objective; called like ``DiffusionLoss`` with a ``denoise(x_t, t, cond)`` function and x0.

    ``shift`` moves every drawn level toward the noisy end; with ``resolution_shift`` the shift is instead computed
    from the latents' token count (``resolution_shift()``). Levels are continuous in (0, 1), not the 1000 steps of a
    scheduler's table.
    """

    num_train_timesteps: int = 1000
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    resolution_shift: bool = False
    weighting: str = "none"

    prediction_type = FLOW_PREDICTION

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {self.timestep_sampling!r}; expected one of "
                             f"{list(TIMESTEP_SAMPLINGS)}")
        flow_loss_weights(torch.full((1,), 0.5), self.weighting)  # validate early
        for name in ("shift", "logit_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {self.num_train_timesteps!r}")

    @property
    def spec(self) -> dict:
        """What samplers need to know, saved in checkpoints in place of a noise schedule: the objective and the shift
        (the same one must be used in sampling)."""
        return {"objective": "flow_matching", "num_train_timesteps": self.num_train_timesteps, "shift": self.shift,
                "resolution_shift": self.resolution_shift}

    def shift_for(self, x0: torch.Tensor) -> float:
        """The shift used for latents like ``x0``: fixed, or from their token count."""
        return resolution_shift(latent_tokens(x0)) if self.resolution_shift else self.shift

    def sample_sigmas(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One shifted noise level in [0, 1) per sample of ``x0``."""
        device = generator.device if generator is not None else x0.device
        u = sample_noise_levels(x0.shape[0], self.timestep_sampling, self.logit_mean, self.logit_std,
                                self.mode_scale, generator, device)
        # non-blocking: a blocking copy to a GPU would first wait for the work already queued there
        return shift_sigmas(u, self.shift_for(x0)).to(x0.device, non_blocking=True)

    def __call__(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
        x0: torch.Tensor,
        cond: object = None,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The mean weighted MSE between ``denoise(x_t, sigma * T, cond)`` and eps - x0; sigma and noise drawn if not
        given."""
        if sigma is None:
            sigma = self.sample_sigmas(x0, generator)
        if noise is None:
            device = generator.device if generator is not None else x0.device
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=device)
            noise = noise.to(x0.device, non_blocking=True)
        per_sample = self.per_sample_mse(denoise, x0, cond, sigma, noise)
        # continuous levels reach 0 (torch.rand draws it); a level under the smallest of a T-step table (1 / T, where
        # diffusers' discrete draw stops) weighs as that one does
        weights = flow_loss_weights(sigma.float(), self.weighting, min_sigma=1.0 / self.num_train_timesteps)
        return (weights * per_sample).mean()

    def per_sample_mse(
        self,
        denoise: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
        x0: torch.Tensor,
        cond: object,
        sigma: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """The unweighted MSE [B] (float32) between ``denoise(x_t, sigma * T, cond)`` and the velocity eps - x0: the
        training objective before its weighting, shared with the validation loss. The interpolation runs in float32
        whatever the latents' dtype (in bf16 the noise level would keep 8 bits); ``denoise`` gets x_t in that dtype."""
        dtype = x0.dtype
        x0, noise = x0.float(), noise.float()
        s = sigma.float().view(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - s) * x0 + s * noise
        pred = denoise(x_t.to(dtype), sigma * self.num_train_timesteps, cond)
        return ((pred.float() - (noise - x0)) ** 2).mean(dim=list(range(1, x0.ndim)))
