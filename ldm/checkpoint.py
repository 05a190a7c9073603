"""The one reader and writer of ldm's checkpoint files.

Two kinds of file, each one plain dict that ``torch.load`` reads without any ldm class:
- an autoencoder (``vae/vae.ckpt`` of the VAE stage): ``{"kind": "autoencoder", "spec", "state_dict",
  "latent_scale", "config"}``;
- a latent diffusion model (``ldm/checkpoints/*.ckpt``, written by Lightning through
  ``ldm.lightning.checkpoint_io.AtomicCheckpointIO``, which calls :func:`atomic_torch_save`):
  Lightning's dict (``state_dict``, optimizer, loops, callbacks) plus the header ``"ldm"`` that
  :func:`describe_ldm` writes: the parts' class paths and constructor arguments, the noise schedule, the prediction
  type, the sampling defaults and the run's config. Weights sit under ``unet.``, ``text_encoder.``, ``first_stage.``,
  ``ema.`` (the EMA averages under the UNet's own parameter names) and ``guide_unet.`` / ``guide_text_encoder.``.

:func:`load_parts` rebuilds everything a sampler needs from either an ldm file or an original Stable Diffusion
single file; files are written atomically.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.distributed as dist
from torch import nn

from ldm.diffusion.flow import FLOW_PREDICTION
from ldm.diffusion.parameterization import canonical_prediction_type
from ldm.diffusion.sampling import SamplingDefaults
from ldm.diffusion.schedules import SD_SCHEDULE
from ldm.errors import ConfigError
from ldm.temporary_files import temporary_beside

FORMAT_VERSION = 2  # 1: EMA stored as ema.shadow_<i>; 2: EMA under the parameters' names, "format" in the header
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def module_spec(module: nn.Module, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"target": "package.Class", "kwargs": {...}}: the constructor arguments are ``kwargs`` if given (e.g. the
    part's resolved Hydra config without ``_target_``), else the part's own ``.config`` dict."""
    if kwargs is None:
        kwargs = getattr(module, "config", None)
        if not isinstance(kwargs, dict):
            raise TypeError(f"{type(module).__name__} has no .config dict of constructor arguments; pass kwargs")
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    cls = type(module)
    return {"target": f"{cls.__module__}.{cls.__qualname__}", "kwargs": kwargs}


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Construct a part from ``module_spec`` output (only classes inside the ``ldm`` package)."""
    target = spec["target"]
    if not target.startswith("ldm."):
        raise ValueError(f"refusing to build {target!r} from a checkpoint: only ldm.* classes are allowed")
    module_name, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**spec["kwargs"])


def gather_rank_states(state: torch.Tensor) -> list[torch.Tensor]:
    """``state`` (e.g. a generator's ``get_state()``) of every rank, in rank order; ``[state]`` without a process
    group. A collective: under DDP call it on every rank (Lightning's ``on_save_checkpoint`` runs on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def rank_state(states: list[torch.Tensor], rank: int) -> torch.Tensor:
    """This rank's entry of ``gather_rank_states`` output (rank 0's when the checkpoint had fewer ranks)."""
    return states[rank] if rank < len(states) else states[0]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], many: bool = False) -> None:
    """``write(file)`` to a temporary file in the same directory, fsync, then rename: a crash (even SIGKILL) or a full
    disk leaves the old file whole, or none. Temporaries of ``path`` that a killed writer left behind are removed
    after a successful write.

    ``many``: one of many files written into a large folder (evaluation images): skip the per-file folder scan for
    stale temporaries and the folder fsync, which cost tens of ms each at 30k files; the writer cleans up itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if many:
        return
    fsync_dir(path.parent)  # the rename itself survives a power cut
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through ``atomic_write``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """A text file (configs, logger records, indexes) written through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, many: bool = False) -> None:
    """A binary file (shard metadata, images) written through ``atomic_write``."""
    atomic_write(path, lambda f: f.write(data), many=many)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file as its dict, read with ``weights_only=True`` (tensors and plain containers only: ldm's
    files hold nothing else, so loading one cannot run code). ``mmap``: the tensors stay in the file, read only
    where touched (to look at a checkpoint's header without loading its weights).

    A file that does not read is a ConfigError naming the cause: pickled objects beyond tensors (an SD .ckpt with a
    Lightning callback: the message gives the one-off conversion), a truncated or corrupt file, or no checkpoint at
    all (a .yaml or an image given as one)."""
    from ldm.convert.single_file import torch_load_error

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=True)  # e.g. a pre-zip (legacy) file
    except Exception as err:  # noqa: BLE001  (torch raises many kinds: torch_load_error tells them apart)
        raise torch_load_error(path, err) from err
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path} is not a checkpoint dict (got {type(ckpt).__name__}): give "
                          "RUN/ldm/checkpoints/last.ckpt or an SD .ckpt/.safetensors")
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """``latent_diffusion``, ``autoencoder``, ``sd_single_file`` or ``unknown``."""
    if "ldm" in ckpt:
        return "latent_diffusion"
    if ckpt.get("kind") == "autoencoder":
        return "autoencoder"
    state = ckpt.get("state_dict", ckpt)
    if isinstance(state, dict) and any(str(k).startswith("model.diffusion_model.") for k in state):
        return "sd_single_file"
    return "unknown"


# ---------------------------------------------------------------------------------------------------- writing


def describe_ldm(
    *,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    first_stage: nn.Module | None,
    schedule: dict[str, Any],
    prediction_type: str,
    sampling: SamplingDefaults,
    ema: bool,
    guide: dict[str, Any] | None = None,
    text_encoder_kwargs: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``"ldm"`` header of a latent diffusion checkpoint: everything needed to rebuild the parts and sample.

    ``guide`` (``{"snapshot_step": N, "text_encoder": bool}``) describes an autoguidance snapshot, if the run keeps
    one; ``text_encoder_kwargs`` are its constructor arguments when it has no ``.config``. ``lora`` (a LoRA run,
    :func:`lora_header`) makes the file an adapter checkpoint: its ``state_dict`` holds the adapters only.
    """
    return {
        "kind": "latent_diffusion",
        "format": FORMAT_VERSION,
        "unet": module_spec(unet),
        "text_encoder": None if text_encoder is None else _stored_text_spec(text_encoder, text_encoder_kwargs, lora),
        "first_stage": None if first_stage is None else module_spec(first_stage),
        "schedule": dict(schedule),
        "prediction_type": prediction_type,
        "sampling": sampling.to_dict(),
        "ema": ema,
        "guide": guide,
        "config": config,
        **({"lora": lora} if lora is not None else {}),
    }


def _stored_text_spec(text_encoder: nn.Module, kwargs: dict[str, Any] | None,
                      lora: dict[str, Any] | None) -> dict[str, Any]:
    """``module_spec`` of the text encoder, rebuildable from the checkpoint alone where the file holds its weights
    (every checkpoint but a LoRA run's): a pretrained source (``pretrained_path``, open_clip's ``pretrained``) is
    replaced by the architecture it gave (transformers' config) and kept as ``weights_from``, so the checkpoint still
    loads once that folder is moved or deleted."""
    spec = module_spec(text_encoder, kwargs)
    kw = spec["kwargs"]
    source = kw.get("pretrained_path") or kw.get("pretrained")
    if lora is not None or source is None:
        return spec
    if kw.get("pretrained_path"):
        architecture = getattr(text_encoder, "architecture", None)
        if architecture is None:
            return spec
        kw = {**kw, "pretrained_path": None, "config": architecture(),
              "pad_token_id": text_encoder.tokenizer.pad_token_id}  # as the folder's tokenizer/ gave it
    else:
        kw = {**kw, "pretrained": None}
    return {**spec, "kwargs": kw, "weights_from": str(source)}


# ------------------------------------------------------------------------------------------------------ LoRA runs


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in 16 MiB blocks): what a LoRA checkpoint records of its base file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_header(base_path: str | os.PathLike, sha256: str, parts: dict[str, nn.Module]) -> dict[str, Any]:
    """The ``lora`` entry of a LoRA run's header: the base file (absolute path, sha256) the adapters were trained
    on, and per adapted part (``unet``, ``text_encoder``) its alphas and dropout (``ldm.lora.lora_config``)."""
    from ldm.lora import lora_config

    return {"base": {"path": str(Path(base_path).resolve()), "sha256": sha256},
            **{name: lora_config(module) for name, module in parts.items()}}


