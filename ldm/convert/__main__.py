"""Convert a model (``python -m ldm.convert SRC DST``) between ldm checkpoints (``RUN/ldm/checkpoints/*.ckpt`` of
train.py), original SD single files (.safetensors / .ckpt) and diffusers folders.

SRC is recognised by what it is: a folder is a diffusers model (unet/, vae/, optionally text_encoder/, scheduler/),
a file with an ldm header is an ldm checkpoint (its EMA weights unless --no-ema), any other file an SD single file.
DST is an SD single file when it ends in .safetensors / .ckpt / .pt / .pth, else a diffusers folder; --to ldm writes
an ldm checkpoint (.ckpt) that the pipeline and sample.py load. SD files are written with ``ldm.*`` metadata (the
UNet's heads, the latent scale and shift, prediction type, noise schedule, sampling defaults, text-encoder options)
and read back with it; for files without it, the head count is guessed from the shapes (with a warning) and the
override flags below set what the file does not say.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.autoencoder import AutoencoderKL
from ldm.convert.diffusers_format import (
    flow_schedule_to_diffusers,
    from_diffusers,
    schedule_from_diffusers,
    schedule_to_diffusers,
    to_diffusers,
)
from ldm.convert.single_file import (
    load_sd_text_encoder,
    parse_sd_metadata,
    read_sd_file,
    read_state_dict,
    save_state_dict,
    sd_checkpoint_from_state_dict,
    sd_default_image_size,
    sd_metadata,
    sd_text_encoder_spec,
    sd_text_family,
    text_encoder_metadata,
    text_encoder_sd_state_dict,
    to_sd_state_dict,
)
from ldm.diffusion.noise_schedule import NoiseSchedule
from ldm.diffusion.parameterization import canonical_prediction_type
from ldm.diffusion.sampling import is_flow_model
from ldm.diffusion.schedules import SD_SCHEDULE
from ldm.errors import ConfigError
from ldm.temporary_files import current_umask
from ldm.text.tokenizer import folder_pad_token_id
from ldm.unet import UNet

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SD_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
_CLIP_TOWER = ("embeddings.", "encoder.", "final_layer_norm.")  # a CLIPTextModel's keys in transformers >= 5
FOLDER_METADATA = "ldm_metadata.json"  # a diffusers folder's record of what diffusers' configs have no place for


@dataclass
class Model:
    """A model between reading and writing: UNet and VAE, the text encoder as a module (ldm sources) or as SD-layout
    weights (``cond_stage_model.*`` without the prefix) with its ``text_encoder_metadata`` options, and what the
    source records of its diffusion process (None where it records nothing)."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: nn.Module | None = None
    text_sd: dict[str, torch.Tensor] | None = None
    text_options: dict[str, Any] | None = None
    prediction_type: str | None = None
    schedule: dict[str, Any] | None = None
    sampling: dict[str, Any] | None = None
    guessed: tuple[str, ...] = ()  # "unet" (heads) / "vae" (latent scale): assumed, so not recorded as metadata
    default_image_size: int | None = None  # an SD file's resolution where it records none, as load_parts reads it
    diffusers: dict[str, Any] | None = None  # diffusers' UNet settings ldm has none of: {"upcast_attention": True}
    text_spec: dict[str, Any] | None = None  # an ldm source's text encoder as its header records it (module_spec)

    def sd_text(self) -> dict[str, torch.Tensor] | None:
        """The text encoder's weights in the SD layout, or None when the model has none."""
        if self.text_encoder is None:
            return self.text_sd
        try:
            return text_encoder_sd_state_dict(self.text_encoder)
        except TypeError as err:
            raise ConfigError(f"{err}; or write a diffusers folder or an ldm checkpoint instead") from None


# ------------------------------------------------------------------------------------------------------- reading


