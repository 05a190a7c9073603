"""Original Stable Diffusion single-file checkpoints (.ckpt / .safetensors): export, import, config inference."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ldm.autoencoder import AutoencoderKL
from ldm.convert.diffusers_format import load_state_dict_checked
from ldm.unet import UNet

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."


# SD 1.x: FrozenCLIPEmbedder's transformers CLIPTextModel; SD 2.x: FrozenOpenCLIPEmbedder's open_clip model.
SD1_TEXT_PREFIX = "transformer.text_model."
SD2_TEXT_PREFIX = "model."
# Buffers some library versions save and others do not (position ids, the causal mask): never weights.
_OPTIONAL_TEXT_KEYS = ("position_ids", "attn_mask")


class SDCheckpoint(NamedTuple):
    """What ``load_sd_checkpoint`` returns: our UNet and VAE, the text encoder's state dict as stored, and the file's
    ``scale_factor`` entry (CompVis stores it when ``scale_by_std``; None when absent)."""

    unet: UNet
    vae: AutoencoderKL
    cond_stage_state_dict: dict[str, torch.Tensor]
    scale_factor: float | None = None


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


def ema_key(key: str) -> str:
    """The name LitEma gives the EMA copy of ``model.<name>``: ``model_ema.`` + name without dots."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def read_state_dict(path: str | Path, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch (``.ckpt``/``.pt``/``.pth``/``.bin``) file; unwrap a ``state_dict`` entry.

    Torch files are read with ``weights_only=True``; files that need arbitrary unpickling are refused unless
    ``unsafe_pickle=True`` (only for files you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle of non-tensor objects (e.g. Lightning callbacks' state)
        if not unsafe_pickle:
            raise ValueError(
                f"{path} cannot be read with torch.load(weights_only=True) ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0][:200]}); if you "
                "trust the file, pass unsafe_pickle=True (CLI: --unsafe-pickle), or convert it to .safetensors"
            ) from err
        warnings.warn(f"unpickling {path} with weights_only=False: only do this for trusted files", stacklevel=2)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


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
    """
    try:
        mc = sd["time_embed.0.weight"].shape[1]
        in_ch, out_ch = sd["input_blocks.0.0.weight"].shape[1], sd["out.2.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not an SD-layout UNet state dict: missing {err}") from err
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
        raise ValueError(f"unequal res blocks per level {blocks_per_level} are not supported")
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
        raise ValueError(f"not an SD-layout VAE state dict: missing {err}") from err
    levels = _indices(list(sd), r"encoder\.down\.(\d+)\.")
    mults = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels]
    nrb = len(_indices(list(sd), r"encoder\.down\.0\.block\.(\d+)\."))
    return dict(in_channels=in_ch, out_channels=out_ch, ch=ch, ch_mult=mults, num_res_blocks=nrb, z_channels=z_ch,
                embed_dim=embed)


def _apply_ema(state_dict: dict[str, torch.Tensor], prefer_ema: bool) -> dict[str, torch.Tensor]:
    """Replace the UNet weights by their EMA copies (``model_ema.*``) when all are present and preferred."""
    unet_keys = [k for k in state_dict if k.startswith(UNET_PREFIX)]
    has_ema = any(k.startswith(EMA_PREFIX) for k in state_dict)
    if not (prefer_ema and has_ema and unet_keys):
        return state_dict
    missing = [k for k in unet_keys if ema_key(k) not in state_dict]
    if missing:
        warnings.warn(f"EMA weights incomplete ({len(missing)} of {len(unet_keys)} missing, first: {missing[:3]}); "
                      "using the non-EMA UNet weights", stacklevel=3)
        return state_dict
    out = dict(state_dict)
    for k in unet_keys:
        out[k] = state_dict[ema_key(k)]
    return out


def load_sd_checkpoint(
    path: str | Path,
    prefer_ema: bool = True,
    unsafe_pickle: bool = False,
    unet_kwargs: Mapping[str, Any] | None = None,
    vae_kwargs: Mapping[str, Any] | None = None,
) -> SDCheckpoint:
    """Load an original-layout SD checkpoint: our UNet (EMA weights preferred) and VAE, configs inferred from shapes.

    ``unet_kwargs`` / ``vae_kwargs`` override inferred or default arguments (e.g. ``num_heads``, ``scale_factor``).
    """
    return sd_checkpoint_from_state_dict(read_state_dict(path, unsafe_pickle), prefer_ema, unet_kwargs, vae_kwargs,
                                         source=str(path))


def sd_checkpoint_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    prefer_ema: bool = True,
    unet_kwargs: Mapping[str, Any] | None = None,
    vae_kwargs: Mapping[str, Any] | None = None,
    source: str = "the state dict",
) -> SDCheckpoint:
    """``load_sd_checkpoint`` on a state dict already in memory (SD single-file layout)."""
    state_dict = _apply_ema(dict(state_dict), prefer_ema)
    unet_sd, vae_sd = _sub(state_dict, UNET_PREFIX), _sub(state_dict, VAE_PREFIX)
    vae_sd = {k: v for k, v in vae_sd.items() if not k.startswith("loss.")}  # training-only LPIPS/discriminator
    if not unet_sd or not vae_sd:
        raise ValueError(f"{source} is not an SD single-file checkpoint: found {len(unet_sd)} '{UNET_PREFIX}*' and "
                         f"{len(vae_sd)} '{VAE_PREFIX}*' keys")
    unet_cfg = infer_unet_config(unet_sd)
    if unet_kwargs:
        if "num_heads" in unet_kwargs and "num_head_channels" not in unet_kwargs:
            unet_cfg["num_head_channels"] = -1
        if "num_head_channels" in unet_kwargs and "num_heads" not in unet_kwargs:
            unet_cfg["num_heads"] = -1
        unet_cfg.update(unet_kwargs)
    unet = UNet(**unet_cfg)
    load_state_dict_checked(unet, unet_sd, "UNet")
    vae = AutoencoderKL(**{**infer_vae_config(vae_sd), **(vae_kwargs or {})})
    load_state_dict_checked(vae, vae_sd, "AutoencoderKL")
    stored_scale = state_dict.get("scale_factor")
    scale = float(stored_scale) if isinstance(stored_scale, torch.Tensor) and stored_scale.numel() == 1 else None
    return SDCheckpoint(unet, vae, _sub(state_dict, TEXT_PREFIX), scale)


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
        raise ValueError(f"not an SD 1.x CLIP text encoder state dict: missing {SD1_TEXT_PREFIX}{err.args[0]}") from err
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
        raise ValueError(f"not an SD 2.x open_clip text state dict: missing {SD2_TEXT_PREFIX}{err.args[0]}") from err
    if "text_projection" in sd:  # a [width, embed_dim] parameter, as in SD 2.x
        embed_dim = sd["text_projection"].shape[1]
    else:  # an nn.Linear (newer open_clip towers), or none
        embed_dim = sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else width
    layers = len(_indices(list(sd), r"transformer\.resblocks\.(\d+)\."))
    text_cfg = dict(context_length=context, vocab_size=vocab, width=width, heads=max(1, width // 64), layers=layers,
                    mlp_ratio=mlp / width)
    return dict(embed_dim=embed_dim, text_cfg=text_cfg)


def load_sd_text_encoder(cond_sd: Mapping[str, torch.Tensor], text_config: Mapping[str, Any] | None = None
                         ) -> nn.Module:
    """Our text encoder with the weights of an SD ``cond_stage_model.*`` state dict (prefix stripped).

    SD 1.x (``transformer.text_model.*``): ``HFCLIPTextEncoder`` (last layer). SD 2.x (``model.*``):
    ``OpenCLIPTextEncoder`` on the penultimate layer, as SD 2.x conditions. Shapes give every size but the head
    count, taken as width // 64 (CLIP ViT-L/14 and ViT-H/14); ``text_config`` overrides the inferred
    ``CLIPTextConfig`` keys (SD 1.x) or open_clip ``text_cfg`` keys (SD 2.x).
    """
    family = sd_text_family(cond_sd)
    if family == "sd1":
        from ldm.text.hf_encoder import HFCLIPTextEncoder  # noqa: PLC0415

        config = {**infer_clip_text_config(cond_sd), **(text_config or {})}
        encoder: nn.Module = HFCLIPTextEncoder(config=config)
        inner = _hf_text_prefix(encoder.state_dict())
        weights = {inner + k[len(SD1_TEXT_PREFIX):]: v for k, v in cond_sd.items() if k.startswith(SD1_TEXT_PREFIX)}
    elif family == "sd2":
        from ldm.text.openclip_encoder import OpenCLIPTextEncoder  # noqa: PLC0415

        kw = infer_open_clip_text_config(cond_sd)
        kw["text_cfg"].update(text_config or {})
        # a token vision tower: open_clip builds one, OpenCLIPTextEncoder deletes it
        kw["vision_cfg"] = dict(image_size=32, patch_size=16, width=64, head_width=64, layers=1)
        encoder = OpenCLIPTextEncoder("ViT-H-14", layer="penultimate", model_kwargs=kw)
        weights = {k: v for k, v in cond_sd.items() if k.startswith(SD2_TEXT_PREFIX)}
    else:
        raise ValueError(f"unknown SD text encoder layout: expected cond_stage_model.{SD1_TEXT_PREFIX}* (SD 1.x) or "
                         f"cond_stage_model.{SD2_TEXT_PREFIX}token_embedding.weight (SD 2.x), got "
                         f"{sorted(cond_sd)[:5]}")
    own = encoder.state_dict()
    weights = {k: v for k, v in weights.items() if k in own or k.rsplit(".", 1)[-1] not in _OPTIONAL_TEXT_KEYS}
    load_state_dict_checked(encoder, weights, type(encoder).__name__)
    return encoder.eval()


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as ``.safetensors`` or as a torch ``.ckpt`` (``{"state_dict": ...}``, SD's convention)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file(tensors, str(path))
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": tensors}, path)
    else:
        raise ValueError(f"unknown checkpoint suffix {path.suffix!r} for {path}: use .safetensors or .ckpt")
