"""Guidance as objects: classifier-free guidance (Ho & Salimans, 2022) with the rescale of Lin et al. (2023) and a
guidance interval (Kynkaanniemi et al., 2024), and autoguidance (Karras et al., 2024), guidance away from a weaker
version of the same model. A guidance object turns a denoiser's outputs into the one output a scheduler steps
with, so the sampling loop stays a plain scheduler loop."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from ldm.errors import ConfigError

Denoiser = Callable[..., torch.Tensor]  # denoise(x, t, context, **kwargs) -> model output


def classifier_free_guidance(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Combine the unconditional and conditional model outputs: uncond + s (cond - uncond).

    ``guidance_rescale`` in [0, 1] blends in a copy rescaled to the per-sample std of ``cond``, which counters the
    over-exposure strong guidance causes with zero-terminal-SNR models. Scale 1 returns ``cond``.
    """
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 and finite (1 disables guidance), got {guidance_scale}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond and cond outputs differ in shape: {tuple(uncond.shape)} vs {tuple(cond.shape)}")
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True)
        # a constant guided output (a zero-initialised UNet's) has no spread to rescale: left as it is, not 0/0
        ratio = torch.where(std_guided > 0, std_cond / std_guided.clamp_min(torch.finfo(std_guided.dtype).tiny),
                            torch.ones_like(std_guided))
        rescaled = guided * ratio
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def autoguidance(cond: torch.Tensor, guide: torch.Tensor, scale: float) -> torch.Tensor:
    """The term that moves an output away from a weaker model's: (scale - 1) (cond - guide), 0 at scale 1.

    ``guide`` is the output of a less-trained (or smaller) model of the same task, with the same conditioning.
    Karras et al. (2024) guide with guide + scale (cond - guide); the term is added to the (CFG-)guided output, so
    the two guidances combine.
    """
    if not math.isfinite(scale) or scale < 1:
        raise ValueError(f"autoguidance_scale must be >= 1 (1 disables it), got {scale}")
    if guide.shape != cond.shape:
        raise ValueError(f"cond and guide outputs differ in shape: {tuple(cond.shape)} vs {tuple(guide.shape)}")
    return (scale - 1.0) * (cond - guide)


def check_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float]:
    """``(lo, hi)`` of a guidance interval, checked (two finite numbers, 0 <= lo <= hi; a ConfigError otherwise);
    None means every step, (-inf, inf)."""
    if interval is None:
        return -math.inf, math.inf
    values = list(interval) if isinstance(interval, Sequence) and not isinstance(interval, str | bytes) else None
    if values is None or len(values) != 2 or \
            not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ConfigError(f"guidance_interval must be two timesteps [lo, hi] (finite numbers, e.g. [400, 1000]) or "
                          f"null, got {interval!r:.80}")
    lo, hi = float(values[0]), float(values[1])
    if not 0 <= lo <= hi:
        raise ConfigError(f"guidance_interval [lo, hi] needs 0 <= lo <= hi (timesteps, 0 = clean), got {interval!r}")
    return lo, hi


class ClassifierFreeGuidance:
    """uncond + scale (cond - uncond), from one batched network call on [uncond; cond].

    ``uncond_context`` is the encoding of the negative prompt ("" for plain CFG). ``interval=(lo, hi)`` guides only
    the steps whose timestep t (training units, 0 = clean) has lo <= t <= hi; the others run the conditional model
    alone, one network pass. A scale of 1 or less is the conditional model alone at every step, as in diffusers
    (whose SD-Turbo and LCM recipes pass 0 to turn guidance off). ``share_input=True`` is for a
    denoiser that takes ``contexts_per_input`` (ldm's UNet): it gets ``x``, ``t`` and the keyword inputs once with
    the two contexts, so the layers before its first cross-attention run once for both halves; otherwise they are
    repeated for the [uncond; cond] batch.
    """

    def __init__(self, scale: float = 1.0, uncond_context: torch.Tensor | None = None, rescale: float = 0.0,
                 interval: Sequence[float] | None = None, share_input: bool = False):
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (<= 1: no guidance), got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {rescale}")
        if scale > 1.0 and uncond_context is None:
            raise ValueError("guidance_scale > 1 needs the unconditional context (the encoding of the negative "
                             "prompt)")
        self.scale, self.uncond_context, self.rescale = float(scale), uncond_context, float(rescale)
        self.lo, self.hi = check_guidance_interval(interval)
        self.share_input = bool(share_input)
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None  # (context, [uncond; context])

    def paired_context(self, context: torch.Tensor) -> torch.Tensor:
        """[uncond; context], the same tensor object at every step of one sampling loop, so a UNet that reuses
        cross-attention keys and values per context tensor (``reuse_context_projections``) computes them once."""
        if self._pair is None or self._pair[0] is not context:
            self._pair = (context, torch.cat([self.uncond_context, context]))
        return self._pair[1]

    def guides_at(self, t: float) -> bool:
        """Whether step ``t`` runs the unconditional half too."""
        return self.scale > 1.0 and self.lo <= t <= self.hi

    def outputs(self, denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided, conditional) float32 outputs for the batch ``x`` at timesteps ``t``."""
        if not self.guides_at(float(t[0])):  # a flow model's timesteps are fractional
            cond = denoise(x, t, context, **kwargs).float()
            return cond, cond
        if self.share_input:
            out = denoise(x, t, self.paired_context(context), contexts_per_input=2, **kwargs)
        else:
            doubled = {k: torch.cat([v, v]) for k, v in kwargs.items()}
            out = denoise(torch.cat([x, x]), torch.cat([t, t]), self.paired_context(context), **doubled)
        uncond, cond = out.float().chunk(2)
        return classifier_free_guidance(uncond, cond, self.scale, self.rescale), cond

    def __call__(self, denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                 **kwargs) -> torch.Tensor:
        return self.outputs(denoise, x, t, context, **kwargs)[0]


class AutoGuidance:
    """Classifier-free guidance (``cfg``, none by default) plus (scale - 1) (cond - guide): the ``guide`` network
    is a weaker version of the model (an early snapshot), run on ``guide_context`` (the model's context if None).
    One more network pass per step."""

    def __init__(self, guide: Denoiser, scale: float, guide_context: torch.Tensor | None = None,
                 cfg: ClassifierFreeGuidance | None = None):
        if not math.isfinite(scale) or scale < 1:
            raise ValueError(f"autoguidance_scale must be a finite number >= 1 (1 disables it), got {scale}")
        if guide is None and scale != 1.0:
            raise ValueError(f"autoguidance_scale={scale} needs a guide model (a checkpoint trained with "
                             "ldm_stage.guide_snapshot_step); set autoguidance_scale=1 to sample without it")
        self.guide, self.scale, self.guide_context = guide, float(scale), guide_context
        self.cfg = cfg or ClassifierFreeGuidance()

    def __call__(self, denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                 **kwargs) -> torch.Tensor:
        guided, cond = self.cfg.outputs(denoise, x, t, context, **kwargs)
        if self.scale == 1.0:
            return guided
        guide_context = context if self.guide_context is None else self.guide_context
        return guided + autoguidance(cond, self.guide(x, t, guide_context, **kwargs).float(), self.scale)