def source_kind(src: Path) -> str:
    """``diffusers``, ``ldm`` or ``sd`` for SRC; a ConfigError when it does not exist."""
    if src.is_dir():
        if not (src / "unet").is_dir() or not (src / "vae").is_dir():
            raise ConfigError(f"{src} is a folder but not a diffusers model: it needs unet/ and vae/ subfolders")
        return "diffusers"
    if not src.is_file():
        raise ConfigError(f"{src} does not exist: give an ldm checkpoint (RUN/ldm/checkpoints/last.ckpt), an SD "
                          ".safetensors/.ckpt file or a diffusers folder")
    if src.suffix == ".safetensors":
        return "sd"
    try:  # mmap: only the header is read, the tensors stay on disk
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (pickled objects or an old format: the SD reader explains --unsafe-pickle)
        return "sd"
    return "ldm" if isinstance(obj, dict) and ("ldm" in obj or obj.get("kind") == "autoencoder") else "sd"


def _load_ldm(src: Path, use_ema: bool) -> Model:
    """An ldm checkpoint's parts (glue: ``ldm.checkpoint`` sits above ``ldm.convert``, so it is imported here)."""
    from ldm.checkpoint import load_parts, read_checkpoint  # noqa: PLC0415
    from ldm.lora import has_lora, merge_lora  # noqa: PLC0415

    parts = load_parts(src, use_ema=use_ema)
    header = read_checkpoint(src, mmap=True)["ldm"]
    flags = header.get("diffusers")  # what write_ldm kept of a diffusers source
    for name, part in (("UNet", parts.unet), ("text encoder", parts.text_encoder)):
        if part is not None and has_lora(part):  # SD files and diffusers folders hold plain weights
            merge_lora(part)
            print(f"note: {src} is a LoRA run: its {name}'s adapters are merged into the base weights",
                  file=sys.stderr)
    if parts.first_stage is None:
        raise ConfigError(f"{src} is a pixel-space model (no first stage): SD files and diffusers folders hold latent "
                          "diffusion models only")
    if not isinstance(parts.unet, UNet) or not isinstance(parts.first_stage, AutoencoderKL):
        raise ConfigError(f"{src} holds a {type(parts.unet).__name__} and a {type(parts.first_stage).__name__}: "
                          "only ldm.unet.UNet and ldm.autoencoder.AutoencoderKL convert")
    return Model(parts.unet, parts.first_stage, text_encoder=parts.text_encoder,
                 text_options=None if parts.text_encoder is None else text_encoder_metadata(parts.text_encoder),
                 prediction_type=parts.prediction_type, schedule=dict(parts.schedule),
                 sampling=parts.sampling.to_dict(), diffusers=flags, text_spec=header.get("text_encoder"))


def _load_sd(src: Path, args: argparse.Namespace) -> Model:
    """An SD single file, its ldm metadata applied and then the override flags."""
    state, metadata = read_sd_file(src, args.unsafe_pickle)
    unet_kwargs, vae_kwargs = _unet_overrides(args), _vae_overrides(args)
    ckpt = sd_checkpoint_from_state_dict(state, not args.no_ema, unet_kwargs, vae_kwargs, str(src), metadata)
    stored = parse_sd_metadata(metadata, str(src))
    known = {"unet": bool(unet_kwargs), "vae": bool(vae_kwargs) or ckpt.scale_factor is not None}  # given or stored
    guessed = tuple(k for k in ("unet", "vae") if k not in stored and not known[k])
    return Model(ckpt.unet, ckpt.vae, text_sd=ckpt.cond_stage_state_dict or None, text_options=ckpt.text_encoder,
                 prediction_type=ckpt.prediction_type, schedule=ckpt.schedule, sampling=ckpt.sampling,
                 guessed=guessed, diffusers=ckpt.diffusers)


def _weight_files(folder: Path) -> list[Path]:
    """The weights of a transformers model folder, as ``save_pretrained`` names them: ``model.safetensors`` or
    ``pytorch_model.bin``, else a variant (``model.fp16.safetensors``, diffusers' ``variant="fp16"``), else the shards
    a ``*.index.json`` lists; the plain file first, as ``from_pretrained`` prefers it. Empty when there are none."""
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        for pattern in (f"{stem}.{ext}", f"{stem}.*.{ext}"):
            single = sorted(p for p in folder.glob(pattern) if "-of-" not in p.name)
            if single:
                return single[:1]
        for index in sorted(folder.glob(f"{stem}*.{ext}.index*.json")):
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
            if shards:
                return [folder / s for s in shards]
    return []


