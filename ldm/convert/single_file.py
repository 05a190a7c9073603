"""Original Stable Diffusion single-file checkpoints (.ckpt / .safetensors): export, import, config inference."""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ldm.autoencoder import AutoencoderKL
from ldm.convert.diffusers_format import load_state_dict_checked
from ldm.errors import ConfigError
from ldm.temporary_files import plain_mode, temporary_beside
from ldm.unet import UNet

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."

# What the SD layout cannot express travels as metadata: safetensors' string -> string header, or the top-level
# CKPT_METADATA entry of a .ckpt. Every value is JSON.
METADATA_FORMAT = 1
CKPT_METADATA = "ldm_metadata"
_META_KEYS = ("format", "unet", "vae", "prediction_type", "schedule", "sampling", "text_encoder", "diffusers")
_UNET_META = ("num_heads", "num_head_channels")
_VAE_META = ("scale_factor", "shift_factor", "latent_mean", "latent_std")


# SD 1.x: FrozenCLIPEmbedder's transformers CLIPTextModel; SD 2.x: FrozenOpenCLIPEmbedder's open_clip model.
SD1_TEXT_PREFIX = "transformer.text_model."
SD2_TEXT_PREFIX = "model."
# Buffers some library versions save and others do not (position ids, the causal mask): never weights.
_OPTIONAL_TEXT_KEYS = ("position_ids", "attn_mask")


class SDCheckpoint(NamedTuple):
    """What ``load_sd_checkpoint`` returns: our UNet and VAE, the text encoder's state dict as stored, the latent
    scale the file records (ldm metadata, or CompVis' ``scale_factor`` entry; None when absent), and what its ldm
    metadata records (None when absent): prediction type, noise schedule (``NoiseSchedule.from_name`` keywords),
    sampling defaults, text encoder options and diffusers-only UNet settings (see ``sd_metadata``)."""

    unet: UNet
    vae: AutoencoderKL
    cond_stage_state_dict: dict[str, torch.Tensor]
    scale_factor: float | None = None
    prediction_type: str | None = None
    schedule: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    heads_guessed: bool = False  # the file records no heads and none were given: the UNet's are a guess
    diffusers: dict[str, Any] | None = None  # diffusers' UNet settings ldm has none of: {"upcast_attention": true}
    ema: bool = False  # the UNet holds the file's EMA weights (model_ema.*)


