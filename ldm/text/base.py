"""The one interface every text encoder offers to the UNet, the trainer and the pipeline.

``encode(prompts)`` -> ``TextEncoding(hidden [B, L, D], pooled [B, P], mask [B, L])``. ``hidden`` is the
cross-attention context (``D = width`` is the UNet's ``context_dim``), ``pooled`` the end-of-text summary vector
(SDXL-style vector conditioning), ``mask`` is True on real tokens (start..end) and False on padding. Stable Diffusion
attends to all L positions, padding included, so the mask is informational unless a model chooses to use it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ldm.text.tokenizer import CLIPTokenizer


def to_plain(value: Any) -> Any:
    """Nested mappings/sequences (e.g. Hydra's DictConfig/ListConfig) as plain dicts/lists for third-party configs."""
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return [to_plain(v) for v in value]
    return value


class TextEncoding(NamedTuple):
    """Output of a text encoder; unpack as ``hidden, pooled, mask = encoder.encode(prompts)``."""

    hidden: torch.Tensor  # [B, L, D] per-token features: the UNet's cross-attention context
    pooled: torch.Tensor  # [B, P] one vector per prompt (end-of-text token, projected where the back end projects)
    mask: torch.Tensor  # [B, L] bool, True on start..end tokens

    def expand(self, batch: int) -> TextEncoding:
        """Repeat a batch-1 encoding (such as the null embedding) to ``batch`` rows without copying memory."""
        if self.hidden.shape[0] != 1:
            raise ValueError(f"expand needs a batch-1 encoding, got batch {self.hidden.shape[0]}")
        return TextEncoding(
            self.hidden.expand(batch, -1, -1), self.pooled.expand(batch, -1), self.mask.expand(batch, -1)
        )


class TextEncoder(nn.Module, ABC):
    """Base of the text encoders: tokenization, device placement, freezing and the cached null embedding.

    Subclasses set ``self.tokenizer`` and implement ``encode_tokens`` and ``width``; they call ``self.frozen = ...``
    at the end of their constructor, once their parameters exist.

    A frozen encoder has ``requires_grad`` off on every parameter and stays in eval mode even when a parent module
    calls ``.train()`` (dropout off, deterministic features). Its null embedding is computed once per device/dtype
    and reused; loading a state dict clears that cache. An unfrozen (trainable) encoder recomputes it on each call.
    """

    tokenizer: CLIPTokenizer

    def __init__(self) -> None:
        super().__init__()
        self._frozen = False
        self._null_cache: tuple[Any, TextEncoding] | None = None
        self.register_load_state_dict_post_hook(TextEncoder._after_load)

    # ------------------------------------------------------------------ interface for subclasses
    @property
    @abstractmethod
    def width(self) -> int:
        """Feature size D of ``hidden``: the UNet's ``context_dim``."""

    @property
    def pooled_width(self) -> int:
        """Feature size of ``pooled`` (equals ``width`` unless the back end projects it)."""
        return self.width

    @property
    def context_length(self) -> int:
        """Sequence length L of ``hidden`` and ``mask``."""
        return self.tokenizer.context_length

    @abstractmethod
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map token ids [B, L] (on this module's device) to ``(hidden [B, L, D], pooled [B, P])``."""

    # ------------------------------------------------------------------ shared behaviour
    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)
        self._set_trainable(not self._frozen)
        if self._frozen:
            self.eval()
        self._clear_null_cache()

    def _set_trainable(self, trainable: bool) -> None:
        """Turn ``requires_grad`` on (unfrozen) or off (frozen); a subclass may keep parameters of its own fixed."""
        self.requires_grad_(trainable)

    def train(self, mode: bool = True) -> TextEncoder:
        """Like ``nn.Module.train`` but a frozen encoder stays in eval mode."""
        return super().train(mode and not self._frozen)

    def _reference_tensor(self) -> torch.Tensor | None:
        for tensor in self.parameters():
            return tensor
        for tensor in self.buffers():
            return tensor
        return None

    @property
    def device(self) -> torch.device:
        ref = self._reference_tensor()
        return ref.device if ref is not None else torch.device("cpu")

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        """Tokenize ``prompts`` and encode them on this module's device."""
        input_ids, mask = self.tokenizer(prompts)
        device = self.device
        input_ids, mask = input_ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)  # no GPU wait
        hidden, pooled = self.encode_tokens(input_ids, mask)
        return TextEncoding(hidden, pooled, mask)

    def forward(self, prompts: Sequence[str]) -> TextEncoding:
        return self.encode(prompts)

    def null_embedding(self) -> TextEncoding:
        """Encoding of the empty prompt "" (batch 1), the unconditional input of classifier-free guidance.

        It is the encoder's real output for "" rather than zeros, as Stable Diffusion was trained with. Cached while
        frozen (do not modify the returned tensors in place); use ``.expand(batch)`` to match a batch.
        """
        if not self._frozen:
            return self.encode([""])
        ref = self._reference_tensor()
        key = (ref.device, ref.dtype) if ref is not None else None
        if self._null_cache is None or self._null_cache[0] != key:
            with torch.no_grad():
                self._null_cache = (key, self.encode([""]))
        return self._null_cache[1]

    def _clear_null_cache(self) -> None:
        self._null_cache = None

    @staticmethod
    def _after_load(module: TextEncoder, incompatible_keys: Any) -> None:
        """New weights make the cached null embedding stale (a named function keeps the module picklable)."""
        module._clear_null_cache()