def _diffusers_text_encoder(folder: Path) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """An SD1-style CLIP text encoder from ``folder/text_encoder`` in the SD layout (``transformer.text_model.*``),
    its head count and activation from its config.json, and the pad id of ``folder/tokenizer`` (which the encoder's
    padded positions depend on). A text_encoder/ without weights is an error, not a model without text encoder."""
    directory = folder / "text_encoder"
    if not directory.is_dir():
        return None, None
    files = _weight_files(directory)
    if not files:
        raise ConfigError(f"{directory} holds no weights (model.safetensors, model.<variant>.safetensors, "
                          "pytorch_model.bin or a sharded *.index.json): copy the text encoder's weights there, or "
                          "remove text_encoder/ to convert without a text encoder")
    sd: dict[str, torch.Tensor] = {}
    for file in files:
        sd.update(read_state_dict(file))
    projection = sorted(k for k in sd if k.startswith("text_projection."))
    if projection:  # CLIPTextModelWithProjection: the SD layout, and the UNet, use the tower's hidden states only
        warnings.warn(f"{directory} holds a text projection ({', '.join(projection)}): the SD text encoder layout has "
                      "none, so it is not converted (the UNet's context, the tower's hidden states, is unchanged)",
                      stacklevel=2)
        sd = {k: v for k, v in sd.items() if not k.startswith("text_projection.")}
    if all(k.startswith(_CLIP_TOWER) for k in sd):  # transformers >= 5 saves the tower without text_model.
        sd = {"text_model." + k: v for k, v in sd.items()}
    if not all(k.startswith("text_model.") for k in sd):
        warnings.warn("text encoder is not a transformers CLIPTextModel; not converted", stacklevel=2)
        return None, None
    cfg = json.loads((directory / "config.json").read_text())
    keys = ("num_attention_heads", "hidden_act", "layer_norm_eps")
    options: dict[str, Any] = {"config": {k: cfg[k] for k in keys if k in cfg}}
    pad = folder_pad_token_id(folder)
    if pad is not None:
        options["pad_token_id"] = pad
    return {"transformer." + k: v for k, v in sd.items()}, options


def _load_diffusers(src: Path) -> Model:
    """A diffusers folder: unet/, vae/, and text_encoder/, scheduler/ and ldm_metadata.json when present."""
    import diffusers  # noqa: PLC0415  (optional dependency)

    theirs = diffusers.UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    unet = from_diffusers(theirs)
    vae = from_diffusers(diffusers.AutoencoderKL.from_pretrained(src, subfolder="vae"))
    text_sd, text_options = _diffusers_text_encoder(src)
    extra = {}
    if (src / FOLDER_METADATA).is_file():
        stored = json.loads((src / FOLDER_METADATA).read_text())
        extra = parse_sd_metadata({f"ldm.{k}": json.dumps(v) for k, v in stored.items()}, str(src / FOLDER_METADATA))
    schedule, prediction_type = extra.get("schedule"), extra.get("prediction_type")
    scheduler_cfg = src / "scheduler" / "scheduler_config.json"
    if scheduler_cfg.is_file():
        schedule, prediction_type = schedule_from_diffusers(json.loads(scheduler_cfg.read_text()))
    if extra.get("text_encoder") and text_options is not None:  # the folder's own files win
        text_options = {**extra["text_encoder"], **text_options,
                        "config": {**extra["text_encoder"].get("config", {}), **text_options["config"]}}
    sampling = dict(extra.get("sampling") or {})
    sample_size = theirs.config.sample_size
    if "image_size" not in sampling and isinstance(sample_size, int):  # diffusers' default height and width
        sampling["image_size"] = sample_size * vae.downsample_factor
    flags = {"upcast_attention": True} if theirs.config.get("upcast_attention") else None  # SD 2.1
    return Model(unet, vae, text_sd=text_sd, text_options=text_options, prediction_type=prediction_type,
                 schedule=schedule, sampling=sampling or None, diffusers=flags)  # type: ignore[arg-type]


def _unet_overrides(args: argparse.Namespace) -> dict[str, int]:
    if args.num_heads is not None:
        return {"num_heads": args.num_heads, "num_head_channels": -1}
    if args.num_head_channels is not None:
        return {"num_heads": -1, "num_head_channels": args.num_head_channels}
    return {}


