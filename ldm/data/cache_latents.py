"""Precompute VAE latents (and, for a frozen text encoder, text embeddings) into shards the reader can train on.

    python -m ldm.data.cache_latents SHARDS OUT --vae vae/vae.ckpt [--vae-config conf/autoencoder/X.yaml]
        [--text-encoder-config conf/text_encoder/...yaml [--text-encoder CKPT]] [--size S] [--batch-size N]
        [--precision float32|bfloat16|float16] [--compile] [--caption-field FIELD]

Each input shard ``NAME.tar`` becomes ``OUT/NAME.tar`` with, per sample, ``latent_mean.npy`` and
``latent_std.npy`` (the raw, unnormalised posterior moments: ``LatentDiffusionModule.latents_of`` applies the
VAE's ``normalize_latents``, its declared scale and shift, at training time), the ``.txt`` caption and ``.json``
metadata, and with a frozen text encoder ``text_hidden.npy`` [L, D], ``text_pooled.npy`` and ``text_mask.npy``.
``--precision`` is the precision the encoders run in (autocast; the stored one is ``--dtype``), and ``--compile``
runs the VAE's encoder through torch.compile, its kernels kept under ``$LDM_CACHE/inductor``. Output shards are
written atomically and skipped when present, so an interrupted run resumes; ``cache_settings.json`` records what
they were encoded with (precision, stored dtype, size, the VAE's fingerprint, whether text embeddings are cached,
a digest of the source shards), and a rerun with other settings into the same folder is refused rather than mixed
in. Read them with
``ShardDataModule(source="latents")``, which samples mean + std * noise per sample (or takes the mean with
``sample_latents=False``). Text embeddings are cached only for a frozen encoder: a trainable one (``frozen=False``)
would make them stale, so they are not written and training encodes the captions. A sample whose image does not
decode, or that a damaged input shard lost, is skipped with a warning and counted (``skipped`` in index.json).
Wrong input (a zero or negative ``--size``/``--batch-size``, a missing file) prints ``error: ...`` and exits with 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ldm.checkpoint import atomic_write_bytes
from ldm.compiling import compile_function
from ldm.data.shards import (
    INDEX_NAME,
    ShardWriter,
    clean_temporaries,
    count_samples,
    iter_shard,
    resolve_shards,
    write_index,
)
from ldm.data.transforms import (
    IMAGE_EXTS,
    ImageTransform,
    decode_image,
    load_npy,
    missing_caption_field,
    npy_bytes,
    sample_caption,
    sample_meta,
)
from ldm.data.urls import shard_digest
from ldm.devices import parse_device
from ldm.errors import ConfigError


class Posterior(Protocol):
    mean: torch.Tensor
    std: torch.Tensor


class ImageEncoder(Protocol):
    def encode(self, x: torch.Tensor) -> Posterior: ...


class TextEncoderLike(Protocol):
    def encode(self, prompts: list[str]) -> Sequence[torch.Tensor]: ...


# the precisions the encoders may run in while caching: autocast's dtype (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
SETTINGS_NAME = "cache_settings.json"


def check_precision(precision: str, flag: str = "--precision") -> str:
    """``precision`` if it names one of ``PRECISIONS``; else a ConfigError that lists them."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{flag} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _autocast(precision: str, device_type: str) -> AbstractContextManager:
    """Autocast to ``precision`` (a ``PRECISIONS`` key) on ``device_type``; float32: no autocast."""
    dtype = PRECISIONS[check_precision(precision)]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()


def latent_moments(vae: ImageEncoder, precision: str = "float32", compile: bool = False,
                   device: torch.device | str = "cpu") -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The caching pass's encoder: images [B, C, H, W] in [-1, 1] -> the posterior's (mean, std), without
    gradients, under autocast to ``precision`` (a ``PRECISIONS`` key), through torch.compile with ``compile``."""
    check_precision(precision)
    device_type = torch.device(device).type

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(x)
        return posterior.mean, posterior.std

    compiled = compile_function(moments) if compile else moments

    @torch.no_grad()
    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(precision, device_type):
            return compiled(x)

    return encode


def _claim_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record what ``out``'s shards are encoded with, or refuse when they were encoded with something else: the
    skipped-when-present shards of an earlier run would be mixed with new ones. Shards cached before the settings
    were recorded were encoded in float32, with the stored dtype, size and text embeddings their index.json names."""
    path = out / SETTINGS_NAME
    earlier: dict[str, Any] | None = None
    if path.is_file():
        earlier = json.loads(path.read_text())
    elif any(out.glob("*.tar")):
        index = out / INDEX_NAME
        latents = json.loads(index.read_text()).get("latents", {}) if index.is_file() else {}
        earlier = {"precision": "float32", **{k: latents[k] for k in ("dtype", "image_size", "text") if k in latents}}
    if earlier is not None:
        if earlier.get("text") and "caption_field" not in earlier:  # text cached before the field was recorded
            earlier["caption_field"] = None
        changed = {k: (earlier[k], v) for k, v in settings.items() if k in earlier and earlier[k] != v}
        if changed:
            said = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
            raise ConfigError(f"{out} holds latents cached with other settings ({said}): cache into another folder, "
                              "or delete this one to encode everything again")
    if not path.is_file() or earlier != settings:
        atomic_write_bytes(path, json.dumps({**(earlier or {}), **settings}, indent=1).encode())


