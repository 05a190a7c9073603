"""Caption dropout for classifier-free guidance.

Training replaces a fraction ``p`` of captions with the empty prompt "" so one network learns both the conditional
and the unconditional model that guidance combines at sampling time. SD's model card describes 10% dropout, but
CompVis' public code and diffusers' text-to-image script omit it (CompVis/stable-diffusion#305): ldm drops by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NULL_PROMPT = ""
DEFAULT_DROP_PROB = 0.1


def drop_captions(
    captions: Sequence[str], p: float = DEFAULT_DROP_PROB, generator: torch.Generator | None = None
) -> list[str]:
    """Return a copy of ``captions`` where each one became "" independently with probability ``p``.

    The draw uses ``torch.rand`` on the CPU with ``generator``, so a seeded generator gives the same drops every run.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption drop probability must lie in [0, 1], got {p}")
    if isinstance(captions, str):
        raise TypeError("drop_captions takes a list of captions, not a single string")
    captions = list(captions)
    if p == 0.0 or not captions:
        return captions
    drop = torch.rand(len(captions), generator=generator) < p
    return [NULL_PROMPT if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