def _vae_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.latent_scale is not None:
        out["scale_factor"] = args.latent_scale
    if args.latent_shift is not None:
        out.update(shift_factor=args.latent_shift, latent_mean=None)
    return out


def _rebuilt(module: nn.Module, changes: dict[str, Any]) -> Any:
    """``module`` rebuilt with its config changed by ``changes`` (settings that no weight depends on); a change that
    does alter the weights' shapes (a head count that does not divide an attention level) is a ConfigError."""
    if not changes or all(module.config.get(k) == v for k, v in changes.items()):  # type: ignore[union-attr]
        return module
    new = type(module)(**{**module.config, **changes})  # type: ignore[operator]
    try:
        new.load_state_dict(module.state_dict())
    except RuntimeError as err:
        flags = ", ".join(f"{k}={v}" for k, v in changes.items())
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise ConfigError(f"{flags} changes the shapes of {type(module).__name__}'s weights ({first}): give "
                          "--num-heads a divisor of every attention level's width (or --num-head-channels one), or "
                          "leave the flag out") from None
    return new.to(next(module.parameters()).dtype)


def load_source(src: Path, args: argparse.Namespace) -> Model:
    """SRC read as what it is, with the override flags applied."""
    kind = source_kind(src)
    if kind == "sd":
        model = _load_sd(src, args)
    else:
        model = _load_ldm(src, not args.no_ema) if kind == "ldm" else _load_diffusers(src)
        model.unet = _rebuilt(model.unet, _unet_overrides(args))
        model.vae = _rebuilt(model.vae, _vae_overrides(args))
    if args.prediction_type is not None:
        model.prediction_type = args.prediction_type
    if args.schedule is not None:
        model.schedule = args.schedule
    if kind == "sd":
        model.default_image_size = sd_default_image_size(sd_text_family(model.text_sd or {}), model.prediction_type)
    return model


# ------------------------------------------------------------------------------------------------------- writing


def _diffusion_process(model: Model, src: Path) -> tuple[dict[str, Any], str]:
    """The schedule and prediction type to record; Stable Diffusion's (with a warning) when the source has none."""
    schedule, prediction_type = model.schedule, model.prediction_type
    if schedule is None:
        warnings.warn(f"{src} records no noise schedule: writing Stable Diffusion's {SD_SCHEDULE} (override with "
                      "--schedule)", stacklevel=2)
        schedule = dict(SD_SCHEDULE)
    if prediction_type is None:
        warnings.warn(f"{src} records no prediction type: writing epsilon (override with --prediction-type)",
                      stacklevel=2)
        prediction_type = "epsilon"
    return schedule, prediction_type


def _sampling(model: Model) -> dict[str, Any] | None:
    """The sampling defaults to record: the source's, with an SD file's default resolution where it records none."""
    sampling = dict(model.sampling or {})
    if sampling.get("image_size") is None and model.default_image_size is not None:
        sampling["image_size"] = model.default_image_size
    return sampling or None


def write_sd(model: Model, dst: Path) -> None:
    """An SD single file with the ldm metadata."""
    if model.unet.config.get("context_dim") is None:
        raise ConfigError("the SD single-file layout holds text-conditioned UNets only; this UNet has context_dim=None")
    metadata = sd_metadata(model.unet, model.vae, model.prediction_type, model.schedule, model.sampling,
                           model.text_options, model.diffusers)
    for part in model.guessed:  # a guess stays a guess: the next reader warns again
        metadata.pop(f"ldm.{part}")
    save_state_dict(to_sd_state_dict(model.unet, model.vae, model.sd_text()), dst, metadata)


def _text_module(model: Model, what: str) -> tuple[nn.Module, dict[str, Any]] | None:
    """The text encoder as a module, with its constructor arguments, built from SD-layout weights when needed."""
    if model.text_sd is None or sd_text_family(model.text_sd) is None:
        if model.text_sd:
            print(f"note: the text encoder ({sorted(model.text_sd)[:2]}...) is not a CLIP layout ldm knows; not "
                  f"written to the {what}", file=sys.stderr)
        return None
    _, kwargs = sd_text_encoder_spec(model.text_sd, None, model.text_options)
    return load_sd_text_encoder(model.text_sd, None, model.text_options), kwargs


