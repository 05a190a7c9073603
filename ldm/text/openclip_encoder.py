"""OpenCLIP text encoder (Stable Diffusion 2.x: ViT-H/14 with the penultimate layer).

The model is ``open_clip.create_model(arch, pretrained=<local file or None>)`` with its visual tower deleted, kept
as ``self.model`` so the state-dict keys read ``model.token_embedding.weight`` ... like SD 2.x's
``cond_stage_model.model.*``. Tokens are padded with 0, as ``open_clip.tokenize`` does.

``layer="last"``: hidden = ln_final(output of all blocks), i.e. the per-token features inside ``encode_text``.
``layer="penultimate"`` (SD 2.x): hidden = ln_final(output of all blocks but the last). In both cases ``pooled`` is
exactly ``encode_text``: the end-token feature of the full stack after ln_final, times the text projection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ldm.text.base import TextEncoder, to_plain
from ldm.text.tokenizer import OPEN_CLIP_PAD_ID, CLIPTokenizer

LAYERS = ("last", "penultimate")


class OpenCLIPTextEncoder(TextEncoder):
    """Text tower of an open_clip CLIP model; ``model_kwargs`` go to ``open_clip.create_model`` (e.g. tiny towers).

    ``width``, when given, is only checked against the model, so configs can declare it once for the UNet.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        pretrained: str | Path | None = None,
        layer: str = "last",
        frozen: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
        if pretrained is not None:
            pretrained = str(Path(pretrained).expanduser())
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"OpenCLIPTextEncoder: pretrained '{pretrained}' is not a file. Give the path of a local open_clip "
                    f"checkpoint for {arch} (e.g. open_clip_pytorch_model.bin of laion2b_s32b_b79k for SD 2.x), or "
                    "pretrained=null for random weights. ldm never downloads weights, so hub tags are refused."
                )
        import open_clip

        model = open_clip.create_model(arch, pretrained=pretrained, **to_plain(model_kwargs or {}))
        if not hasattr(model, "transformer") or not hasattr(model, "token_embedding"):
            raise TypeError(
                f"open_clip arch {arch!r} has a custom text tower ({type(model).__name__}); "
                "OpenCLIPTextEncoder supports the built-in CLIP text transformer only"
            )
        if hasattr(model, "visual"):
            del model.visual  # the image tower is dead weight for conditioning
        self.model = model
        self.layer = layer
        if width is not None and width != self.width:
            raise ValueError(f"OpenCLIPTextEncoder: width={width} was declared but {arch}'s text width is {self.width}")
        self.tokenizer = CLIPTokenizer(context_length=model.context_length, pad_token_id=OPEN_CLIP_PAD_ID)
        self.frozen = frozen

    @property
    def width(self) -> int:
        return self.model.transformer.width

    @property
    def pooled_width(self) -> int:
        proj = self.model.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]

    def _pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        pool_type = getattr(self.model, "text_pool_type", "argmax")
        if pool_type == "argmax":  # the end token has the largest id of the vocabulary
            return input_ids.argmax(dim=-1)
        if pool_type == "eos":
            return (input_ids == self.model.text_eos_id).int().argmax(dim=-1)
        if pool_type == "first":
            return torch.zeros_like(input_ids[:, 0])
        if pool_type == "last":
            return torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
        raise ValueError(f"unsupported open_clip text pool type {pool_type!r}")

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.token_embedding(input_ids).to(m.transformer.get_cast_dtype())
        x = x + m.positional_embedding.to(x.dtype)
        batch_first = getattr(m.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        blocks = m.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x, attn_mask=m.attn_mask)
        penultimate = x
        x = blocks[-1](x, attn_mask=m.attn_mask)
        if not batch_first:
            x, penultimate = x.transpose(0, 1), penultimate.transpose(0, 1)
        last = m.ln_final(x)
        hidden = last if self.layer == "last" else m.ln_final(penultimate)
        pooled = last[torch.arange(last.shape[0], device=last.device), self._pool_index(input_ids)]
        if m.text_projection is not None:
            pooled = (
                m.text_projection(pooled)
                if isinstance(m.text_projection, torch.nn.Linear)
                else pooled @ m.text_projection
            )
        return hidden, pooled
