"""Image-distribution metrics (FID, KID, precision/recall): the one place ldm computes them, by torch-fidelity on
local extractor weights, so every value comes from one library, one resize and a protocol that is logged with it.

Inputs (generated or reference side): an image folder (recursive, sorted by relative path), a shard set that ldm's
data layer reads (a folder of ``.tar`` with ``index.json``, a brace pattern, one ``.tar``), a uint8 tensor
[N, 3, H, W], a list of PIL images, or a statistics ``.npz`` (``mu``, ``sigma`` as pytorch-fid and clean-fid write
them; ours also hold ``features``, which KID and precision/recall need). Images go to torch-fidelity as uint8 at
their own size; its extractor resizes them (bilinear, TensorFlow-1-compatible, to 299 px for Inception).
Weights are never downloaded: ``resolve_weights`` takes an explicit path or an environment variable.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.checkpoint import atomic_write_bytes
from ldm.data.make_shards import IMAGE_SUFFIXES
from ldm.data.shards import iter_shard, resolve_shards
from ldm.data.transforms import decode_image, pil_to_uint8
from ldm.errors import ConfigError

DEFAULT_EXTRACTOR = "inception-v3-compat"
ENV_VARS = {"inception": "LDM_INCEPTION_WEIGHTS", "clip": "LDM_CLIP_WEIGHTS", "dinov2": "LDM_DINOV2_WEIGHTS"}
FLAGS = {"inception": "--inception-weights", "clip": "--weights", "dinov2": "--weights"}
KID_SUBSETS = 100  # torch-fidelity's default
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k of the k-NN balls
STATS_SUFFIX = ".npz"
# the data layer's image extensions, as (lowercase) shard member extensions
_SHARD_IMAGE_EXTS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)

ImageSource = str | os.PathLike | torch.Tensor | Sequence[Image.Image] | Mapping[str, Any]


# ---------------------------------------------------------------------------------------------- weights


def _family(extractor: str) -> str:
    """``inception`` / ``clip`` / ``dinov2`` for a torch-fidelity extractor name; ConfigError for anything else."""
    from torch_fidelity.feature_extractor_clip import MODEL_URLS
    from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA

    if extractor == DEFAULT_EXTRACTOR:
        return "inception"
    if extractor in MODEL_URLS:
        return "clip"
    if extractor in MODEL_METADATA:
        return "dinov2"
    names = [DEFAULT_EXTRACTOR, *MODEL_URLS, *MODEL_METADATA]
    raise ConfigError(f"unknown feature extractor {extractor!r}: choose one of {', '.join(names)}")


def weights_source(extractor: str) -> tuple[str, str]:
    """(file name, URL) of the weights file ``extractor`` loads, from torch-fidelity's own constants (DINOv2:
    the file torch.hub's facebookresearch/dinov2 entry point fetches)."""
    family = _family(extractor)
    if family == "inception":
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
    elif family == "clip":
        from torch_fidelity.feature_extractor_clip import MODEL_URLS

        url = MODEL_URLS[extractor]
    else:
        from torch_fidelity.feature_extractor_dinov2 import MODEL_METADATA

        hub = MODEL_METADATA[extractor]
        url = f"https://dl.fbaipublicfiles.com/dinov2/{hub}/{hub}_pretrain.pth"
    return url.rsplit("/", 1)[1], url