def _is_diffusers_export(folder: Path) -> bool:
    """Whether ``folder`` holds a diffusers model (a previous export), which an export may replace as a whole."""
    return any((folder / name).exists() for name in ("unet", "vae", "model_index.json", FOLDER_METADATA))


def write_diffusers(model: Model, dst: Path, src: Path) -> None:
    """A diffusers folder: unet/, vae/, the text encoder (SD 1.x CLIP) under text_encoder/, the schedule as a
    DDPMScheduler (a flow model's as a FlowMatchEulerDiscreteScheduler) under scheduler/ (Stable Diffusion's, with a
    warning, when the source records none), and ldm_metadata.json (sampling defaults, text-encoder options); with a
    CLIP text encoder, also tokenizer/ and model_index.json, so it loads as a ``StableDiffusionPipeline``.

    Atomic as a whole: the parts are written into a temporary sibling folder ``.DST.*.tmp``, which is renamed to DST
    only once complete; a previous export at DST is moved aside then and removed after the rename. An interrupted
    export (Ctrl-C, a kill, a full disk) so leaves DST as it was, never a folder that mixes two models or lacks a
    part; the next export removes the temporary folders a killed one left. DST must be new, empty or a diffusers
    folder: it is replaced, not merged into."""
    if dst.exists() and not dst.is_dir():
        raise ConfigError(f"{dst} is a file: a diffusers model is a folder; give a new folder name")
    if dst.is_dir() and any(dst.iterdir()) and not _is_diffusers_export(dst):
        raise ConfigError(f"{dst} is a folder that holds no diffusers model, and the export replaces its destination "
                          "as a whole: give a new or empty folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folders are 0700
        _write_diffusers_parts(model, tmp, src)
        old = dst.parent / f".{dst.name}.{uuid.uuid4().hex}.tmp"
        if dst.exists():
            os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:
            if old.exists():
                os.rename(old, dst)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in dst.parent.glob(f".{glob.escape(dst.name)}.*.tmp"):  # the old export, and killed exports' folders
        shutil.rmtree(stale, ignore_errors=True)


def _write_diffusers_parts(model: Model, dst: Path, src: Path) -> None:
    """``write_diffusers``' parts, written into the (temporary) folder ``dst``."""
    import diffusers  # noqa: PLC0415  (optional dependency)

    from ldm.text.hf_encoder import HFCLIPTextEncoder  # noqa: PLC0415

    schedule, prediction_type = _diffusion_process(model, src)
    if is_flow_model(schedule, prediction_type):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**flow_schedule_to_diffusers(schedule))
    else:
        scheduler = diffusers.DDPMScheduler(**schedule_to_diffusers(schedule, prediction_type))
    sampling = _sampling(model)
    image_size = (sampling or {}).get("image_size")  # diffusers' default height and width: sample_size latents
    factor = model.vae.downsample_factor
    unet = to_diffusers(model.unet, image_size // factor if image_size else None,
                        upcast_attention=bool((model.diffusers or {}).get("upcast_attention")))
    vae = to_diffusers(model.vae, image_size)
    text = model.text_encoder
    if text is None:
        built = _text_module(model, "diffusers folder")
        text = built[0] if built else None
    unet.save_pretrained(dst / "unet")
    vae.save_pretrained(dst / "vae")
    if isinstance(text, HFCLIPTextEncoder):
        text.model.save_pretrained(dst / "text_encoder")
    elif text is not None:
        print(f"note: a {type(text).__name__} has no diffusers text_encoder/ layout here; not written",
              file=sys.stderr)
    scheduler.save_pretrained(dst / "scheduler")
    options = text_encoder_metadata(text) if text is not None else None
    extra = {k: v for k, v in (("format", 1), ("sampling", sampling), ("text_encoder", options)) if v}
    (dst / FOLDER_METADATA).write_text(json.dumps(extra, indent=1) + "\n")
    plain_scale = all(model.vae.config.get(k) is None for k in ("shift_factor", "latent_mean", "latent_std"))
    if isinstance(text, HFCLIPTextEncoder) and not text.with_projection and isinstance(scheduler,
                                                                                       diffusers.DDPMScheduler):
        if not plain_scale:  # StableDiffusionPipeline divides by scaling_factor alone
            print("note: no model_index.json: diffusers' StableDiffusionPipeline would decode without the VAE's "
                  "latent shift or per-channel normalisation; load the parts one by one", file=sys.stderr)
            return
        _write_pipeline_index(dst, text, scheduler)  # every part of an SD 1.x pipeline
        if text.clip_skip > 1:
            print(f"note: the text encoder reads layer -{text.clip_skip}: call the diffusers pipeline with "
                  f"clip_skip={text.clip_skip - 1}", file=sys.stderr)
        if text.tokenizer.pad_token_id == 0:
            print("note: the tokenizer pads with id 0 ('!'), which transformers' CLIPTokenizer takes for a special "
                  "token: a prompt's '!' becomes the pad id there (as with the SD 2.x tokenizer folders)",
                  file=sys.stderr)


