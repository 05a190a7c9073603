"""Start a model from an original Stable Diffusion single file: its UNet, text encoder and VAE weights loaded
strictly into our modules, which the caller built from its own config."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.autoencoder import SD_LATENT_SCALE
from ldm.convert.diffusers_format import load_state_dict_checked
from ldm.convert.single_file import SDCheckpoint, load_sd_text_encoder, sd_text_family, text_encoder_metadata
from ldm.errors import ConfigError
from ldm.nn.attention import CrossAttention


def sd_latent_scale(sd: SDCheckpoint, configured: float, source: str) -> float:
    """The latent scale to train with: the file's ``scale_factor`` when it stores one, else ``configured`` (with a
    warning when that differs from Stable Diffusion's 0.18215)."""
    if sd.scale_factor is not None:
        return float(sd.scale_factor)
    if configured != SD_LATENT_SCALE:
        warnings.warn(f"init_ckpt={source} stores no scale_factor; using autoencoder.scale_factor={configured} "
                      f"(Stable Diffusion 1.x/2.x use {SD_LATENT_SCALE})", stacklevel=2)
    return float(configured)


def sd_latent_normalization(sd: SDCheckpoint, configured: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The latent normalisation to train with, as ``AutoencoderKL`` keywords: the scale as ``sd_latent_scale``
    chooses it, and the file's shift or per-channel mean and std when its VAE records them (a VAE fitted with
    ``vae_stage.latent_normalization=per_channel``), else the configured ones."""
    scale = sd_latent_scale(sd, float(configured.get("scale_factor", SD_LATENT_SCALE)), source)
    recorded = sd.vae.config if sd.vae is not None else {}
    stored = {key: recorded.get(key) for key in ("shift_factor", "latent_mean", "latent_std")}
    if any(value is not None for value in stored.values()):
        return {"scale_factor": scale, **stored}
    return {"scale_factor": scale}


def sd_text_state_dict(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD file's ``cond_stage_model.*`` weights under our text encoders' names: SD 1.x CLIP and SD 2.x open_clip
    through ``load_sd_text_encoder``; any other layout (e.g. our own from-scratch tower) as stored."""
    if sd_text_family(cond) is None:
        return cond
    return load_sd_text_encoder(cond).state_dict()


def load_sd_vae(sd: SDCheckpoint, source: str, vae: nn.Module) -> None:
    """Load an SD single file's VAE weights into ours, strictly."""
    load_state_dict_checked(vae, sd.vae.state_dict(), f"AutoencoderKL (autoencoder config vs init_ckpt={source})")


CONV_IN = "input_blocks.0.0.weight"  # the UNet's first convolution, [model_channels, in_channels, 3, 3]