def check_lora_base(base: dict[str, Any], what: str = "this LoRA checkpoint") -> Path:
    """The base file of a LoRA checkpoint, after checking that it is there and unchanged (its sha256); a
    ConfigError says which and what to do otherwise."""
    path = Path(base["path"])
    if not path.is_file():
        raise ConfigError(f"{what} holds adapters for the base model {path}, which does not exist: put the base "
                          "file back at that path (the checkpoint stores only the adapters)")
    digest = file_sha256(path)
    if digest != base["sha256"]:
        raise ConfigError(f"{what} holds adapters for the base model {path}, but that file has changed (sha256 "
                          f"{digest[:12]}..., the adapters were trained on {base['sha256'][:12]}...): restore the "
                          "original base file")
    return path


def lora_weights(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint's adapters of one part (``unet.``, ``text_encoder.``) as ``ldm.lora.lora_state_dict``
    names them (peft's adapter name dropped)."""
    from ldm.lora import ADAPTER

    return {k.replace(f".{ADAPTER}.", "."): v for k, v in _prefixed(state, prefix).items()}


def read_lora_checkpoint(path: str | os.PathLike) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, float]]]:
    """A LoRA run's checkpoint as ``{part: (adapter weights, alphas)}`` for ``ldm.lora.load_lora_state_dict``,
    to put its adapters on a base the caller holds."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    lora = _ldm_header(ckpt, path).get("lora")
    if lora is None:
        raise ConfigError(f"{path} is a full model checkpoint, not a LoRA run's (or a .safetensors LoRA file): load "
                          "it with ckpt=, not lora=")
    return {name: (lora_weights(ckpt["state_dict"], f"{name}."), lora[name]["alphas"])
            for name in ("unet", "text_encoder") if lora.get(name) is not None}


def _lora_parts(header: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> tuple[nn.Module, ...]:
    """The parts of a LoRA checkpoint: built from its header, the base weights from its base file (checked) as
    training loaded them (``ldm.convert.init_from_sd``), then the adapters."""
    from ldm.convert import init_from_sd
    from ldm.lora import load_lora_state_dict

    lora = header["lora"]
    base = check_lora_base(lora["base"], f"{path}")
    unet = build_module(header["unet"])
    text = build_module(header["text_encoder"]) if header["text_encoder"] is not None else None
    first_stage = build_module(header["first_stage"]) if header["first_stage"] is not None else None
    kwargs = header["unet"]["kwargs"]
    heads = {k: kwargs[k] for k in ("num_heads", "num_head_channels") if k in kwargs}
    pretrained = text is not None and any(header["text_encoder"]["kwargs"].get(k) is not None
                                          for k in ("pretrained_path", "pretrained"))
    init_from_sd(load_init_checkpoint(base, unet_kwargs=heads), str(base), unet, text, first_stage,
                 text_encoder_pretrained=pretrained)
    for name, module in (("unet", unet), ("text_encoder", text)):
        if lora.get(name) is not None:
            load_lora_state_dict(module, lora_weights(state, f"{name}."), lora[name]["alphas"],
                                 lora[name].get("dropout", 0.0))
    return unet, text, first_stage


def load_init_checkpoint(path: str | os.PathLike, unet_kwargs: dict[str, Any] | None = None):
    """The weights a run starts from (``init_ckpt``) as ``ldm.convert.SDCheckpoint``: an original SD single file,
    or an ldm checkpoint (``RUN/ldm/checkpoints/*.ckpt``: its EMA UNet, its text encoder and its first stage, with
    the latent scale it was trained on). Its UNet has the heads the file records; ``unet_kwargs`` (heads) build SD
    files that record none (``ldm.convert.check_same_heads`` then compares them with the run's).

    An ldm checkpoint is read here rather than converted to an SD file first because the SD layout has no place for
    a from-scratch text encoder or a pixel-space model; an adapter-only (LoRA) checkpoint is refused, since its
    weights are not a base model."""
    from ldm.convert import CKPT_METADATA, SDCheckpoint, load_sd_checkpoint, sd_checkpoint_from_state_dict

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"init_ckpt={path}: no such file; give an SD single file (.safetensors/.ckpt) or an ldm "
                          "checkpoint (RUN/ldm/checkpoints/last.ckpt)")
    try:
        ckpt = read_checkpoint(path) if path.suffix != ".safetensors" else None
    except ValueError:  # pickled objects: not an ldm file; the SD reader says how to read a trusted one
        ckpt = None
    if ckpt is None:
        return load_sd_checkpoint(path, default_heads=unet_kwargs)
    kind = checkpoint_kind(ckpt)
    if kind == "autoencoder":
        raise ConfigError(f"init_ckpt={path} is an autoencoder (vae.ckpt): pass it as vae_ckpt=, and as init_ckpt "
                          "an ldm checkpoint or SD single file")
    if kind != "latent_diffusion":  # an SD .ckpt, read once
        state = ckpt.get("state_dict", ckpt)
        return sd_checkpoint_from_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)},
                                             default_heads=unet_kwargs, source=str(path),
                                             metadata=ckpt.get(CKPT_METADATA) or {})
    lora = _ldm_header(ckpt, path).get("lora")
    if lora is not None:
        raise ConfigError(f"init_ckpt={path} is a LoRA run's checkpoint (adapters only): start from its base "
                          f"{lora['base']['path']}, or merge the adapters into a full model first")
    parts = _ldm_parts(ckpt, path)
    first = parts.first_stage
    scale = None if first is None else float(first.config.get("scale_factor", 1.0))
    text = {} if parts.text_encoder is None else parts.text_encoder.state_dict()
    return SDCheckpoint(parts.unet, first, text, scale, parts.prediction_type, parts.schedule,
                        parts.sampling.to_dict())


def save_autoencoder(path: str | os.PathLike, vae: nn.Module, config: dict[str, Any] | None = None) -> None:
    """Write the VAE stage's result: the autoencoder's spec and weights (its fitted latent scale included)."""
    atomic_torch_save({"kind": "autoencoder", "format": FORMAT_VERSION, "spec": module_spec(vae),
                       "state_dict": vae.state_dict(), "latent_scale": float(vae.config.get("scale_factor", 1.0)),
                       "config": config}, path)


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class ModelParts:
    """What a checkpoint holds for sampling: the networks, the diffusion process they were trained for, and the
    sampling defaults. ``first_stage`` is None for pixel-space models, ``text_encoder`` for unconditional ones;
    ``guide_unet`` is the autoguidance snapshot, when the file holds one."""

    unet: nn.Module
    text_encoder: nn.Module | None
    first_stage: nn.Module | None
    schedule: dict[str, Any]
    prediction_type: str
    sampling: SamplingDefaults
    guide_unet: nn.Module | None = None
    guide_text_encoder: nn.Module | None = None
    config: dict[str, Any] | None = None
    ema: bool = False  # the UNet holds the checkpoint's EMA weights (asked for, and present)


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_strict(module: nn.Module, weights: dict[str, torch.Tensor], what: str, path: Path) -> None:
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: the weights for {what} do not fit the architecture in its header (missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}): the file was edited or written by another "
                          "tool; use the checkpoint train.py wrote, or convert the model with python -m ldm.convert")


def ema_weights(state: dict[str, torch.Tensor], unet: nn.Module, prefix: str = "ema.") -> dict[str, torch.Tensor]:
    """The EMA averages of a checkpoint's ``state_dict`` under the UNet's parameter names (both layouts)."""
    sub = _prefixed(state, prefix)
    if "shadow_0" in sub:  # format 1: position i of the UNet's floating-point parameters
        names = [n for n, p in unet.named_parameters() if p.is_floating_point()]
        return {name: sub[f"shadow_{i}"] for i, name in enumerate(names)}
    return {k: v for k, v in sub.items() if k != "num_updates"}


def _ldm_header(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    kind = checkpoint_kind(ckpt)
    if kind == "autoencoder":
        sibling = path.parent.parent / "ldm" / "checkpoints" / "last.ckpt"
        where = str(sibling) if sibling.is_file() else "RUN/ldm/checkpoints/last.ckpt of the same run"
        raise ConfigError(f"{path} is the VAE stage's autoencoder checkpoint (vae/vae.ckpt): it encodes and decodes "
                         f"images but cannot generate them. Pass the latent diffusion checkpoint: {where}")
    if kind != "latent_diffusion":
        raise ConfigError(f"{path} is neither an ldm checkpoint (RUN/ldm/checkpoints/*.ckpt) nor an SD single file")
    header = ckpt["ldm"]
    if header.get("format", 1) > FORMAT_VERSION:
        raise ConfigError(f"{path} was written in checkpoint format {header['format']}, newer than this ldm reads "
                          f"({FORMAT_VERSION}): upgrade ldm")
    return header


def load_parts(
    path: str | os.PathLike,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    prediction_type: str | None = None,
    image_size: int | None = None,
    text_config: dict[str, Any] | None = None,
) -> ModelParts:
    """Rebuild the parts of an ldm checkpoint (EMA weights in the UNet by default) or of an original SD 1.x/2.x
    single file (``.ckpt``/``.safetensors``).

    SD single files get SD's schedule and latent scale; their prediction type is not in the weights: ``epsilon``
    unless ``prediction_type`` says otherwise (``v_prediction`` for the 768-px SD 2.x models). ``image_size`` sets
    the default resolution (SD: 512, or 768 for v-prediction SD 2.x); ``text_config`` overrides the inferred
    text-encoder config (see ``ldm.convert.load_sd_text_encoder``). For ldm checkpoints the prediction type is
    recorded in the file, and asking for another one is an error.
    """
    path = Path(path)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if path.suffix == ".safetensors":
        from ldm.convert import read_sd_file

        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        return _sd_parts(*read_sd_file(path), str(path), use_ema, prediction_type, image_size, text_config)
    ckpt = read_checkpoint(path, map_location)
    if checkpoint_kind(ckpt) == "sd_single_file":
        from ldm.convert import CKPT_METADATA

        state = ckpt.get("state_dict", ckpt)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return _sd_parts(tensors, ckpt.get(CKPT_METADATA) or {}, str(path), use_ema, prediction_type, image_size,
                         text_config)
    return _ldm_parts(ckpt, path, use_ema, prediction_type, image_size)


def _ldm_parts(ckpt: dict[str, Any], path: Path, use_ema: bool = True, prediction_type: str | None = None,
               image_size: int | None = None) -> ModelParts:
    """``load_parts`` on an ldm checkpoint already read."""
    header, state = _ldm_header(ckpt, path), ckpt["state_dict"]
    if prediction_type is not None and prediction_type != header["prediction_type"]:
        raise ValueError(f"{path} was trained with prediction_type={header['prediction_type']!r}; "
                         f"prediction_type={prediction_type!r} applies to SD single files only")
    sampling = SamplingDefaults.from_dict(header.get("sampling"))
    if image_size is not None:
        sampling = sampling.with_overrides(image_size=image_size)
    if header.get("lora") is not None:  # adapters only: the base comes from its file
        unet, text, first_stage = _lora_parts(header, state, path)
        return ModelParts(unet, text, first_stage, dict(header["schedule"]), header["prediction_type"], sampling,
                          config=header.get("config"))
    unet = build_module(header["unet"])
    weights = _prefixed(state, "unet.")
    ema = bool(use_ema and header.get("ema"))
    if ema:
        weights.update(ema_weights(state, unet))
    _load_strict(unet, weights, "the UNet", path)
    text = first_stage = guide_unet = guide_text = None
    if header["text_encoder"] is not None:
        text = build_module(header["text_encoder"])
        _load_strict(text, _prefixed(state, "text_encoder."), "the text encoder", path)
    if header["first_stage"] is not None:
        first_stage = build_module(header["first_stage"])
        _load_strict(first_stage, _prefixed(state, "first_stage."), "the first stage", path)
    guide = header.get("guide")
    if guide is not None and bool(state.get("guide_taken", False)):  # saved before the snapshot step: no guide
        guide_unet = build_module(header["unet"])
        _load_strict(guide_unet, _prefixed(state, "guide_unet."), "the guide snapshot", path)
        if guide["text_encoder"]:
            guide_text = build_module(header["text_encoder"])
            _load_strict(guide_text, _prefixed(state, "guide_text_encoder."), "the guide's text encoder", path)
    return ModelParts(unet, text, first_stage, dict(header["schedule"]), header["prediction_type"], sampling,
                      guide_unet, guide_text, header.get("config"), ema)


def load_first_stage(path: str | os.PathLike) -> nn.Module | None:
    """The first stage (VAE) of an ldm checkpoint (None for pixel space), or the autoencoder of a ``vae.ckpt``."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if checkpoint_kind(ckpt) == "autoencoder":
        vae = build_module(ckpt["spec"])
        _load_strict(vae, ckpt["state_dict"], "the autoencoder", path)
        return vae
    header = _ldm_header(ckpt, path)
    if header["first_stage"] is None:
        return None
    if header.get("lora") is not None:  # an adapter checkpoint: the VAE is the base file's
        return _lora_parts(header, ckpt["state_dict"], path)[2]
    vae = build_module(header["first_stage"])
    _load_strict(vae, _prefixed(ckpt["state_dict"], "first_stage."), "the first stage", path)
    return vae


def load_autoencoder(path: str | os.PathLike) -> nn.Module:
    """The autoencoder of a VAE-stage checkpoint (``vae/vae.ckpt``), with its fitted latent scale."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"vae_ckpt={path} does not exist. Train an autoencoder first (python train.py stages=[vae]) and pass its "
            "vae/vae.ckpt as vae_ckpt=PATH, or run both stages (stages=[vae,ldm]).")
    ckpt = read_checkpoint(path)
    if checkpoint_kind(ckpt) != "autoencoder":
        raise ConfigError(f"vae_ckpt={path} is not an autoencoder checkpoint (written by the vae stage as vae.ckpt)")
    return load_first_stage(path)


def _sd_parts(state: dict[str, torch.Tensor], metadata: dict[str, str], source: str, use_ema: bool,
              prediction_type: str | None, image_size: int | None, text_config: dict[str, Any] | None) -> ModelParts:
    """An SD 1.x/2.x single-file state dict -> parts (UNet, VAE and text encoder inferred from shapes); what its
    ldm metadata records (heads, latent scale, prediction type, schedule, sampling defaults) is used."""
    from ldm.convert import load_sd_text_encoder, sd_checkpoint_from_state_dict, sd_text_family
    from ldm.convert.single_file import sd_default_image_size

    loaded = sd_checkpoint_from_state_dict(state, prefer_ema=use_ema, source=source, metadata=metadata)
    family = sd_text_family(loaded.cond_stage_state_dict)
    if family is None:
        raise ConfigError(f"{source} has no text encoder weights in the SD 1.x (cond_stage_model.transformer."
                          "text_model.*) or SD 2.x (cond_stage_model.model.*) layout (cond_stage_model keys found: "
                          f"{sorted(loaded.cond_stage_state_dict)[:3]}), so it cannot be sampled from: give a "
                          "complete SD file, or the ldm checkpoint it was converted from")
    text = load_sd_text_encoder(loaded.cond_stage_state_dict, text_config, loaded.text_encoder)
    context_dim = loaded.unet.config.get("context_dim")
    if context_dim != text.width:
        raise ConfigError(f"{source}: the text encoder is {text.width} wide but the UNet's context_dim is "
                          f"{context_dim}: the file mixes parts of two models; give a complete SD file")
    if prediction_type is None:
        prediction_type = loaded.prediction_type
    if prediction_type is None:
        if family == "sd2":
            warnings.warn(f"{source} is an SD 2.x checkpoint: its prediction type is not in the weights, assuming "
                          "epsilon (SD 2.x-base); pass prediction_type='v_prediction' for the 768-px v models",
                          stacklevel=3)
        prediction_type = "epsilon"
    if prediction_type != FLOW_PREDICTION:  # a flow model's metadata records its objective too
        canonical_prediction_type(prediction_type)
    sampling = SamplingDefaults.from_dict(loaded.sampling)
    if image_size is None and sampling.image_size is None:
        image_size = sd_default_image_size(family, prediction_type)
    return ModelParts(loaded.unet, text, loaded.vae, dict(loaded.schedule or SD_SCHEDULE), prediction_type,
                      sampling.with_overrides(image_size=image_size), ema=loaded.ema)