def _source_digest(paths: Sequence[str], counts: Sequence[int]) -> str:
    """The source shards' names and counts (``shard_digest``) and, for local files, a hash of each one's first 16 KiB
    (its first samples): two datasets of the same layout (shapes with another seed) differ there, while a dataset
    moved to another folder does not."""
    heads = hashlib.sha256()
    for p in paths:
        if os.path.isfile(p):
            with open(p, "rb") as f:
                heads.update(f.read(16384))
    return shard_digest(paths, counts) + heads.hexdigest()[:8]


@torch.no_grad()
def cache_latents(
    shards: str | os.PathLike | list[str],
    out: str | os.PathLike,
    vae: ImageEncoder,
    text_encoder: TextEncoderLike | None = None,
    image_size: int = 32,
    image_mode: str = "RGB",
    batch_size: int = 32,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    log: Callable[[str], None] | None = print,
    precision: str = "float32",
    compile: bool = False,
    fingerprint: str | None = None,
    caption_field: str | None = None,
) -> dict[str, Any]:
    """Encode every sample of ``shards`` (centre crop at ``image_size``) and write latent shards to ``out``.

    ``vae.encode(x)`` gets a [B, C, H, W] batch in [-1, 1] and returns an object with ``.mean`` and ``.std``;
    ``text_encoder.encode(captions)`` returns ``(hidden [B, L, D], pooled, mask)``. ``dtype`` is the stored
    precision (``float32`` or ``float16``); ``precision`` the one the encoders run in (a ``PRECISIONS`` key: bf16 or
    fp16 autocast, as training runs a frozen VAE under mixed precision), and ``compile`` runs the VAE's encoder
    through torch.compile; ``fingerprint`` is ``weights_fingerprint(vae)`` where the caller has it already (hashing
    SD's VAE takes about a second). A text encoder with ``frozen=False`` is ignored (its embeddings would go stale as it
    trains). The text embeddings encode each sample's caption as the reader reads it with ``caption_field`` (the
    ``.txt`` member, or the json's field: ``data.caption_field``); a folder cached with another is refused. Returns
    the written index.
    """
    for flag, value in (("--size", image_size), ("--batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"--dtype must be float32 or float16, got {dtype!r}")
    check_precision(precision)
    if text_encoder is not None and getattr(text_encoder, "frozen", True) is False:
        warnings.warn("not caching text embeddings: the text encoder is trainable (frozen=False), so they would go "
                      "stale; training encodes the captions instead", stacklevel=2)
        text_encoder = None
    paths, counts = resolve_shards(shards)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out)
    settings = {"precision": precision, "dtype": dtype, "image_size": image_size, "image_mode": image_mode,
                "text": text_encoder is not None,
                "source": _source_digest(paths, counts)}  # another dataset's latents must not be reused as these
    if isinstance(vae, torch.nn.Module):
        settings["vae"] = fingerprint or weights_fingerprint(vae)
    if isinstance(text_encoder, torch.nn.Module):  # another frozen encoder's embeddings must not join these
        settings["text_encoder"] = weights_fingerprint(text_encoder)
    if text_encoder is not None:  # embeddings of other captions must not join these
        settings["caption_field"] = caption_field
    _claim_settings(out, settings)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    if device is None:
        p = next(iter(vae.parameters()), None) if isinstance(vae, torch.nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    transform = ImageTransform(size=image_size, crop="center", hflip=False, mode=image_mode)
    device = torch.device(device)
    encode = latent_moments(vae, precision, compile, device)
    entries: list[dict[str, Any]] = []
    latent_shape: list[int] | None = None
    skipped: Counter = Counter()

    def pixels(raw: dict[str, Any]) -> torch.Tensor | None:
        """The sample's image as a [-1, 1] tensor, or None (skipped and counted) when it has none that decodes."""
        if "__error__" in raw:  # lost to a damaged shard; iter_shard has warned
            skipped["damaged shard"] += 1
            return None
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        try:
            if ext is None:
                raise KeyError(f"no image member ({', '.join(IMAGE_EXTS)})")
            return transform(decode_image(raw[ext]))
        except Exception as err:
            reason = f"unreadable image ({type(err).__name__})"
            skipped[reason] += 1
            warnings.warn(f"skipping sample {raw['__shard__']}/{raw['__key__']}: {reason}: {err}", stacklevel=2)
            return None

    warned_field = False

    def caption(raw: dict[str, Any]) -> str:
        """The caption the reader gives this sample with ``caption_field`` (warned once when its json lacks it)."""
        nonlocal warned_field
        meta = sample_meta(raw)
        if caption_field is not None and caption_field not in meta and not warned_field:
            warned_field = True
            warnings.warn(missing_caption_field(raw, meta, caption_field), stacklevel=2)
        return sample_caption(raw, meta, caption_field)

    @torch.no_grad()
    def flush(writer: ShardWriter, raws: list[dict[str, Any]], images: list[torch.Tensor]) -> list[int]:
        x = torch.stack(images).to(device)
        mean, std = encode(x)
        mean = mean.float().cpu().numpy().astype(np_dtype)
        std = std.float().cpu().numpy().astype(np_dtype)
        text: list[np.ndarray] | None = None
        if text_encoder is not None:
            with _autocast(precision, device.type):
                hidden, pooled, mask = text_encoder.encode([caption(r) for r in raws])[:3]
            text = [hidden.float().cpu().numpy().astype(np_dtype), pooled.float().cpu().numpy().astype(np_dtype),
                    mask.cpu().numpy().astype(bool)]
        for i, r in enumerate(raws):
            fields = {"latent_mean.npy": npy_bytes(mean[i]), "latent_std.npy": npy_bytes(std[i])}
            for ext in ("txt", "json", "cls"):
                if ext in r:
                    fields[ext] = r[ext]
            if text is not None:
                fields.update({"text_hidden.npy": npy_bytes(text[0][i]), "text_pooled.npy": npy_bytes(text[1][i]),
                               "text_mask.npy": npy_bytes(text[2][i])})
            writer.write(r["__key__"], fields)
        return list(mean.shape[1:])

    names = [Path(p).name for p in paths]
    if len(set(names)) < len(names):  # shards of several folders: named by position too, or one would be skipped
        names = [f"{j:06d}-{name}" for j, name in enumerate(names)]
    for path, count, name in zip(paths, counts, names, strict=True):
        target = out / name
        if target.exists():
            cached = count_samples(target)  # not the input count: the earlier run may have skipped samples
            if cached < count:
                skipped["skipped by an earlier run"] += count - cached
            if log:
                log(f"{name}: already cached")
            entries.append({"name": name, "count": cached})
            continue
        with ShardWriter(target) as writer:
            group: list[dict[str, Any]] = []
            images: list[torch.Tensor] = []
            for raw in iter_shard(path, count):
                image = pixels(raw)
                if image is None:
                    continue
                group.append(raw)
                images.append(image)
                if len(group) == batch_size:
                    latent_shape = flush(writer, group, images)
                    group, images = [], []
            if group:
                latent_shape = flush(writer, group, images)
        entries.append({"name": name, "count": writer.count})
        if log:
            log(f"{name}: {writer.count} latents")
    if not any(e["count"] for e in entries):
        for e in entries:  # empty shards would be taken as "already cached" by a rerun
            (out / e["name"]).unlink(missing_ok=True)
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items()))
        raise ConfigError(f"no latents written to {out}: every sample of {shards} was skipped ({reasons})")
    if skipped and log:
        log("skipped: " + ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())))
    if latent_shape is None:  # every shard was cached by an earlier run: its shape, not None (train.py checks it)
        latent_shape = _cached_shape(out, entries)
    extra = {"latents": {"shape": latent_shape, "dtype": dtype, "image_size": image_size, "precision": precision,
                         "text": text_encoder is not None}, "skipped": dict(skipped)}
    return write_index(out, entries, **extra)