def _hf_text_prefix(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Where an HFCLIPTextEncoder keeps the CLIP text transformer: ``model.text_model.`` (with a projection head,
    or transformers < 5) or ``model.`` (transformers >= 5 flattens ``CLIPTextModel``)."""
    return "model.text_model." if any(k.startswith("model.text_model.") for k in state_dict) else "model."


def text_encoder_sd_state_dict(text_encoder: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A text encoder's weights in the SD ``cond_stage_model.*`` layout (prefix not included).

    ``HFCLIPTextEncoder`` -> ``transformer.text_model.*`` (SD 1.x; a ``with_projection`` head is dropped, SD 1.x has
    none), ``OpenCLIPTextEncoder`` -> ``model.*`` (SD 2.x). A mapping is taken as already in the SD layout.
    """
    if isinstance(text_encoder, Mapping):
        return dict(text_encoder)
    from ldm.text.hf_encoder import HFCLIPTextEncoder  # noqa: PLC0415  (transformers only when needed)
    from ldm.text.openclip_encoder import OpenCLIPTextEncoder  # noqa: PLC0415

    if isinstance(text_encoder, HFCLIPTextEncoder):
        sd = text_encoder.state_dict()
        inner = _hf_text_prefix(sd)
        dropped = [k for k in sd if not k.startswith(inner)]
        if dropped:
            warnings.warn(f"the SD 1.x layout has no text projection: {dropped[:3]} not written", stacklevel=3)
        return {SD1_TEXT_PREFIX + k[len(inner):]: v for k, v in sd.items() if k.startswith(inner)}
    if isinstance(text_encoder, OpenCLIPTextEncoder):
        return {k: v for k, v in text_encoder.state_dict().items() if k.startswith(SD2_TEXT_PREFIX)}
    raise TypeError(
        f"the SD single-file layout has no place for a {type(text_encoder).__name__}: it stores an HFCLIPTextEncoder "
        "(SD 1.x) or an OpenCLIPTextEncoder (SD 2.x); pass a state dict to store other weights as given"
    )


def to_sd_state_dict(
    unet: UNet, vae: AutoencoderKL, text_encoder: nn.Module | Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Our modules -> one state dict in the original SD single-file layout.

    ``text_encoder`` goes under ``cond_stage_model.`` through ``text_encoder_sd_state_dict``: our transformers back
    end as SD 1.x's ``transformer.text_model.*``, our open_clip back end as SD 2.x's ``model.*``; a state dict as given.
    """
    out = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    if text_encoder is not None:
        out.update({TEXT_PREFIX + k: v for k, v in text_encoder_sd_state_dict(text_encoder).items()})
    return out


def text_encoder_metadata(text_encoder: nn.Module) -> dict[str, Any] | None:
    """What the SD layout loses of our text encoder: its head count and activation (``config``, overrides for
    ``load_sd_text_encoder``; for open_clip ``quick_gelu`` where its blocks use QuickGELU), the layer it conditions
    with (``clip_skip`` / ``layer``) and, for the transformers back end, the tokenizer's pad id (``pad_token_id``:
    SD 2.x-style models pad with 0, and the UNet saw those padded positions). None for other encoders."""
    from ldm.text.hf_encoder import HFCLIPTextEncoder  # noqa: PLC0415  (transformers only when needed)
    from ldm.text.openclip_encoder import OpenCLIPTextEncoder  # noqa: PLC0415

    if isinstance(text_encoder, HFCLIPTextEncoder):
        cfg = text_encoder.model.config
        return {"config": {"num_attention_heads": cfg.num_attention_heads, "hidden_act": cfg.hidden_act,
                           "layer_norm_eps": cfg.layer_norm_eps}, "clip_skip": text_encoder.clip_skip,
                "pad_token_id": text_encoder.tokenizer.pad_token_id}
    if isinstance(text_encoder, OpenCLIPTextEncoder):
        from open_clip.transformer import QuickGELU  # noqa: PLC0415

        block = text_encoder.model.transformer.resblocks[0]
        out: dict[str, Any] = {"config": {"heads": block.attn.num_heads}, "layer": text_encoder.layer}
        if isinstance(getattr(block.mlp, "gelu", None), QuickGELU):  # a *-quickgelu arch: not SD 2.x's GELU
            out["quick_gelu"] = True
        return out
    return None


def sd_metadata(
    unet: UNet,
    vae: AutoencoderKL,
    prediction_type: str | None = None,
    schedule: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    text_encoder: nn.Module | Mapping[str, Any] | None = None,
    diffusers: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The ``ldm.*`` metadata of an SD single file: what its tensor layout cannot express, as JSON strings.

    ``ldm.unet``: the UNet's ``num_heads`` / ``num_head_channels``; ``ldm.vae``: the latent ``scale_factor``,
    ``shift_factor``, ``latent_mean``, ``latent_std``; ``ldm.prediction_type``; ``ldm.schedule``: the
    ``NoiseSchedule.from_name`` keywords; ``ldm.sampling``: the sampling defaults; ``ldm.text_encoder``: see
    ``text_encoder_metadata`` (a mapping is stored as given); ``ldm.diffusers``: settings of diffusers' UNet that
    ldm's has no counterpart of, kept for the way back to a diffusers folder (``upcast_attention`` of SD 2.1). None
    values are left out.
    """
    if isinstance(text_encoder, nn.Module):
        text_encoder = text_encoder_metadata(text_encoder)
    values = {"format": METADATA_FORMAT, "unet": {k: unet.config[k] for k in _UNET_META},
              "vae": {k: vae.config[k] for k in _VAE_META}, "prediction_type": prediction_type,
              "schedule": None if schedule is None else dict(schedule),
              "sampling": None if sampling is None else dict(sampling),
              "text_encoder": None if text_encoder is None else dict(text_encoder),
              "diffusers": dict(diffusers) if diffusers else None}
    return {f"ldm.{k}": json.dumps(v) for k, v in values.items() if v is not None}


def parse_sd_metadata(metadata: Mapping[str, str] | None, source: str = "the checkpoint") -> dict[str, Any]:
    """The ``ldm.*`` entries of an SD file's metadata (``sd_metadata``), decoded, without the prefix; other
    entries (other tools' metadata) are ignored."""
    out: dict[str, Any] = {}
    for key, raw in (metadata or {}).items():
        if not key.startswith("ldm.") or key[4:] not in _META_KEYS:
            continue
        try:
            out[key[4:]] = json.loads(raw)
        except (TypeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{source}: metadata entry {key}={raw!r} is not valid JSON ({err}); fix or remove the "
                              "entry (the CLI also takes --num-heads, --latent-scale, ... overrides)") from err
    if int(out.get("format", METADATA_FORMAT)) > METADATA_FORMAT:
        raise ConfigError(f"{source} was written with ldm metadata format {out['format']}, newer than this ldm "
                          f"reads ({METADATA_FORMAT}): upgrade ldm")
    for key, allowed in (("unet", _UNET_META), ("vae", _VAE_META), ("diffusers", ("upcast_attention",))):
        if key in out and (not isinstance(out[key], dict) or set(out[key]) - set(allowed)):
            raise ConfigError(f"{source}: metadata entry ldm.{key}={metadata['ldm.' + key]!r} must be a JSON object "  # type: ignore[index]
                              f"with keys among {list(allowed)}")
    return out


def ema_key(key: str) -> str:
    """The name LitEma gives the EMA copy of ``model.<name>``: ``model_ema.`` + name without dots."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def read_state_dict(path: str | Path, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch (``.ckpt``/``.pt``/``.pth``/``.bin``) file; unwrap a ``state_dict`` entry.

    Torch files are read with ``weights_only=True``; files that need arbitrary unpickling are refused unless
    ``unsafe_pickle=True`` (only for files you trust).
    """
    return read_sd_file(path, unsafe_pickle)[0]


def is_foreign_pickle(err: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a whole pickle for the objects it holds beyond tensors (the
    Lightning callback of CompVis' SD .ckpt files), rather than failing on a damaged file or on no torch file."""
    return isinstance(err, pickle.UnpicklingError) and "GLOBAL " in str(err)


def torch_load_error(path: Path, err: BaseException, python_hint: str = "") -> ConfigError:
    """The ConfigError for a file that ``torch.load(weights_only=True)`` cannot read, by cause: a pickle of foreign
    objects (which ``python -m ldm.convert --unsafe-pickle`` reads once into a .safetensors file; ``python_hint`` adds
    the Python way), a torch file cut short or damaged (a zip or a pickle that does not load), or no torch file at all
    (a .yaml, an image)."""
    lines = str(err).strip().splitlines() or [""]
    if is_foreign_pickle(err):
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"it pickles {found.group(1)}" if found else lines[0][:200]
        return ConfigError(
            f"{path} holds pickled objects beyond tensors and plain containers ({what}), which "
            "torch.load(weights_only=True) refuses to run: if you trust the file, convert it once with `python -m "
            f"ldm.convert --unsafe-pickle {path} {path.with_suffix('.safetensors')}` and use the .safetensors file"
            f"{python_hint}")
    detail = f"{type(err).__name__}: {lines[0][:200]}"
    with open(path, "rb") as f:
        head = f.read(2)
    if head in (b"", b"PK") or head[:1] == b"\x80":  # empty, or torch's zip / legacy pickle formats
        return ConfigError(f"{path} is truncated or corrupt ({detail}): copy it again")
    return ConfigError(f"{path} is not a checkpoint torch can read ({detail}): give RUN/ldm/checkpoints/last.ckpt or "
                       "an SD .ckpt/.safetensors")


def read_sd_file(path: str | Path, unsafe_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``read_state_dict`` and the file's metadata: a safetensors header's string map, or a ``.ckpt``'s
    ``ldm_metadata`` entry (empty when there is none). A file that does not read is a ConfigError that names the
    cause (``torch_load_error``); ``unsafe_pickle`` unpickles foreign objects only, never a damaged file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open  # noqa: PLC0415

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except SafetensorError as err:
            raise ConfigError(f"{path} is truncated or corrupt (safetensors: {err}): copy it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises many kinds: each is told apart by torch_load_error)
        if not (unsafe_pickle and is_foreign_pickle(err)):
            raise torch_load_error(path, err, " (in Python: unsafe_pickle=True)") from err
        warnings.warn(f"unpickling {path} with weights_only=False: only do this for trusted files", stacklevel=2)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    metadata: dict[str, str] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get(CKPT_METADATA), Mapping):
        metadata = {str(k): str(v) for k, v in obj[CKPT_METADATA].items()}
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, metadata


def _sub(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix``, with it stripped."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _indices(keys: list[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over ``keys``."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_unet_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Our UNet constructor arguments from the tensor shapes of an SD-layout UNet state dict (prefix stripped).

    Head counts do not show in shapes: SD2-style UNets (linear projections or 1024-d context) get
    ``num_head_channels=64``, others ``num_heads=8`` (SD1); override through ``load_sd_checkpoint(unet_kwargs=...)``.
    A missing tensor is a ConfigError that names it.
    """
    cross = "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    if cross not in sd and "middle_block.1.qkv.weight" in sd:
        raise ConfigError(f"missing {UNET_PREFIX}{cross}: a UNet without text conditioning (its middle block is a "
                          "plain self-attention block, as in CompVis' LSUN / CelebA LDMs), which ldm does not "
                          "convert: give a text-conditioned SD 1.x/2.x file")
    try:
        return _unet_config_from_shapes(sd)
    except KeyError as err:
        raise ConfigError(f"not an SD-layout UNet state dict: missing {UNET_PREFIX}{err.args[0]} (a damaged or "
                          "partial file): copy the file again") from None


def _unet_config_from_shapes(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``infer_unet_config`` without the error messages (a missing tensor is a KeyError)."""
    mc = sd["time_embed.0.weight"].shape[1]
    in_ch, out_ch = sd["input_blocks.0.0.weight"].shape[1], sd["out.2.weight"].shape[0]
    mults: list[int] = []
    blocks_per_level: list[int] = [0]
    attn_levels: set[int] = set()
    for idx in _indices(list(sd), r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{idx}.0.op.weight" in sd:
            blocks_per_level.append(0)
            continue
        level = len(blocks_per_level) - 1
        out = sd[f"input_blocks.{idx}.0.out_layers.3.weight"].shape[0]
        if blocks_per_level[level] == 0:
            mults.append(out // mc)
        blocks_per_level[level] += 1
        if f"input_blocks.{idx}.1.norm.weight" in sd:
            attn_levels.add(level)
    if len(set(blocks_per_level)) != 1:
        raise ConfigError(f"unequal res blocks per level {blocks_per_level} are not supported")
    keys = list(sd)
    ctx = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    linear = sd["middle_block.1.proj_in.weight"].ndim == 2
    depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    emb_out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    sd2 = linear or ctx == 1024
    return dict(
        in_channels=in_ch, out_channels=out_ch, model_channels=mc, channel_mult=mults,
        num_res_blocks=blocks_per_level[0], attention_resolutions=[2**lv for lv in sorted(attn_levels)],
        num_heads=-1 if sd2 else 8, num_head_channels=64 if sd2 else -1, context_dim=ctx, use_linear_proj=linear,
        transformer_depth=depth, num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else None,
        use_scale_shift_norm=emb_out == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0],
        pool_context="context_emb.0.weight" in sd,
    )  # fmt: skip


def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Our AutoencoderKL constructor arguments from the tensor shapes of an SD-layout VAE state dict."""
    try:
        ch, in_ch = sd["encoder.conv_in.weight"].shape[:2]
        z_ch = sd["decoder.conv_in.weight"].shape[1]
        embed = sd["post_quant_conv.weight"].shape[1]
        out_ch = sd["decoder.conv_out.weight"].shape[0]
    except KeyError as err:
        raise ConfigError(f"not an SD-layout VAE state dict: missing {err}") from err
    levels = _indices(list(sd), r"encoder\.down\.(\d+)\.")
    mults = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    nrb = len(_indices(list(sd), r"encoder\.down\.0\.block\.(\d+)\."))
    return dict(in_channels=in_ch, out_channels=out_ch, ch=ch, ch_mult=mults, num_res_blocks=nrb, z_channels=z_ch,
                embed_dim=embed)


def _apply_ema(state_dict: dict[str, torch.Tensor], prefer_ema: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """Replace the UNet weights by their EMA copies (``model_ema.*``) when all are present and preferred; also
    whether it did."""
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    has_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
    if not (prefer_ema and has_ema and unet_keys):
        return state_dict, False
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        warnings.warn(f"EMA weights incomplete ({len(missing)} of {len(unet_keys)} missing, first: {missing[:3]}); "
                      "using the non-EMA UNet weights", stacklevel=3)
        return state_dict, False
    out = dict(state_dict)
    for k in unet_keys:
        out[k] = state_dict[ema_key(k)]
    return out, True


def load_sd_checkpoint(
    path: str | Path,
    prefer_ema: bool = True,
    unsafe_pickle: bool = False,
    unet_kwargs: Mapping[str, Any] | None = None,
    vae_kwargs: Mapping[str, Any] | None = None,
    default_heads: Mapping[str, Any] | None = None,
) -> SDCheckpoint:
    """Load an original-layout SD checkpoint: our UNet (EMA weights preferred) and VAE, configs inferred from shapes
    and from the file's ldm metadata (``sd_metadata``) when it has some.

    ``unet_kwargs`` / ``vae_kwargs`` override inferred, stored or default arguments (e.g. ``num_heads``,
    ``scale_factor``). ``default_heads`` are the heads to build with when the file records none (a run's declared
    ones), instead of guessing them from the shapes.
    """
    state_dict, metadata = read_sd_file(path, unsafe_pickle)
    return sd_checkpoint_from_state_dict(state_dict, prefer_ema, unet_kwargs, vae_kwargs, source=str(path),
                                         metadata=metadata, default_heads=default_heads)


def _with_heads(cfg: dict[str, Any], heads: Mapping[str, Any]) -> None:
    """Update ``cfg`` by ``heads`` (num_heads / num_head_channels), clearing the other one when only one is given."""
    if "num_heads" in heads and "num_head_channels" not in heads:
        cfg["num_head_channels"] = -1
    if "num_head_channels" in heads and "num_heads" not in heads:
        cfg["num_heads"] = -1
    cfg.update(heads)


def sd_checkpoint_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    prefer_ema: bool = True,
    unet_kwargs: Mapping[str, Any] | None = None,
    vae_kwargs: Mapping[str, Any] | None = None,
    source: str = "the state dict",
    metadata: Mapping[str, str] | None = None,
    default_heads: Mapping[str, Any] | None = None,
) -> SDCheckpoint:
    """``load_sd_checkpoint`` on a state dict (SD single-file layout) and its file's metadata already in memory.

    Without ``ldm.unet`` metadata, ``unet_kwargs`` heads or ``default_heads``, the head configuration is guessed from
    the shapes (``infer_unet_config``) with a warning that names the guess.
    """
    meta = parse_sd_metadata(metadata, source)
    state_dict, ema = _apply_ema(dict(state_dict), prefer_ema)
    unet_sd, vae_sd = _sub(state_dict, UNET_PREFIX), _sub(state_dict, VAE_PREFIX)
    vae_sd = {k: v for k, v in vae_sd.items() if not k.startswith("loss.")}  # training-only LPIPS/discriminator
    if not unet_sd or not vae_sd:
        raise ConfigError(f"{source} is not an SD single-file checkpoint: found {len(unet_sd)} '{UNET_PREFIX}*' and "
                          f"{len(vae_sd)} '{VAE_PREFIX}*' keys")
    try:
        unet_cfg, vae_cfg = infer_unet_config(unet_sd), infer_vae_config(vae_sd)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    explicit = {k: v for k, v in (unet_kwargs or {}).items() if k in _UNET_META}
    if "unet" in meta:
        _with_heads(unet_cfg, meta["unet"])
    elif default_heads and not explicit:
        _with_heads(unet_cfg, default_heads)
    guessed = "unet" not in meta and not default_heads and not explicit
    if guessed:
        guess = {k: unet_cfg[k] for k in _UNET_META if unet_cfg[k] != -1}
        warnings.warn(
            f"{source} does not record the UNet's attention heads (no ldm.unet metadata): guessed "
            f"{', '.join(f'{k}={v}' for k, v in guess.items())} from the tensor shapes (the Stable Diffusion "
            f"{'2.x' if 'num_head_channels' in guess else '1.x'} convention). A model trained with other heads gives "
            "wrong outputs: pass unet_kwargs={'num_heads': N} or {'num_head_channels': C} (CLI: --num-heads / "
            "--num-head-channels)", stacklevel=3)
    if unet_kwargs:
        _with_heads(unet_cfg, unet_kwargs)
    unet = UNet(**unet_cfg)
    load_state_dict_checked(unet, unet_sd, "UNet")
    stored_scale = state_dict.get("scale_factor")
    scale = float(stored_scale) if isinstance(stored_scale, torch.Tensor) and stored_scale.numel() == 1 else None
    # the VAE normalises as the file records (CompVis' scale_factor entry, then ldm metadata), unless told otherwise
    recorded = {} if scale is None else {"scale_factor": scale}
    vae = AutoencoderKL(**{**vae_cfg, **recorded, **meta.get("vae", {}), **(vae_kwargs or {})})
    load_state_dict_checked(vae, vae_sd, "AutoencoderKL")
    if "scale_factor" in meta.get("vae", {}):
        scale = float(meta["vae"]["scale_factor"])
    return SDCheckpoint(unet, vae, _sub(state_dict, TEXT_PREFIX), scale, meta.get("prediction_type"),
                        meta.get("schedule"), meta.get("sampling"), meta.get("text_encoder"), guessed,
                        meta.get("diffusers"), ema)


def sd_default_image_size(family: str | None, prediction_type: str | None) -> int:
    """The resolution an SD single file samples at when it records none: 768 px for the SD 2.x v-prediction models
    (stable-diffusion-2-1, 2-768-v), 512 px for the others (SD 1.x, SD 2.x-base). ``family`` is ``sd_text_family``'s."""
    return 768 if family == "sd2" and prediction_type == "v_prediction" else 512


def sd_text_family(cond_sd: Mapping[str, torch.Tensor]) -> str | None:
    """``"sd1"`` (transformers CLIP), ``"sd2"`` (open_clip) or None, from ``cond_stage_model.*`` names (stripped)."""
    if any(k.startswith(SD1_TEXT_PREFIX) for k in cond_sd):
        return "sd1"
    if f"{SD2_TEXT_PREFIX}token_embedding.weight" in cond_sd:
        return "sd2"
    return None


def infer_clip_text_config(cond_sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` dict from SD 1.x ``transformer.text_model.*`` shapes (64-wide heads)."""
    sd = _sub(cond_sd, SD1_TEXT_PREFIX)
    try:
        vocab, hidden = sd["embeddings.token_embedding.weight"].shape
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        intermediate = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ConfigError(
            f"not an SD 1.x CLIP text encoder state dict: missing {SD1_TEXT_PREFIX}{err.args[0]}") from err
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=len(_indices(list(sd), r"encoder\.layers\.(\d+)\.")),
        num_attention_heads=max(1, hidden // 64), max_position_embeddings=positions, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
    )  # fmt: skip


def infer_open_clip_text_config(cond_sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``open_clip.create_model`` keywords (``embed_dim``, ``text_cfg``) from SD 2.x ``model.*`` shapes."""
    sd = _sub(cond_sd, SD2_TEXT_PREFIX)
    try:
        vocab, width = sd["token_embedding.weight"].shape
        context = sd["positional_embedding"].shape[0]
        mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as err:
        raise ConfigError(f"not an SD 2.x open_clip text state dict: missing {SD2_TEXT_PREFIX}{err.args[0]}") from err
    if "text_projection" in sd:  # a [width, embed_dim] parameter, as in SD 2.x
        embed_dim = sd["text_projection"].shape[1]
    else:  # an nn.Linear (newer open_clip towers), or none
        embed_dim = sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else width
    layers = len(_indices(list(sd), r"transformer\.resblocks\.(\d+)\."))
    text_cfg = dict(context_length=context, vocab_size=vocab, width=width, heads=max(1, width // 64), layers=layers,
                    mlp_ratio=mlp / width)
    return dict(embed_dim=embed_dim, text_cfg=text_cfg)


def sd_text_encoder_spec(
    cond_sd: Mapping[str, torch.Tensor],
    text_config: Mapping[str, Any] | None = None,
    stored: Mapping[str, Any] | None = None,
) -> tuple[type[nn.Module], dict[str, Any]]:
    """The class and constructor arguments of our text encoder for an SD ``cond_stage_model.*`` state dict (prefix
    stripped): see ``load_sd_text_encoder``."""
    stored = stored or {}
    config = {**stored.get("config", {}), **(text_config or {})}
    family = sd_text_family(cond_sd)
    if family == "sd1":
        from ldm.text.hf_encoder import HFCLIPTextEncoder  # noqa: PLC0415
        from ldm.text.tokenizer import HF_CLIP_PAD_ID  # noqa: PLC0415

        return HFCLIPTextEncoder, {"config": {**infer_clip_text_config(cond_sd), **config},
                                   "clip_skip": int(stored.get("clip_skip", 1)),
                                   "pad_token_id": int(stored.get("pad_token_id", HF_CLIP_PAD_ID))}
    if family == "sd2":
        from ldm.text.openclip_encoder import OpenCLIPTextEncoder  # noqa: PLC0415

        kw = infer_open_clip_text_config(cond_sd)
        kw["text_cfg"].update(config)
        # a token vision tower: open_clip builds one, OpenCLIPTextEncoder deletes it
        kw["vision_cfg"] = dict(image_size=32, patch_size=16, width=64, head_width=64, layers=1)
        if stored.get("quick_gelu"):
            kw["quick_gelu"] = True
        return OpenCLIPTextEncoder, {"arch": "ViT-H-14", "layer": stored.get("layer", "penultimate"),
                                     "model_kwargs": kw}
    raise ConfigError(f"unknown SD text encoder layout: expected cond_stage_model.{SD1_TEXT_PREFIX}* (SD 1.x) or "
                      f"cond_stage_model.{SD2_TEXT_PREFIX}token_embedding.weight (SD 2.x), got {sorted(cond_sd)[:5]}")


def load_sd_text_encoder(cond_sd: Mapping[str, torch.Tensor], text_config: Mapping[str, Any] | None = None,
                         stored: Mapping[str, Any] | None = None) -> nn.Module:
    """Our text encoder with the weights of an SD ``cond_stage_model.*`` state dict (prefix stripped).

    SD 1.x (``transformer.text_model.*``): ``HFCLIPTextEncoder`` (last layer). SD 2.x (``model.*``):
    ``OpenCLIPTextEncoder`` on the penultimate layer, as SD 2.x conditions. Shapes give every size but the head
    count, taken as width // 64 (CLIP ViT-L/14 and ViT-H/14); ``stored`` (the file's ``ldm.text_encoder``
    metadata, see ``text_encoder_metadata``) gives the head count and layer of a model ldm exported, and
    ``text_config`` overrides the ``CLIPTextConfig`` keys (SD 1.x) or open_clip ``text_cfg`` keys (SD 2.x).
    """
    cls, kwargs = sd_text_encoder_spec(cond_sd, text_config, stored)
    encoder = cls(**kwargs)
    if sd_text_family(cond_sd) == "sd1":
        inner = _hf_text_prefix(encoder.state_dict())
        weights = {inner + k[len(SD1_TEXT_PREFIX):]: v for k, v in cond_sd.items() if k.startswith(SD1_TEXT_PREFIX)}
    else:
        weights = {k: v for k, v in cond_sd.items() if k.startswith(SD2_TEXT_PREFIX)}
    own = encoder.state_dict()
    weights = {k: v for k, v in weights.items() if k in own or k.rsplit(".", 1)[-1] not in _OPTIONAL_TEXT_KEYS}
    load_state_dict_checked(encoder, weights, type(encoder).__name__)
    return encoder.eval()


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict as ``.safetensors`` (``metadata`` in its header) or as a torch ``.ckpt``
    (``{"state_dict": ..., "ldm_metadata": metadata}``, SD's convention), through a temporary file renamed into place,
    so a failed write leaves no partial file."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise ConfigError(f"unknown checkpoint suffix {path.suffix!r} for {path}: use .safetensors or .ckpt")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    fd, tmp = temporary_beside(path)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file  # noqa: PLC0415

            save_file(tensors, tmp, metadata=meta or None)
        else:
            torch.save({"state_dict": tensors, **({CKPT_METADATA: meta} if meta else {})}, tmp)
        os.chmod(tmp, plain_mode())  # safetensors writes a file of its own, 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