def _write_pipeline_index(dst: Path, text, scheduler) -> None:
    """The tokenizer and ``model_index.json`` of a ``StableDiffusionPipeline``, so the folder loads with
    ``StableDiffusionPipeline.from_pretrained(dst)`` (no safety checker)."""
    import diffusers  # noqa: PLC0415

    text.tokenizer.save_transformers_files(dst / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", type(text.model).__name__],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", type(scheduler).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    (dst / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")


def write_ldm(model: Model, dst: Path, src: Path) -> None:
    """An ldm checkpoint (``{"ldm": header, "state_dict": ...}``) that ``ldm.checkpoint.load_parts`` reads."""
    from ldm.checkpoint import atomic_torch_save, describe_ldm  # noqa: PLC0415  (glue: checkpoint is above convert)
    from ldm.diffusion.sampling import SamplingDefaults  # noqa: PLC0415

    if dst.suffix != ".ckpt":
        raise ConfigError(f"--to ldm writes a .ckpt file, got {dst}")
    built = _text_module(model, "ldm checkpoint")
    if built is None and model.text_encoder is not None and model.text_spec is not None:  # a merged LoRA run's own
        built = model.text_encoder, dict(model.text_spec["kwargs"])
    if built is None and model.unet.config.get("context_dim") is not None:
        raise ConfigError(f"{src} has no SD 1.x/2.x text encoder weights, and its UNet is text-conditioned: an ldm "
                          "checkpoint needs the text encoder to sample")
    text, text_kwargs = built if built else (None, None)
    schedule, prediction_type = _diffusion_process(model, src)
    header = describe_ldm(unet=model.unet, text_encoder=text, first_stage=model.vae, schedule=schedule,
                          prediction_type=prediction_type, sampling=SamplingDefaults.from_dict(_sampling(model)),
                          ema=False, text_encoder_kwargs=text_kwargs)
    if model.diffusers:  # for the way back to a diffusers folder; load_parts does not read it
        header["diffusers"] = dict(model.diffusers)
    state = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    state.update({f"first_stage.{k}": v for k, v in model.vae.state_dict().items()})
    if text is not None:
        state.update({f"text_encoder.{k}": v for k, v in text.state_dict().items()})
    atomic_torch_save({"ldm": header, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, dst)


# ----------------------------------------------------------------------------------------------------------- CLI


def _schedule_arg(text: str) -> dict[str, Any]:
    """--schedule: a JSON object of ``NoiseSchedule.from_name`` keywords, checked by building the schedule."""
    try:
        spec = json.loads(text)
        NoiseSchedule.from_name(**spec)
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"not a JSON object of NoiseSchedule.from_name keywords ({err})") from None
    return spec


def _positive_int_arg(text: str) -> int:
    """--num-heads, --num-head-channels: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _latent_scale_arg(text: str) -> float:
    """--latent-scale: a finite number > 0 (latents are divided by it when decoding)."""
    value = _finite_arg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0 (the decoder divides the latents by it), got {text}")
    return value


def _finite_arg(text: str) -> float:
    """--latent-shift (and --latent-scale): a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _prediction_arg(text: str) -> str:
    try:
        return canonical_prediction_type(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m ldm.convert``."""
    p = argparse.ArgumentParser(prog="python -m ldm.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="ldm checkpoint (RUN/ldm/checkpoints/last.ckpt), SD .safetensors/.ckpt "
                                           "file, or diffusers folder (unet/, vae/)")
    p.add_argument("dst", type=Path, help="output .safetensors/.ckpt SD file, or a folder for the diffusers layout")
    p.add_argument("--to", choices=("sd", "diffusers", "ldm"), default=None,
                   help="output format (default: sd for .safetensors/.ckpt/.pt/.pth, else diffusers); ldm writes an "
                        "ldm checkpoint .ckpt")
    p.add_argument("--no-ema", action="store_true",
                   help="take the raw UNet weights instead of their EMA averages (ldm checkpoints, SD files with "
                        "model_ema.*)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights before saving")
    p.add_argument("--unsafe-pickle", action="store_true", help="allow full unpickling of trusted SD .ckpt files")
    o = p.add_argument_group("overrides", "set what the source does not record (an SD file without ldm metadata) "
                                          "or records wrongly")
    heads = o.add_mutually_exclusive_group()
    heads.add_argument("--num-heads", type=_positive_int_arg, metavar="N", default=None,
                       help="attention heads per UNet attention layer (SD 1.x style: 8)")
    heads.add_argument("--num-head-channels", type=_positive_int_arg, metavar="C", default=None,
                       help="channels per UNet attention head, the head count following the width (SD 2.x style: 64)")
    o.add_argument("--latent-scale", type=_latent_scale_arg, metavar="S", default=None,
                   help="the VAE's latent scale_factor (Stable Diffusion: 0.18215)")
    o.add_argument("--latent-shift", type=_finite_arg, metavar="B", default=None,
                   help="the VAE's latent shift_factor, subtracted before scaling (Stable Diffusion: none)")
    o.add_argument("--prediction-type", type=_prediction_arg, metavar="TYPE", default=None,
                   help="what the UNet predicts: epsilon, v_prediction or sample (Stable Diffusion: epsilon)")
    o.add_argument("--schedule", type=_schedule_arg, metavar="JSON", default=None,
                   help='noise schedule as JSON NoiseSchedule.from_name keywords, e.g. \'{"schedule": '
                        '"scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}\'')
    return p


def _is_lora_run(src: Path) -> bool:
    """Whether the ldm checkpoint ``src`` is a LoRA run's (adapters on a base file)."""
    from ldm.checkpoint import read_checkpoint  # noqa: PLC0415  (glue: checkpoint is above convert)

    return read_checkpoint(src, mmap=True).get("ldm", {}).get("lora") is not None


def convert(args: argparse.Namespace) -> None:
    """Read SRC, apply the overrides, write DST."""
    to = args.to or ("sd" if args.dst.suffix in SD_SUFFIXES else "diffusers")
    kind = source_kind(args.src)
    if to == "ldm" and kind == "ldm" and not _is_lora_run(args.src):  # a LoRA run's adapters merge into a full one
        raise ConfigError(f"{args.src} is already an ldm checkpoint")
    if to == "diffusers" and args.dst.suffix in SD_SUFFIXES:
        raise ConfigError(f"--to diffusers writes a folder, got the file name {args.dst}")
    if to == "sd" and args.dst.suffix not in SD_SUFFIXES:
        raise ConfigError(f"an SD single file ends in one of {SD_SUFFIXES}, got {args.dst}")
    model = load_source(args.src, args)
    if args.dtype:
        dtype = DTYPES[args.dtype]
        model.unet, model.vae = model.unet.to(dtype), model.vae.to(dtype)
        if model.text_encoder is not None:
            model.text_encoder = model.text_encoder.to(dtype)
        if model.text_sd is not None:
            model.text_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.text_sd.items()}
    if to == "sd":
        write_sd(model, args.dst)
    elif to == "diffusers":
        write_diffusers(model, args.dst, args.src)
    else:
        write_ldm(model, args.dst, args.src)


def main(argv: list[str] | None = None) -> int:
    """Convert SRC to DST; wrong input prints ``error: ...`` and returns 2."""
    args = parser().parse_args(argv)
    try:
        convert(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