def _cached_shape(out: Path, entries: list[dict[str, Any]]) -> list[int] | None:
    """The latent shape of a cache whose shards were all written earlier: from its index.json, else from the first
    cached sample's ``latent_mean.npy``; None when neither has it."""
    index = out / INDEX_NAME
    if index.is_file():
        try:
            shape = json.loads(index.read_text()).get("latents", {}).get("shape")
        except (ValueError, AttributeError):
            shape = None
        if isinstance(shape, list) and shape:
            return [int(n) for n in shape]
    for entry in entries:
        if entry["count"]:
            for raw in iter_shard(out / entry["name"], entry["count"]):
                if "latent_mean.npy" in raw:
                    return list(load_npy(raw["latent_mean.npy"]).shape)
    return None


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (any dtype): names a cache folder after the VAE that wrote it, and records
    the text encoder whose embeddings it holds."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_for_vae(shards: str | os.PathLike | list[str], root: str | os.PathLike, vae: torch.nn.Module,
                  image_size: int, image_mode: str = "RGB", batch_size: int = 256, precision: str = "float32",
                  compile: bool = False) -> Path:
    """Encode ``shards`` with the frozen ``vae`` into ``root/<fingerprint of the VAE's weights>`` (``-bfloat16`` or
    ``-float16`` appended for those precisions), or reuse that cache: a resumed run finds its cache again, and a
    folder reused with another VAE or precision never reads latents of the old one. Returns the cache folder."""
    fingerprint = weights_fingerprint(vae)
    name = fingerprint + ("" if check_precision(precision, "ldm_stage.cache_precision") == "float32"
                          else f"-{precision}")
    cache = Path(root) / name
    cache_latents(shards, cache, vae, image_size=image_size, image_mode=image_mode, batch_size=batch_size, log=None,
                  precision=precision, compile=compile, fingerprint=fingerprint)
    return cache