def widen_conv_in(state_dict: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A UNet state dict whose first convolution takes ``in_channels`` inputs, the added ones with zero weights: a
    4-channel model started as a 9-channel inpainting UNet computes exactly the base model, whatever the mask."""
    weight = state_dict[CONV_IN]
    have = weight.shape[1]
    if in_channels == have:
        return state_dict
    if in_channels < have:
        raise ConfigError(f"the checkpoint's UNet takes {have} input channels, more than unet.in_channels="
                          f"{in_channels}: dropping inputs would change the model")
    extra = weight.new_zeros((weight.shape[0], in_channels - have, *weight.shape[2:]))
    return {**state_dict, CONV_IN: torch.cat([weight, extra], dim=1)}


def attention_heads(model: nn.Module) -> dict[str, int]:
    """The head count of each attention layer of ``model``, by name."""
    return {name: m.heads for name, m in model.named_modules() if isinstance(m, CrossAttention)}


def check_same_heads(sd: SDCheckpoint, source: str, unet: nn.Module) -> None:
    """Refuse to start ``unet`` from a file whose UNet splits attention into other heads: the weights' shapes do not
    depend on the heads, so they would load and compute another function than the file's model. A file that records
    no heads (``heads_guessed``) takes the run's."""
    if sd.heads_guessed:
        return
    theirs, ours = attention_heads(sd.unet), attention_heads(unet)
    differ = [name for name in ours if name in theirs and ours[name] != theirs[name]]
    if differ:
        recorded = {k: v for k, v in sd.unet.config.items() if k in ("num_heads", "num_head_channels") and v != -1}
        declared = {k: v for k, v in getattr(unet, "config", {}).items()
                    if k in ("num_heads", "num_head_channels") and v != -1}
        raise ConfigError(
            f"init_ckpt={source} records a UNet with {recorded} ({theirs[differ[0]]} heads in {differ[0]}), the run's "
            f"unet config has {declared} ({ours[differ[0]]}): the same weights split into other heads compute another "
            f"model. Set {' '.join(f'unet.{k}={v}' for k, v in recorded.items())}"
            + (" unet.num_heads=-1" if "num_head_channels" in recorded else " unet.num_head_channels=-1"))


def check_same_text_encoder(sd: SDCheckpoint, source: str, text_encoder: nn.Module) -> None:
    """Refuse to start ``text_encoder`` from a file whose ldm metadata records another configuration of it (heads,
    activation, the layer it conditions with, the pad id): the weights load whatever those are, and the run would
    condition on other features than the file's model. Files without the metadata take the run's."""
    if not sd.text_encoder:
        return
    ours = text_encoder_metadata(text_encoder) or {}

    def flat(meta: Mapping[str, Any]) -> dict[str, Any]:
        return {**{f"config.{k}": v for k, v in meta.get("config", {}).items()},
                **{k: v for k, v in meta.items() if k != "config"}}

    theirs, mine = flat(sd.text_encoder), flat(ours)
    differ = sorted(k for k in theirs if k in mine and theirs[k] != mine[k])
    if differ:
        said = ", ".join(f"{k}: the file's {theirs[k]!r}, the run's {mine[k]!r}" for k in differ)
        raise ConfigError(f"init_ckpt={source} records its text encoder with {said}: the same weights would compute "
                          "other text features. Set the run's text_encoder settings to the file's (e.g. "
                          "text_encoder.clip_skip, text_encoder.pad_token_id, text_encoder.config.*)")


def init_from_sd(sd: SDCheckpoint, source: str, unet: nn.Module, text_encoder: nn.Module | None = None,
                 vae: nn.Module | None = None, text_encoder_pretrained: bool = False) -> list[str]:
    """Load an SD single file's UNet (its EMA weights when present), text encoder and, given ``vae``, VAE into ours,
    strictly. Returns the names of the parts loaded.

    A UNet with more input channels than the file's (an inpainting UNet from a text-to-image file) gets the extra
    ones zeroed (``widen_conv_in``). A file without text-encoder weights is refused for a frozen encoder that has no
    pretrained weights of its own (``text_encoder_pretrained``): it would train against random, frozen text features.
    """
    state = sd.unet.state_dict()
    want = getattr(unet, "in_channels", state[CONV_IN].shape[1])
    have = state[CONV_IN].shape[1]
    load_state_dict_checked(unet, widen_conv_in(state, want), f"UNet (unet config vs init_ckpt={source})")
    check_same_heads(sd, source, unet)
    loaded = ["UNet" if want == have else f"UNet ({have} -> {want} input channels, the new ones zeroed)"]
    if vae is not None:
        load_sd_vae(sd, source, vae)
        loaded.append("VAE")
    if text_encoder is None:
        return loaded
    if sd.cond_stage_state_dict:
        check_same_text_encoder(sd, source, text_encoder)
        load_state_dict_checked(text_encoder, sd_text_state_dict(sd.cond_stage_state_dict),
                                f"text encoder (text_encoder config vs init_ckpt={source})")
        return [*loaded, "text encoder"]
    if getattr(text_encoder, "frozen", False) and not text_encoder_pretrained:
        raise ValueError(
            f"init_ckpt={source} holds no text encoder (cond_stage_model.*) weights and the frozen text encoder has no "
            "pretrained weights of its own: set text_encoder.pretrained_path (or pretrained) to a local copy")
    return loaded
