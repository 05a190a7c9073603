"""Classifier-free guidance (Ho & Salimans, 2022), with the guidance rescale of Lin et al. (2023), and autoguidance
(Karras et al., 2024): guidance away from a weaker version of the same model."""

from __future__ import annotations

import torch


def classifier_free_guidance(
    uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0
) -> torch.Tensor:
    """Combine the unconditional and conditional model outputs: uncond + s (cond - uncond).

    ``guidance_rescale`` in [0, 1] blends in a copy rescaled to the per-sample std of ``cond``, which counters the
    over-exposure strong guidance causes with zero-terminal-SNR models. Scale 1 returns ``cond``.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 disables guidance), got {guidance_scale}")
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond and cond outputs differ in shape: {tuple(uncond.shape)} vs {tuple(cond.shape)}")
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = list(range(1, cond.ndim))
        std_cond = cond.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True)
        rescaled = guided * (std_cond / std_guided)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def autoguidance(cond: torch.Tensor, guide: torch.Tensor, scale: float) -> torch.Tensor:
    """The term that moves an output away from a weaker model's: (scale - 1) (cond - guide), 0 at scale 1.

    ``guide`` is the output of a less-trained (or smaller) model of the same task, with the same conditioning.
    Karras et al. (2024) guide with guide + scale (cond - guide); the term is added to the (CFG-)guided output, so
    the two guidances combine. It sharpens what the weak model gets wrong (here: square corners).
    """
    if scale < 1:
        raise ValueError(f"autoguidance_scale must be >= 1 (1 disables it), got {scale}")
    if guide.shape != cond.shape:
        raise ValueError(f"cond and guide outputs differ in shape: {tuple(cond.shape)} vs {tuple(guide.shape)}")
    return (scale - 1.0) * (cond - guide)


def guided_denoiser(denoise, guidance_scale: float, guidance_rescale: float = 0.0):
    """Wrap ``denoise(x, t, context)`` so one batched call on [uncond; cond] returns the guided output.

    The returned function takes ``(x, t, cond_context, uncond_context)``; at scale 1 it skips the unconditional half.
    """

    def guided(x: torch.Tensor, t: torch.Tensor, cond_context, uncond_context) -> torch.Tensor:
        if guidance_scale == 1.0:
            return denoise(x, t, cond_context)
        out = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond_context, cond_context]))
        uncond, cond = out.chunk(2)
        return classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)

    return guided
