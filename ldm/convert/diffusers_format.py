"""Conversion between our modules (original SD layout) and diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL``.

The key maps are built from the model configuration, module by module, and used in both directions; configs are
translated explicitly (diffusers' ``attention_head_dim`` is the number of heads in SD1-style configs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.autoencoder import SD_LATENT_SCALE, AutoencoderKL
from ldm.diffusion.flow import FLOW_PREDICTION
from ldm.diffusion.parameterization import canonical_prediction_type
from ldm.diffusion.schedules import canonical_schedule_name
from ldm.errors import ConfigError
from ldm.unet import UNet

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _cfg(model: Any) -> dict[str, Any]:
    """A diffusers model's config as a plain dict."""
    return dict(model.config)


def _require(cfg: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Raise ConfigError when a diffusers config uses a feature our module does not implement."""
    for key, allowed in expected.items():
        value = cfg.get(key, allowed[0] if isinstance(allowed, tuple) else allowed)
        if isinstance(value, list | tuple) and value and all(v is False for v in value):
            value = False  # a per-block list of the default (only_cross_attention=[False, ...])
        ok = value in allowed if isinstance(allowed, tuple) else value == allowed
        if not ok:
            raise ConfigError(f"unsupported {what} config: {key}={value!r} (ldm supports {allowed!r})")


# ---------------------------------------------------------------------------------------------------------- UNet


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a diffusers ``UNet2DConditionModel`` config into our ``UNet`` constructor arguments."""
    _require(cfg, {
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
        "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
        "class_embed_type": None, "addition_embed_type": None, "time_embedding_type": "positional",
        "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
        "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
        "class_embeddings_concat": False, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
        "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
        "mid_block_only_cross_attention": (None, False), "resnet_time_scale_shift": ("default", "scale_shift"),
    }, "UNet2DConditionModel")  # fmt: skip
    boc = list(cfg["block_out_channels"])
    mc = boc[0]
    if any(c % mc for c in boc):
        raise ConfigError(f"block_out_channels {boc} must be multiples of the first entry")
    n = len(boc)
    downs, ups = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    attn_levels = []
    for i, kind in enumerate(downs):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise ConfigError(f"unsupported down block type {kind!r} (ldm supports CrossAttnDownBlock2D, DownBlock2D)")
        up = ups[n - 1 - i]
        if ("CrossAttn" in kind) != (up == "CrossAttnUpBlock2D") or up not in ("CrossAttnUpBlock2D", "UpBlock2D"):
            raise ConfigError(f"up_block_types {ups} must mirror down_block_types {downs}")
        if "CrossAttn" in kind:
            attn_levels.append(i)
    layers = cfg["layers_per_block"]
    depth = cfg.get("transformer_layers_per_block", 1)
    ctx = cfg["cross_attention_dim"]
    for name, value in (("layers_per_block", layers), ("transformer_layers_per_block", depth),
                        ("cross_attention_dim", ctx)):
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ConfigError(f"per-level {name}={value} is not supported; ldm uses one value for all levels")
    layers = layers[0] if isinstance(layers, (list, tuple)) else layers
    depth = depth[0] if isinstance(depth, (list, tuple)) else depth
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    # diffusers' naming bug (PR #3797): without num_attention_heads, attention_head_dim is the number of heads
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    used = sorted(set(attn_levels) | {n - 1})  # the middle block attends at the deepest width
    head_counts = {heads[i] for i in used}
    widths = {boc[i] // heads[i] for i in used}
    if len(head_counts) == 1:
        head_args = {"num_heads": head_counts.pop(), "num_head_channels": -1}
    elif len(widths) == 1 and all(boc[i] % heads[i] == 0 for i in used):
        head_args = {"num_heads": -1, "num_head_channels": widths.pop()}
    else:
        raise ConfigError(f"heads per level {heads} with widths {boc}: neither the head count nor the head width is "
                         "constant, which ldm's UNet (num_heads / num_head_channels) cannot express")
    return dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], model_channels=mc,
        channel_mult=[c // mc for c in boc], num_res_blocks=layers,
        attention_resolutions=[2**i for i in attn_levels], **head_args, context_dim=ctx,
        use_linear_proj=bool(cfg.get("use_linear_projection", False)), transformer_depth=depth,
        dropout=float(cfg.get("dropout", 0.0)), num_classes=cfg.get("num_class_embeds"),
        use_scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
    )  # fmt: skip


def unet_config_to_diffusers(cfg: Mapping[str, Any], sample_size: int = 64,
                             upcast_attention: bool = False) -> dict[str, Any]:
    """Translate our ``UNet`` config into diffusers ``UNet2DConditionModel`` constructor arguments.

    ``sample_size`` (latents) is diffusers' default resolution; ``upcast_attention`` (SD 2.1's float32 attention
    scores in half precision) has no setting in our UNet, so the caller carries it."""
    if cfg.get("context_dim") is None:
        raise ConfigError("diffusers' UNet2DConditionModel needs a cross-attention context: context_dim is None")
    if cfg.get("pool_context"):
        raise ConfigError("pool_context=true (the mean context token added to the timestep embedding) has no "
                         "UNet2DConditionModel equivalent: export a UNet built with pool_context=false")
    mc, mult = cfg["model_channels"], list(cfg["channel_mult"])
    boc = [mc * m for m in mult]
    attn = [2**i in cfg["attention_resolutions"] for i in range(len(mult))]
    if cfg["num_head_channels"] == -1:
        heads = [cfg["num_heads"]] * len(mult)
    else:
        heads = [c // cfg["num_head_channels"] for c in boc]
    return dict(
        sample_size=sample_size, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=boc, layers_per_block=cfg["num_res_blocks"], cross_attention_dim=cfg["context_dim"],
        attention_head_dim=heads,  # diffusers' name for the head count (see unet_config_from_diffusers)
        transformer_layers_per_block=cfg["transformer_depth"], use_linear_projection=cfg["use_linear_proj"],
        dropout=cfg["dropout"], num_class_embeds=cfg["num_classes"],
        resnet_time_scale_shift="scale_shift" if cfg["use_scale_shift_norm"] else "default",
        upcast_attention=upcast_attention,
    )  # fmt: skip


def unet_key_map(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Module-prefix map from our (SD-layout) UNet names to diffusers' names, for the given config."""
    n, nrb = len(cfg["channel_mult"]), cfg["num_res_blocks"]
    attn = [2**i in cfg["attention_resolutions"] for i in range(n)]
    m: dict[str, str] = {
        "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb": "class_embedding", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
    }  # fmt: skip

    def resnet(ours: str, theirs: str) -> None:
        for a, b in _UNET_RESNET.items():
            m[f"{ours}.{a}"] = f"{theirs}.{b}"

    for i in range(n):
        for j in range(nrb):
            idx = 1 + i * (nrb + 1) + j
            resnet(f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}")
            if attn[i]:
                m[f"input_blocks.{idx}.1"] = f"down_blocks.{i}.attentions.{j}"
        if i != n - 1:
            m[f"input_blocks.{1 + i * (nrb + 1) + nrb}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    resnet("middle_block.0", "mid_block.resnets.0")
    m["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    for u in range(n):
        level = n - 1 - u
        for j in range(nrb + 1):
            idx = u * (nrb + 1) + j
            resnet(f"output_blocks.{idx}.0", f"up_blocks.{u}.resnets.{j}")
            if attn[level]:
                m[f"output_blocks.{idx}.1"] = f"up_blocks.{u}.attentions.{j}"
            if level and j == nrb:
                m[f"output_blocks.{idx}.{2 if attn[level] else 1}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
    return m


# ----------------------------------------------------------------------------------------------------------- VAE


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Translate a diffusers ``AutoencoderKL`` config into our ``AutoencoderKL`` constructor arguments."""
    _require(cfg, {"act_fn": "silu", "norm_num_groups": 32, "use_quant_conv": True, "use_post_quant_conv": True,
                   "mid_block_add_attention": True}, "AutoencoderKL")
    boc = list(cfg["block_out_channels"])
    for kinds, name in ((cfg["down_block_types"], "DownEncoderBlock2D"), (cfg["up_block_types"], "UpDecoderBlock2D")):
        if any(k != name for k in kinds):
            raise ConfigError(f"unsupported VAE block types {list(kinds)} (ldm supports {name})")
    ch = boc[0]
    if any(c % ch for c in boc):
        raise ConfigError(f"block_out_channels {boc} must be multiples of the first entry")
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    return dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], ch=ch, ch_mult=[c // ch for c in boc],
        num_res_blocks=cfg["layers_per_block"], z_channels=cfg["latent_channels"], embed_dim=cfg["latent_channels"],
        scale_factor=cfg.get("scaling_factor", SD_LATENT_SCALE), shift_factor=cfg.get("shift_factor"),
        latent_mean=list(mean) if mean is not None else None, latent_std=list(std) if std is not None else None,
    )  # fmt: skip


def vae_config_to_diffusers(cfg: Mapping[str, Any], sample_size: int = 512) -> dict[str, Any]:
    """Translate our ``AutoencoderKL`` config into diffusers ``AutoencoderKL`` constructor arguments."""
    if cfg["z_channels"] != cfg["embed_dim"]:
        raise ConfigError(f"diffusers' AutoencoderKL needs z_channels == embed_dim, got {cfg['z_channels']} and "
                         f"{cfg['embed_dim']}")
    n = len(cfg["ch_mult"])
    return dict(
        in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[cfg["ch"] * m for m in cfg["ch_mult"]], layers_per_block=cfg["num_res_blocks"],
        latent_channels=cfg["z_channels"], sample_size=sample_size, scaling_factor=cfg["scale_factor"],
        shift_factor=cfg["shift_factor"], latents_mean=cfg["latent_mean"], latents_std=cfg["latent_std"],
    )  # fmt: skip


def vae_key_map(cfg: Mapping[str, Any]) -> dict[str, str]:
    """Module-prefix map from our (SD ``first_stage_model`` layout) VAE names to diffusers' names."""
    n, nrb = len(cfg["ch_mult"]), cfg["num_res_blocks"]
    m: dict[str, str] = {k: k for k in ("quant_conv", "post_quant_conv")}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = f"{part}.conv_in"
        m[f"{part}.conv_out"] = f"{part}.conv_out"
        m[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        for ours, theirs in (("block_1", "resnets.0"), ("block_2", "resnets.1")):
            for a, b in _VAE_RESNET.items():
                m[f"{part}.mid.{ours}.{a}"] = f"{part}.mid_block.{theirs}.{b}"
        for a, b in _VAE_ATTN.items():
            m[f"{part}.mid.attn_1.{a}"] = f"{part}.mid_block.attentions.0.{b}"
    for i in range(n):
        for j in range(nrb):
            for a, b in _VAE_RESNET.items():
                m[f"encoder.down.{i}.block.{j}.{a}"] = f"encoder.down_blocks.{i}.resnets.{j}.{b}"
        if i != n - 1:
            m[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        u = n - 1 - i  # diffusers counts decoder levels from the deepest, SD from the finest
        for j in range(nrb + 1):
            for a, b in _VAE_RESNET.items():
                m[f"decoder.up.{i}.block.{j}.{a}"] = f"decoder.up_blocks.{u}.resnets.{j}.{b}"
        if i != 0:
            m[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{u}.upsamplers.0.conv"
    return m


def _is_vae_attn_weight(ours_key: str) -> bool:
    """Whether an SD-layout VAE key is a mid-attention projection weight (1x1 conv ours, Linear in diffusers)."""
    return ".mid.attn_1." in ours_key and ours_key.endswith(".weight") and ".norm." not in ours_key


# ----------------------------------------------------------------------------------------------------- scheduler

_SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # diffusers' scheduler of flow-matching models


def flow_schedule_to_diffusers(schedule: Mapping[str, Any]) -> dict[str, Any]:
    """A flow-matching model's schedule (``FlowMatchingLoss.spec``) -> ``FlowMatchEulerDiscreteScheduler`` keywords:
    the training shift, or dynamic shifting for ``resolution_shift``."""
    return {"num_train_timesteps": int(schedule.get("num_train_timesteps", 1000)),
            "shift": float(schedule.get("shift", 1.0)),
            "use_dynamic_shifting": bool(schedule.get("resolution_shift", False))}


def schedule_to_diffusers(schedule: Mapping[str, Any], prediction_type: str) -> dict[str, Any]:
    """Our noise schedule (``NoiseSchedule.from_name`` keywords) and prediction type -> diffusers scheduler config
    keywords (``DDPMScheduler`` and the other discrete-time schedulers)."""
    try:
        name = canonical_schedule_name(str(schedule.get("schedule")))
    except ValueError as err:
        raise ConfigError(f"schedule {dict(schedule)} has no diffusers scheduler equivalent ({err}): only the "
                          "linear, scaled_linear and cosine beta schedules go to a diffusers folder") from err
    try:
        prediction_type = canonical_prediction_type(prediction_type)
    except ValueError as err:
        raise ConfigError(f"prediction type {prediction_type!r} has no diffusers scheduler equivalent ({err})") from err
    return {"beta_schedule": _SCHEDULE_TO_DIFFUSERS[name],
            "num_train_timesteps": int(schedule.get("num_train_timesteps", 1000)),
            "beta_start": float(schedule.get("beta_start", 0.0001)), "beta_end": float(schedule.get("beta_end", 0.02)),
            "rescale_betas_zero_snr": bool(schedule.get("rescale_betas_zero_snr", False)),
            "prediction_type": prediction_type}


def schedule_from_diffusers(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A diffusers scheduler config -> our schedule (``NoiseSchedule.from_name`` keywords, or a flow model's
    ``FlowMatchingLoss.spec`` for a ``FlowMatchEulerDiscreteScheduler``) and prediction type."""
    if cfg.get("_class_name") == FLOW_SCHEDULER:
        return {"objective": "flow_matching", "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
                "shift": float(cfg.get("shift", 1.0)),
                "resolution_shift": bool(cfg.get("use_dynamic_shifting", False))}, FLOW_PREDICTION
    if cfg.get("trained_betas") is not None:
        raise ConfigError("the scheduler config lists trained_betas, which ldm's named schedules cannot express")
    try:
        name = canonical_schedule_name(str(cfg.get("beta_schedule", "linear")))
        prediction_type = canonical_prediction_type(str(cfg.get("prediction_type", "epsilon")))
    except ValueError as err:
        raise ConfigError(f"unsupported diffusers scheduler config: {err}") from err
    return {"schedule": name, "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
            "beta_start": float(cfg.get("beta_start", 0.0001)), "beta_end": float(cfg.get("beta_end", 0.02)),
            "rescale_betas_zero_snr": bool(cfg.get("rescale_betas_zero_snr", False))}, prediction_type


# -------------------------------------------------------------------------------------------------------- generic


def _rename(key: str, prefix_map: Mapping[str, str], what: str) -> str:
    """Rename ``key`` by the longest module prefix found in ``prefix_map``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefix_map:
            return prefix_map[prefix] + "." + ".".join(parts[cut:])
    raise KeyError(f"no {what} mapping for key {key!r}")


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor], prefix_map: Mapping[str, str], what: str
) -> dict[str, torch.Tensor]:
    """Rename every key of ``state_dict`` through ``prefix_map``; unknown keys raise a KeyError naming them."""
    unknown = []
    out = {}
    for k, v in state_dict.items():
        try:
            out[_rename(k, prefix_map, what)] = v
        except KeyError:
            unknown.append(k)
    if unknown:
        raise ConfigError(f"{what}: {len(unknown)} keys have no mapping, first: {unknown[:5]}")
    return out


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error listing the first missing / unexpected / misshaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"{what} state dict does not match the model: {len(missing)} missing keys (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:5]}), {len(shapes)} shape mismatches "
            f"(first: {shapes[:3]})"
        )
    module.load_state_dict(state_dict, strict=True)


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """Move ``module`` to the device and dtype of ``reference``'s parameters."""
    p, q = next(reference.parameters()), next(module.parameters())
    if (p.device, p.dtype) != (q.device, q.dtype):
        module = module.to(device=p.device, dtype=p.dtype)
    return module


def _is_diffusers(model: Any, name: str) -> bool:
    """Whether ``model`` is an instance of the diffusers class ``name`` (without importing diffusers eagerly)."""
    return any(c.__name__ == name and c.__module__.startswith("diffusers") for c in type(model).__mro__)


def from_diffusers(model: nn.Module) -> UNet | AutoencoderKL:
    """A diffusers ``UNet2DConditionModel`` or ``AutoencoderKL`` -> our module with the same weights and outputs."""
    if _is_diffusers(model, "UNet2DConditionModel"):
        cfg = unet_config_from_diffusers(_cfg(model))
        ours: nn.Module = UNet(**cfg)
        inverse = {v: k for k, v in unet_key_map(cfg).items()}
        load_state_dict_checked(ours, rename_state_dict(model.state_dict(), inverse, "diffusers UNet"), "UNet")
        return _like(ours, model)  # type: ignore[return-value]
    if _is_diffusers(model, "AutoencoderKL"):
        cfg = vae_config_from_diffusers(_cfg(model))
        ours = AutoencoderKL(**cfg)
        inverse = {v: k for k, v in vae_key_map(cfg).items()}
        sd = rename_state_dict(model.state_dict(), inverse, "diffusers AutoencoderKL")
        sd = {k: (v[:, :, None, None] if _is_vae_attn_weight(k) and v.ndim == 2 else v) for k, v in sd.items()}
        load_state_dict_checked(ours, sd, "AutoencoderKL")
        return _like(ours, model)  # type: ignore[return-value]
    raise TypeError(f"from_diffusers supports diffusers UNet2DConditionModel and AutoencoderKL, got "
                    f"{type(model).__name__}")


def to_diffusers_state_dict(module: UNet | AutoencoderKL) -> dict[str, torch.Tensor]:
    """Our UNet or AutoencoderKL -> a state dict in diffusers' naming."""
    if isinstance(module, UNet):
        return rename_state_dict(module.state_dict(), unet_key_map(module.config), "UNet")
    if isinstance(module, AutoencoderKL):
        sd = {k: (v[:, :, 0, 0] if _is_vae_attn_weight(k) else v) for k, v in module.state_dict().items()}
        return rename_state_dict(sd, vae_key_map(module.config), "AutoencoderKL")
    raise TypeError(f"to_diffusers supports ldm UNet and AutoencoderKL, got {type(module).__name__}")


def to_diffusers(module: UNet | AutoencoderKL, sample_size: int | None = None,
                 upcast_attention: bool = False) -> nn.Module:
    """Our UNet or AutoencoderKL -> the equivalent diffusers model with the same weights. ``sample_size``: the
    UNet's in latents (default 64), the VAE's in pixels (default 512); ``upcast_attention``: the UNet's flag."""
    import diffusers  # noqa: PLC0415  (optional dependency)

    if isinstance(module, UNet):
        model = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(module.config, sample_size or 64,
                                                                          upcast_attention))
    elif isinstance(module, AutoencoderKL):
        model = diffusers.AutoencoderKL(**vae_config_to_diffusers(module.config, sample_size or 512))
    else:
        raise TypeError(f"to_diffusers supports ldm UNet and AutoencoderKL, got {type(module).__name__}")
    load_state_dict_checked(model, to_diffusers_state_dict(module), f"diffusers {type(model).__name__}")
    return _like(model, module)