def _load_module(config: str | None, checkpoint: str | None) -> torch.nn.Module:
    """A module from a Hydra yaml (``_target_``) with a state dict (plain, Lightning or SD layout) loaded, or without
    ``config`` from an ldm checkpoint (the VAE stage's ``vae/vae.ckpt``, or an ldm model's first stage)."""
    state: dict[str, Any] | None = None
    for what, given in (("checkpoint", checkpoint), ("config", config)):
        if given and not os.path.isfile(given):
            raise ConfigError(f"{what} {given} does not exist (or is not a file)")
    if checkpoint:
        if checkpoint.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(checkpoint)
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if config is not None:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        module = instantiate(OmegaConf.load(config))
    elif state is not None and (isinstance(state.get("spec"), dict) or "ldm" in state):
        from ldm.checkpoint import load_first_stage  # an ldm file: its own reader

        module = load_first_stage(checkpoint)
        if module is None:
            raise ConfigError(f"{checkpoint} is a pixel-space model: it has no VAE to cache latents with")
        return module.eval()
    else:
        raise ConfigError(f"{checkpoint or 'no checkpoint'}: not self-describing (no 'spec'); pass its Hydra yaml "
                         "(--vae-config / --text-encoder-config)")
    if state is not None:
        state = state.get("state_dict", state)
        own = set(module.state_dict())
        for prefix in ("", "vae.", "autoencoder.", "first_stage_model.", "text_encoder.", "cond_stage_model.",
                       "model."):
            picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own}
            if len(picked) == len(own):
                module.load_state_dict(picked)
                break
        else:
            raise ConfigError(f"{checkpoint} holds no complete state dict for {type(module).__name__}")
    return module.eval()


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with ``error: ...`` on stderr for wrong input)."""
    p = argparse.ArgumentParser(prog="python -m ldm.data.cache_latents", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="shard folder (index.json) or brace pattern")
    p.add_argument("out")
    p.add_argument("--vae", required=True, help="VAE checkpoint: vae/vae.ckpt of train.py, or .ckpt/.pt/.safetensors")
    p.add_argument("--vae-config", default=None, help="Hydra yaml of the VAE (not needed for train.py's vae.ckpt)")
    p.add_argument("--text-encoder-config", default=None, help="Hydra yaml of a frozen text encoder to cache")
    p.add_argument("--text-encoder", default=None, help="its checkpoint, if not pretrained by its config")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--mode", default="RGB", choices=("RGB", "L"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="the stored precision")
    p.add_argument("--precision", default="float32", choices=tuple(PRECISIONS),
                   help="the precision the encoders run in (autocast)")
    p.add_argument("--compile", action="store_true", help="run the VAE's encoder through torch.compile")
    p.add_argument("--caption-field", default=None,
                   help="the json field whose text the text embeddings encode (training's data.caption_field); "
                        "default: the .txt caption")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    try:
        return _run(a)
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(a: argparse.Namespace) -> int:
    for flag, value in (("--size", a.size), ("--batch-size", a.batch_size)):
        if value < 1:  # refused before the models load
            raise ConfigError(f"{flag} must be a positive integer, got {value}")
    device = parse_device(a.device) if a.device else None
    try:
        import ldm.autoencoder  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"cache_latents needs ldm.autoencoder for --vae, which failed to import: {err}") from err
    vae = _load_module(a.vae_config, a.vae)
    text = _load_module(a.text_encoder_config, a.text_encoder) if a.text_encoder_config else None
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        device = accelerator or torch.device("cpu")
    vae.to(device)
    if text is not None:
        text.to(device)
    cache_latents(a.shards, a.out, vae, text, image_size=a.size, image_mode=a.mode, batch_size=a.batch_size,
                  device=device, dtype=a.dtype, precision=a.precision, compile=a.compile, caption_field=a.caption_field)
    return 0


if __name__ == "__main__":
    sys.exit(main())