def resolve_weights(extractor: str, path: str | os.PathLike | None = None) -> str:
    """The local weights file of ``extractor``: ``path`` (a flag or config value) first, else the environment
    variable of its family (LDM_INCEPTION_WEIGHTS, LDM_CLIP_WEIGHTS, LDM_DINOV2_WEIGHTS). Nothing is downloaded:
    neither given is a ConfigError naming the file, where to get it and what to set; a path that is not a file is
    a ConfigError naming the path."""
    family = _family(extractor)
    env, flag = ENV_VARS[family], FLAGS[family]
    filename, url = weights_source(extractor)
    origin = "weights path"
    if path is None or str(path) == "":
        value = os.environ.get(env, "")
        if not value:
            note = ""
            if family == "dinov2":
                import torch_fidelity

                note = (f". Note: torch-fidelity 0.4.0 (installed: {torch_fidelity.__version__}) cannot load DINOv2 "
                        "from a local file at all (it only uses torch.hub, online)")
            raise ConfigError(
                f"no weights for the {extractor} feature extractor: ldm never downloads them. Get {filename} (on a "
                f"machine with internet: {url}) and pass {flag} PATH (weights_path= in Python) or set {env}=PATH"
                f"{note}")
        path, origin = value, f"${env}"
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise ConfigError(f"{origin} {path} does not exist or is not a file: point it at a local copy of {filename} "
                          f"(from {url}) for the {extractor} feature extractor")
    return str(resolved)


# ---------------------------------------------------------------------------------------------- extractor


