"""CLIP text encoder through transformers' ``CLIPTextModel`` (Stable Diffusion 1.x: openai/clip-vit-large-patch14).

Weights come only from a local directory (``from_pretrained(path, local_files_only=True)``) or are random from a
config dict; nothing is downloaded. The tokenizer pads with the end-of-text token 49407, as transformers'
``CLIPTokenizer`` for openai/clip-vit-large-patch14 does, and the ids go to the model without an attention mask,
as in SD 1.x (the causal mask already keeps padding from real tokens).

``clip_skip = n`` takes the output of the n-th block from the end (``hidden_states[-n]``) and applies the final
LayerNorm, the convention of the SD community (1 = the last layer, i.e. ``last_hidden_state``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.text.base import TextEncoder, to_plain
from ldm.text.tokenizer import HF_CLIP_PAD_ID, CLIPTokenizer, folder_pad_token_id

# Keys that fix the architecture: a config given together with pretrained_path must agree with the checkpoint on them.
_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def _resolve_local_dir(path: str | Path) -> Path:
    """The directory holding config.json: ``path`` itself or its ``text_encoder/`` (a diffusers pipeline folder)."""
    root = Path(path).expanduser()
    hint = (
        "Point pretrained_path at a local directory with config.json and model.safetensors (for SD 1.x a copy of "
        "openai/clip-vit-large-patch14, or the text_encoder/ folder of a diffusers pipeline), or set "
        "pretrained_path=null and pass config= for a randomly initialised model. ldm never downloads weights."
    )
    if not root.exists():
        raise FileNotFoundError(f"HFCLIPTextEncoder: pretrained_path '{root}' does not exist. {hint}")
    for candidate in (root, root / "text_encoder"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"HFCLIPTextEncoder: no config.json in '{root}' (nor in its text_encoder/). {hint}")


class HFCLIPTextEncoder(TextEncoder):
    """transformers CLIP text tower; ``pooled`` is ``pooler_output`` (or ``text_embeds`` with ``with_projection``).

    ``width``, when given, is only checked against the model: it lets configs declare the feature size once
    (the UNet's ``context_dim: ${text_encoder.width}``). ``pad_token_id`` None pads as the pipeline folder's
    ``tokenizer/`` does when ``pretrained_path`` is one (SD 2.x folders pad with ``!``, id 0), else with
    ``<|endoftext|>`` (49407, SD 1.x).
    """

    def __init__(
        self,
        pretrained_path: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        clip_skip: int = 1,
        frozen: bool = True,
        with_projection: bool = False,
        pad_token_id: int | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        config = to_plain(config) if config is not None else None
        if pretrained_path is not None:
            local = _resolve_local_dir(pretrained_path)
            self.model = model_cls.from_pretrained(local, local_files_only=True)
            if pad_token_id is None:  # a diffusers pipeline folder's tokenizer/ says how its models were padded
                pad_token_id = folder_pad_token_id(local.parent) if local.name == "text_encoder" else None
            if config is not None:
                self._check_config_matches(config, pretrained_path)
        elif config is not None:
            self.model = model_cls(CLIPTextConfig(**config))
        else:
            raise ValueError(
                "HFCLIPTextEncoder needs pretrained_path (a local directory) or config (a CLIPTextConfig dict)"
            )
        cfg = self.model.config
        if not 1 <= clip_skip <= cfg.num_hidden_layers:
            raise ValueError(f"clip_skip must lie in [1, {cfg.num_hidden_layers}] (1 = last layer), got {clip_skip}")
        self.clip_skip = clip_skip
        self.with_projection = with_projection
        if width is not None and width != cfg.hidden_size:
            raise ValueError(
                f"HFCLIPTextEncoder: width={width} was declared but the model's hidden size is {cfg.hidden_size}"
            )
        pad_token_id = HF_CLIP_PAD_ID if pad_token_id is None else pad_token_id
        self.tokenizer = CLIPTokenizer(context_length=cfg.max_position_embeddings, pad_token_id=pad_token_id)
        if cfg.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(f"config vocab_size {cfg.vocab_size} is smaller than the CLIP BPE vocabulary")
        self.frozen = frozen

    def architecture(self) -> dict[str, Any]:
        """The model's ``CLIPTextConfig`` as ``config=`` takes it (the values that differ from its defaults): what a
        checkpoint records to rebuild the tower without the folder it was loaded from."""
        internal = ("transformers_version", "architectures", "model_type", "torch_dtype", "dtype", "_name_or_path")
        defaults = CLIPTextConfig()
        return {k: v for k, v in self.model.config.to_diff_dict().items()
                if k not in internal and hasattr(defaults, k)}

    def _check_config_matches(self, config: Mapping[str, Any], path: str | Path) -> None:
        loaded = self.model.config
        wrong = {
            k: (config[k], getattr(loaded, k)) for k in _ARCH_KEYS if k in config and config[k] != getattr(loaded, k)
        }
        if wrong:
            detail = ", ".join(f"{k}: config {a} vs checkpoint {b}" for k, (a, b) in wrong.items())
            raise ValueError(f"HFCLIPTextEncoder: the model in '{path}' does not match the given config ({detail})")

    @property
    def _text_model(self) -> CLIPTextModel:
        return self.model.text_model if self.with_projection else self.model

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_width(self) -> int:
        return self.model.config.projection_dim if self.with_projection else self.model.config.hidden_size

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids, output_hidden_states=self.clip_skip > 1)
        if self.clip_skip == 1:
            hidden = out.last_hidden_state
        else:
            hidden = self._text_model.final_layer_norm(out.hidden_states[-self.clip_skip])
        pooled = out.text_embeds if self.with_projection else out.pooler_output
        return hidden, pooled