class FeatureExtractor:
    """A torch-fidelity feature extractor built from a local weights file, and the protocol it implies (``meta``:
    library, extractor, feature layer, resize, weights file name)."""

    def __init__(self, extractor: str = DEFAULT_EXTRACTOR, weights_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu") -> None:
        import torch_fidelity
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor

        path = resolve_weights(extractor, weights_path)
        filename, url = weights_source(extractor)
        self.layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
        try:
            net = create_feature_extractor(extractor, [self.layer], cuda=False, feature_extractor_weights_path=path,
                                           verbose=False)
        except NotImplementedError:
            raise ConfigError(
                f"torch-fidelity {torch_fidelity.__version__} cannot load {extractor} from a local weights file: its "
                "FeatureExtractorDinoV2 loads DINOv2 only through torch.hub.load('facebookresearch/dinov2', ...), "
                "which downloads code and weights from the internet. FD-DINOv2 is therefore not available offline; "
                f"use {DEFAULT_EXTRACTOR} or a clip-* extractor") from None
        except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigError(f"{path} is not a weights file for the {extractor} feature extractor "
                              f"({type(err).__name__}: {first[:200]}); expected {filename} from {url}") from err
        self.net = net.to(device)
        self.device = torch.device(device)
        size = getattr(net, "resolution", None) or type(net).INPUT_IMAGE_SIZE
        self.meta: dict[str, Any] = {
            "library": f"torch-fidelity {torch_fidelity.__version__}",
            "extractor": extractor,
            "feature_layer": str(self.layer),
            "resize": f"torch-fidelity (bilinear, TF1-compatible, {size}x{size}; uint8 input at native size)",
            "weights": Path(path).name,
            "weights_digest": weights_digest(path),
        }
        self.image_sizes: set[tuple[int, int]] = set()  # (height, width) of the images of the last features() call

    @torch.no_grad()
    def features(self, images: ImageSource, batch_size: int = 64, limit: int | None = None) -> torch.Tensor:
        """Features [N, D] (float32, as torch-fidelity returns them) of ``images`` (any input but statistics)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
        out: list[torch.Tensor] = []
        batch: list[torch.Tensor] = []
        self.image_sizes = set()

        def flush() -> None:
            if batch:
                (feats,) = self.net(torch.stack(batch).to(self.device))
                out.append(feats.float().cpu())
                batch.clear()

        for image in iter_images(images, limit):
            if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
                flush()
            batch.append(image)
            self.image_sizes.add((int(image.shape[-2]), int(image.shape[-1])))
        flush()
        if not out:
            raise ConfigError(f"no images in {_describe(images)}")
        return torch.cat(out)


def image_size_label(sizes: Iterable[tuple[int, int]]) -> str | None:
    """The native size of a set of images as statistics record it: ``"32x32"`` (height x width), ``"mixed: ..."``
    for several, None for none."""
    labels = [f"{h}x{w}" for h, w in sorted(set(sizes))]
    if len(labels) <= 1:
        return labels[0] if labels else None
    shown = ", ".join(labels[:3]) + (f" and {len(labels) - 3} more" if len(labels) > 3 else "")
    return f"mixed: {shown}"


def extract_features(images: ImageSource, *, extractor: str = DEFAULT_EXTRACTOR,
                     weights_path: str | os.PathLike | None = None, batch_size: int = 64,
                     device: str | torch.device = "cpu", limit: int | None = None) -> torch.Tensor:
    """Features [N, D] (float32) of ``images`` by torch-fidelity's ``extractor``; ``limit`` keeps the first N.
    A statistics ``.npz`` with stored features of the same extractor returns those."""
    if _kind(images) == "stats":
        stats = images if isinstance(images, Mapping) else load_stats(images)  # type: ignore[arg-type]
        _check_stats_extractor(stats, extractor, _describe(images))  # type: ignore[arg-type]
        if stats["features"] is None:
            raise ConfigError(f"{_describe(images)} holds only mu/sigma, no features: recompute it with python -m "
                              "ldm.eval.ref_stats")
        return stats["features"][:limit]
    return FeatureExtractor(extractor, weights_path, device).features(images, batch_size, limit)


# ---------------------------------------------------------------------------------------------- inputs


def _describe(source: Any) -> str:
    if isinstance(source, torch.Tensor):
        return f"a tensor of shape {tuple(source.shape)}"
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, Mapping):
        return f"statistics of {source.get('n')} images"
    return f"a list of {len(source)} images"


def _kind(source: Any) -> str:
    """``tensor``, ``pil``, ``stats`` (an ``.npz`` or statistics already in memory, as ``load_stats`` and
    ``features_to_stats`` return them), ``shards`` or ``folder``; ConfigError for a path that does not exist."""
    if isinstance(source, Mapping):
        return "stats"
    if isinstance(source, torch.Tensor):
        return "tensor"
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        return "pil"
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(f"unsupported image input of type {type(source).__name__}: give an image folder, a shard "
                          "set, a statistics .npz, a uint8 tensor [N, 3, H, W] or a list of PIL images")
    spec = str(source)
    if spec.startswith(("pipe:", "http://", "https://")):
        raise ConfigError(f"{spec}: metrics read local shards only; copy the shards to a local folder")
    path = Path(spec)
    if "{" in spec or (path.suffix == ".tar" and path.is_file()):
        return "shards"
    if path.is_file() and path.suffix == STATS_SUFFIX:
        return "stats"
    if path.is_dir():
        if (path / "index.json").exists() or any(path.glob("*.tar")):
            return "shards"
        return "folder"
    if path.exists():
        raise ConfigError(f"{spec} is neither an image folder, a shard set nor a statistics {STATS_SUFFIX} file")
    raise ConfigError(f"{spec} does not exist: give an image folder, a shard folder or brace pattern, or a "
                      f"statistics {STATS_SUFFIX} (python -m ldm.eval.ref_stats writes one)")


def _folder_files(folder: Path) -> list[Path]:
    """The images under ``folder``, recursively, in path order; entries whose name starts with ``_`` or ``.`` are
    not samples (sample.py's ``_previews/`` grid and GIFs, hidden files) and are skipped."""
    def sample(p: Path) -> bool:
        rel = p.relative_to(folder).parts
        return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(x[:1] in ("_", ".") for x in rel)

    files = sorted((p for p in folder.rglob("*") if sample(p)), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise ConfigError(f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively): write the "
                          "generated images there first, or point at the right folder")
    return files


def _to_rgb(image: Image.Image) -> torch.Tensor:
    return pil_to_uint8(image.convert("RGB"))  # as torch-fidelity reads files: alpha dropped, grey repeated


def count_images(source: ImageSource) -> int:
    """How many images ``source`` holds (a shard set: its index' count), without decoding them."""
    kind = _kind(source)
    if kind == "tensor":
        return len(source)  # type: ignore[arg-type]
    if kind == "pil":
        return len(source)  # type: ignore[arg-type]
    if kind == "stats":
        stats = source if isinstance(source, Mapping) else load_stats(source)  # type: ignore[arg-type]
        return int(stats["n"]) if stats["n"] is not None else -1
    if kind == "shards":
        return sum(resolve_shards(str(source))[1])
    return len(_folder_files(Path(source)))  # type: ignore[arg-type]


def iter_images(source: ImageSource, limit: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 RGB [3, H, W] images of ``source`` in a fixed order (folders: sorted relative paths; shards: index
    order), at most ``limit``."""
    kind = _kind(source)
    if kind == "stats":
        raise ConfigError(f"{source} is a statistics file, not images")
    count = 0
    if kind == "tensor":
        x = source
        assert isinstance(x, torch.Tensor)
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"image tensors must be uint8 [N, 3, H, W] in 0..255, got {x.dtype} of shape "
                              f"{tuple(x.shape)}; convert with ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        yield from x[:limit].cpu()
        return
    if kind == "pil":
        for image in list(source)[:limit]:  # type: ignore[arg-type]
            if not isinstance(image, Image.Image):
                raise ConfigError(f"a list of images must hold PIL images, got {type(image).__name__}")
            yield _to_rgb(image)
        return
    if kind == "folder":
        for path in _folder_files(Path(source))[:limit]:  # type: ignore[arg-type]
            try:
                image = decode_image(path.read_bytes())
            except Exception as err:  # noqa: BLE001 - any decoder failure is the file's fault
                raise ConfigError(f"cannot decode image {path} ({type(err).__name__}: {err}); remove or "
                                  "replace it") from None
            yield _to_rgb(image)
        return
    paths, counts = resolve_shards(str(source))
    without_image = 0
    for path, n in zip(paths, counts, strict=True):
        for raw in iter_shard(path, n):
            if limit is not None and count >= limit:
                return
            if "__error__" in raw:  # lost to a damaged shard; iter_shard has warned
                continue
            ext = next((e for e in raw if e.lower() in _SHARD_IMAGE_EXTS), None)
            if ext is None:
                without_image += 1
                continue
            try:
                image = decode_image(raw[ext])
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"cannot decode sample {raw['__key__']} of shard {path} ({type(err).__name__}: "
                                  f"{err}); rewrite the shard") from None
            count += 1
            yield _to_rgb(image)
    if without_image:
        warnings.warn(f"{without_image} samples of {source} hold no image (extensions {', '.join(_SHARD_IMAGE_EXTS)}) "
                      "and were skipped", stacklevel=2)


# ---------------------------------------------------------------------------------------------- statistics


def features_to_stats(features: torch.Tensor, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Statistics in memory, as ``load_stats`` returns them: ``mu``, ``sigma`` (torch-fidelity's statistics of
    ``features``, float64), ``features`` (float32, CPU), ``n`` and the ``metadata`` keys."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.dim() != 2 or len(features) < 2:
        raise ConfigError(f"statistics need features [N, D] with N >= 2, got shape {tuple(features.shape)}")
    feats = features.detach().cpu().float()
    stats = fid_features_to_statistics(feats.double())
    out: dict[str, Any] = {"extractor": None, "resize": None, **(metadata or {})}
    for key in ("mu", "sigma", "features", "n"):
        if key in out:
            raise ValueError(f"metadata key {key!r} would overwrite the statistics")
    return {**out, "mu": stats["mu"], "sigma": stats["sigma"], "features": feats, "n": len(feats)}


def save_stats(path: str | os.PathLike, features: torch.Tensor, metadata: dict[str, Any] | None = None) -> None:
    """Write ``features_to_stats(features, metadata)`` to an ``.npz``, atomically (metadata: one string or number
    per key)."""
    if str(path)[-len(STATS_SUFFIX):] != STATS_SUFFIX:
        raise ConfigError(f"statistics file {path} must end in {STATS_SUFFIX}")
    stats = features_to_stats(features, metadata)
    arrays: dict[str, np.ndarray] = {"mu": stats["mu"], "sigma": stats["sigma"],
                                     "features": stats["features"].numpy(), "n": np.asarray(stats["n"], np.int64)}
    for key, value in (metadata or {}).items():
        arrays[key] = np.asarray(value if isinstance(value, str | int | float) else json.dumps(value))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """``mu``, ``sigma`` (float64 arrays), ``features`` (float32 tensor, or None for pytorch-fid / clean-fid
    files), ``n`` (None if unknown) and any metadata strings (``extractor``, ``resize``, ...; None if absent)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise ConfigError(f"statistics file {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"cannot read statistics file {path} ({type(err).__name__}: {err})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise ConfigError(f"{path} is not a statistics file: it lacks mu and sigma (keys: {', '.join(arrays)}); "
                          "write one with python -m ldm.eval.ref_stats")
    mu, sigma = arrays.pop("mu").astype(np.float64), arrays.pop("sigma").astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ConfigError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    features = arrays.pop("features", None)
    n = arrays.pop("n", None)
    out: dict[str, Any] = {
        "mu": mu, "sigma": sigma,
        "features": torch.from_numpy(features.astype(np.float32)) if features is not None else None,
        "n": int(n) if n is not None else (len(features) if features is not None else None),
        "extractor": None, "resize": None,
    }
    out.update({k: v.item() if v.ndim == 0 else v for k, v in arrays.items()})
    return out


def weights_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the weights file's SHA-256: statistics record it, so features of other weights
    (a renamed or re-downloaded file counts as the same when its bytes are) are not compared with them. Hashed once
    per file state (the config check, the callback and each extractor ask for it)."""
    stat = os.stat(path)
    return _file_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def check_stats_weights(stats: Mapping[str, Any], weights: Mapping[str, Any], where: str, fix: str) -> None:
    """Refuse statistics whose features another weights file made: ``weights`` holds the run's ``weights`` (file
    name) and ``weights_digest``. Compared by digest where both have one, else by file name; statistics that name no
    weights (pytorch-fid, clean-fid) pass. ``fix`` ends the message."""
    stored, digest = stats.get("weights"), stats.get("weights_digest")
    if digest and weights.get("weights_digest"):
        same = digest == weights["weights_digest"]
    else:
        same = not stored or not weights.get("weights") or stored == weights["weights"]
    if not same:
        raise ConfigError(f"{where} holds features of the weights {stored} ({digest or 'no digest'}), but this run's "
                          f"extractor loads {weights.get('weights')} ({weights.get('weights_digest') or 'no digest'}): "
                          f"features of two networks are not comparable. {fix}")


def _check_stats_extractor(stats: dict[str, Any], extractor: str, where: str) -> None:
    stored = stats.get("extractor")
    if stored is not None and stored != extractor:
        raise ConfigError(f"{where} holds {stored} features but this run uses {extractor}: recompute the reference "
                          f"with python -m ldm.eval.ref_stats --feature-extractor {extractor}, or pick {stored}")
    if stored is None:
        warnings.warn(f"{where} does not say which extractor made it (a pytorch-fid or clean-fid file?): assuming "
                      f"{extractor} features; its resize protocol may differ from torch-fidelity's", stacklevel=3)


# ---------------------------------------------------------------------------------------------- metrics


class Metrics(dict):
    """The metric values (``fid``, ``kid_mean``, ``kid_std``, ``precision``, ``recall``, ``n_gen``, ``n_ref``), with
    ``meta``: the protocol to log beside them (library, extractor, feature layer, resize, weights, KID subsets)."""

    def __init__(self, *args: Any, meta: dict[str, Any] | None = None, **values: Any) -> None:
        super().__init__(*args, **values)
        self.meta: dict[str, Any] = meta if meta is not None else {}

    def protocol(self) -> str:
        """One line naming the protocol, for logs next to the values."""
        m = self.meta
        line = f"{m.get('library')}, {m.get('extractor')} features (layer {m.get('feature_layer')})"
        line += f", resize: {m.get('resize')}"
        if m.get("weights"):
            line += f", weights {m['weights']}"
        if m.get("image_size"):
            line += f", images {m['image_size']}"
        if "kid_subset_size" in m:
            line += f", KID: {m['kid_subsets']} subsets of {m['kid_subset_size']}"
        return line


@dataclass
class _Side:
    name: str
    source: Any
    kind: str
    stats: dict[str, Any] | None = None
    features: torch.Tensor | None = None
    image_size: str | None = None  # the images' native size (``image_size_label``), None where unknown

    @property
    def n(self) -> int:
        if self.features is not None:
            return len(self.features)
        assert self.stats is not None
        return self.stats["n"] if self.stats["n"] is not None else -1

    def fid_stats(self) -> dict[str, np.ndarray]:
        from torch_fidelity.metric_fid import fid_features_to_statistics

        if self.stats is not None:
            return {"mu": self.stats["mu"], "sigma": self.stats["sigma"]}
        assert self.features is not None
        return fid_features_to_statistics(self.features.double())


def compute_metrics(gen: ImageSource, ref: ImageSource, *, extractor: str = DEFAULT_EXTRACTOR,
                    weights_path: str | os.PathLike | None = None, fid: bool = True, kid: bool = False,
                    prc: bool = False, kid_subset_size: int = 1000, batch_size: int = 64,
                    device: str | torch.device = "cpu") -> Metrics:
    """FID / KID / precision-recall of ``gen`` against ``ref`` by torch-fidelity's functions on ``extractor``
    features (precision/recall use the same extractor as FID, not torch-fidelity's vgg16 default for PRC).

    Returns a ``Metrics`` dict with the requested keys and ``n_gen``, ``n_ref``; its ``meta`` holds the protocol.
    A KID subset larger than the smaller set is clamped to it, with a warning.
    """
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    if not (fid or kid or prc):
        raise ConfigError("no metric requested: set fid, kid or prc")
    if kid and (isinstance(kid_subset_size, bool) or not isinstance(kid_subset_size, int) or kid_subset_size < 2):
        raise ConfigError(f"kid_subset_size must be an integer >= 2 (KID's unbiased estimate needs pairs), got "
                          f"{kid_subset_size!r}")
    _family(extractor)
    sides = [_Side("GEN", gen, _kind(gen)), _Side("REF", ref, _kind(ref))]
    need_features = kid or prc
    for side in sides:  # every input check before the network is loaded
        if side.kind == "stats":
            side.stats = side.source if isinstance(side.source, Mapping) else load_stats(side.source)
            _check_stats_extractor(side.stats, extractor, _describe(side.source))
            if need_features and side.stats["features"] is None:
                wanted = " and ".join(w for w, on in (("KID", kid), ("precision/recall", prc)) if on)
                raise ConfigError(f"{wanted} need features, and {_describe(side.source)} holds only mu/sigma (a "
                                  "pytorch-fid or clean-fid file?): compute the reference with python -m "
                                  "ldm.eval.ref_stats, which stores the features, or ask for FID alone")
            side.features = side.stats["features"] if need_features else None
        else:
            _check_count(side, count_images(side.source), kid, prc)
    meta: dict[str, Any] = {"library": None, "extractor": extractor, "feature_layer": None, "resize": None,
                            "weights": None}
    if any(s.kind != "stats" for s in sides):
        net = FeatureExtractor(extractor, weights_path, device)
        meta.update(net.meta)
        for side in sides:
            if side.kind == "stats":
                assert side.stats is not None
                check_stats_weights(side.stats, net.meta, _describe(side.source),
                                    "Recompute it with python -m ldm.eval.ref_stats and these weights, or pass the "
                                    "weights it was made with")
        for side in sides:
            if side.kind != "stats":
                side.features = net.features(side.source, batch_size)
                side.image_size = image_size_label(net.image_sizes)
    else:  # two statistics files: made with the same weights, or not comparable
        gen_stats, ref_stats = (s.stats for s in sides)
        assert gen_stats is not None and ref_stats is not None
        check_stats_weights(ref_stats, gen_stats, _describe(sides[1].source),
                            f"{_describe(sides[0].source)} was made with the other: recompute one of them")
    for side in sides:
        if side.kind == "stats":
            assert side.stats is not None
            meta["resize"] = meta["resize"] or side.stats.get("resize")
            meta["feature_layer"] = meta["feature_layer"] or side.stats.get("feature_layer")
            meta["library"] = meta["library"] or side.stats.get("library")
            meta["weights"] = meta["weights"] or side.stats.get("weights")
            side.image_size = side.stats.get("image_size")
        _check_count(side, side.n, kid, prc)
    g, r = sides
    meta["image_size"] = _image_sizes(g, r)
    dims = {s.name: (s.features.shape[1] if s.features is not None else len(s.fid_stats()["mu"])) for s in sides}
    if dims["GEN"] != dims["REF"]:
        raise ConfigError(f"GEN has {dims['GEN']}-dim features and REF {dims['REF']}-dim: they come from different "
                          "extractors; compute both with the same one")
    out = Metrics(n_gen=g.n, n_ref=r.n, meta=meta)
    if fid:
        out["fid"] = float(fid_statistics_to_metric(g.fid_stats(), r.fid_stats(), verbose=False)[
            "frechet_inception_distance"])
    if kid:
        assert g.features is not None and r.features is not None
        size = min(kid_subset_size, len(g.features), len(r.features))
        if size < kid_subset_size:
            warnings.warn(f"KID subset size {kid_subset_size} is more than the {min(g.n, r.n)} images of the smaller "
                          f"set: clamped to {size} (KID at small n is noisy; record n with the value)", stacklevel=2)
        meta.update(kid_subsets=KID_SUBSETS, kid_subset_size=size)
        k = kid_features_to_metric(g.features, r.features, kid_subsets=KID_SUBSETS, kid_subset_size=size,
                                   verbose=False)
        out["kid_mean"], out["kid_std"] = float(k["kernel_inception_distance_mean"]), float(
            k["kernel_inception_distance_std"])
    if prc:
        assert g.features is not None and r.features is not None
        p = prc_features_to_metric(g.features, r.features, prc_neighborhood=PRC_NEIGHBORHOOD, verbose=False)
        out["precision"], out["recall"] = float(p["precision"]), float(p["recall"])
    return out


def _image_sizes(gen: _Side, ref: _Side) -> str | None:
    """The protocol's image sizes; warns when the two sides' native sizes differ (the extractor resizes both to its
    input, so the metric then measures the resizing too: compare at one size)."""
    if gen.image_size == ref.image_size:
        return gen.image_size
    if gen.image_size and ref.image_size:
        warnings.warn(f"GEN images are {gen.image_size} and REF images {ref.image_size}: the extractor resizes both, "
                      "so the metric also measures the difference in resizing; generate at the reference's size or "
                      "resize the reference images first", stacklevel=3)
    return f"GEN {gen.image_size or 'unknown'}, REF {ref.image_size or 'unknown'}"


def _check_count(side: _Side, n: int, kid: bool, prc: bool) -> None:
    """FID needs 2 images a side (a covariance), KID 2, precision/recall k+1 (the k-th neighbour)."""
    if n < 0:
        return  # a statistics file of unknown n
    need, why = 2, "FID needs at least 2 images per set (a covariance)"
    if prc and n < PRC_NEIGHBORHOOD + 1:
        need, why = PRC_NEIGHBORHOOD + 1, f"precision/recall need at least {PRC_NEIGHBORHOOD + 1} images per set"
    if n < need:
        found = "no images" if n == 0 else f"only {n} image{'s' if n != 1 else ''}"
        raise ConfigError(f"{side.name} {_describe(side.source)} holds {found}: {why}; generate more (thousands "
                          "for a comparable FID)")
