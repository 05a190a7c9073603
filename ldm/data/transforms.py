"""Sample decoding and image transforms: bytes -> PIL -> resize -> crop -> optional flip -> [-1, 1] tensor [C, H, W].

Random choices (crop offset, flip) take a ``random.Random`` that the reader seeds per sample from
``(seed, epoch, shard, key)``, so a sample's augmentation does not depend on workers or on resuming.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ldm.errors import ConfigError

IMAGE_EXTS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "bmp")
IMAGE_MODES: tuple[str, ...] = ("RGB", "L", "RGBA", "LA")  # PIL modes of 8-bit channels: 3, 1, 4 and 2 of them


@dataclass
class ImageTransform:
    """Resize the shorter side to ``size``, crop ``size`` x ``size`` (centre or random), optionally flip.

    ``mode`` is the PIL mode images are converted to first (``RGB`` -> 3 channels, ``L`` -> 1 channel).
    """

    size: int = 32
    crop: str = "center"
    hflip: bool = False
    mode: str = "RGB"

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.mode not in IMAGE_MODES:  # here, not at the first sample (where each one would fail as damaged)
            raise ConfigError(f"data.image_mode={self.mode!r} is not an image mode the reader converts to: use one "
                              f"of {', '.join(IMAGE_MODES)} (PIL's names, upper case; RGB: 3 channels, L: 1)")

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Float tensor [C, size, size] in [-1, 1]."""
        return uint8_to_float(self.to_uint8(image, rng))

    def to_uint8(self, image: Image.Image, rng: random.Random | None = None,
                 target: tuple[int, int] | None = None) -> torch.Tensor:
        """The same image as a uint8 tensor [C, size, size] (4x less to send from a DataLoader worker); with
        ``target`` (width, height), an aspect-ratio bucket's size: resized to cover it, then cropped to it."""
        rng = rng or random.Random(0)
        image = eight_bit(image).convert(self.mode)
        w, h = image.size
        tw, th = target if target is not None else (self.size, self.size)
        scale = max(tw / w, th / h)
        if scale != 1:
            nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
            image = image.resize((nw, nh), Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
            w, h = nw, nh
        if self.crop == "random":
            left, top = rng.randint(0, w - tw), rng.randint(0, h - th)
        else:
            left, top = (w - tw) // 2, (h - th) // 2
        if (w, h) != (tw, th):
            image = image.crop((left, top, left + tw, top + th))
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_uint8(image)


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grey-scale image (PIL modes ``I;16*``, or ``I`` holding values above 255) as 8-bit ``L``, scaled:
    PIL's own ``convert`` clips such values at 255, so a 16-bit PNG would come out almost white."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image, dtype=np.int64)
    if image.mode == "I" and values.max(initial=0) <= 255:  # 32-bit storage of 8-bit values
        return Image.fromarray(values.clip(0, 255).astype(np.uint8), "L")
    return Image.fromarray((values.clip(0, 65535) / 257).round().astype(np.uint8), "L")


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor [C, H, W]."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor [C, H, W] in [-1, 1]."""
    return uint8_to_float(pil_to_uint8(image))


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes with PIL, fully loaded (so corrupt data fails here, not later), turned upright by its EXIF
    Orientation tag: phone photos store the sensor's pixels and say how to rotate them, as viewers (and diffusers'
    ``load_image``) do."""
    image = Image.open(io.BytesIO(data))
    image.load()
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1 to 8) of an opened image; 1 (upright) when it has none or an invalid one."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_npy(data: bytes) -> np.ndarray:
    """A .npy member as a (writable) array, as ``np.load(..., allow_pickle=False)`` reads it.

    numpy parses the header with ``ast.literal_eval`` on every call, which is most of the cost for the small arrays
    of a latent cache (two per sample, about 30 us each); the arrays of a shard share a few headers, so their parse
    is cached here.
    """
    offset = _npy_data_offset(data)
    layout = _npy_layout(bytes(data[:offset]))
    if layout is None:  # object arrays (numpy refuses them with its message) or a version-3 header: numpy's reader
        return np.load(io.BytesIO(data), allow_pickle=False)
    dtype, shape, fortran = layout
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"a .npy member of {len(data)} bytes holds {len(data) - offset} bytes of data, but its header "
                         f"declares {shape} {dtype} ({count * dtype.itemsize} bytes): the shard is damaged. Fix: "
                         "delete it and rerun the command that wrote it (cache_latents and make_shards write "
                         "missing shards)")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C").copy(order="K")


def _npy_data_offset(data: bytes) -> int:
    """Where a .npy file's data starts: after the magic string, the version, the header length and the header."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        raise ValueError(f"not a .npy member (it starts with {bytes(data[:8])!r}): the shard is damaged or was not "
                         "written by numpy's np.save")
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    return 12 + int.from_bytes(data[8:12], "little")  # versions 2 and 3: a 4-byte header length


@functools.lru_cache(maxsize=256)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    """(dtype, shape, Fortran order) of a .npy header, parsed by numpy; None where numpy's whole reader must run."""
    f = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(f)
    read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
    if read is None:
        return None
    shape, fortran, dtype = read(f)
    return None if dtype.hasobject else (dtype, shape, fortran)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def sample_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample's ``.json`` member as a mapping; empty without one, or for a json of another shape (a list, a
    number), which holds no fields to read."""
    meta = json.loads(raw["json"]) if "json" in raw else {}
    return meta if isinstance(meta, dict) else {}


def sample_caption(raw: dict[str, Any], meta: dict[str, Any], caption_field: str | None = None) -> str:
    """A sample's caption: ``meta[caption_field]`` when ``caption_field`` is set (empty when its json lacks the
    field), else the ``.txt`` member, else ``meta["caption"]``. ``meta`` is the sample's parsed json (a dict). The
    reader and the latent cache's text embeddings both read captions by this rule, so cached embeddings encode the
    caption training would."""
    if caption_field is not None:
        return str(meta.get(caption_field, ""))
    if "txt" in raw:
        return raw["txt"].decode("utf-8").strip()
    return str(meta.get("caption", ""))


def missing_caption_field(raw: dict[str, Any], meta: dict[str, Any], caption_field: str) -> str:
    """The warning for a sample whose json lacks ``caption_field`` (its caption is then empty)."""
    return (f"sample {raw['__key__']}: its json has no field data.caption_field={caption_field!r} (it has "
            f"{sorted(meta)}): its caption is empty. Fix: set data.caption_field to one of those fields (or null to "
            "read the .txt)")


@dataclass
class SampleDecoder:
    """Turn a raw shard sample (dict of extension -> bytes) into a training sample.

    ``source="images"``: decodes the image and applies ``transform`` -> ``image`` as uint8 [C, H, W]; the loader
    converts whole batches to float in [-1, 1] in the main process (less to copy out of workers).
    ``source="latents"``: reads ``latent_mean.npy`` (+ ``latent_std.npy``) -> ``latent``, sampled as
    mean + std * noise from the sample's RNG when ``sample_latents`` else the mean; cached text embeddings
    (``text_hidden.npy``, ``text_pooled.npy``, ``text_mask.npy``) are passed through when present.
    The caption is the ``.txt`` member, or ``json[caption_field]`` when ``caption_field`` is set (or ``.txt`` is
    missing); ``label`` comes from ``json["label"]`` or a ``.cls`` member when present. An optional ``.mask.png``
    (or another image extension) member, of the image's size, is an inpainting mask (white = repaint): it gets the
    image's resize, crop and flip and becomes ``mask``, uint8 [1, H, W] in {0, 255}.
    """

    transform: ImageTransform
    source: str = "images"
    caption_field: str | None = None
    sample_latents: bool = True
    _warned: set[str] = field(default_factory=set, init=False, repr=False, compare=False)  # once per process

    def __post_init__(self) -> None:
        if self.source not in ("images", "latents"):
            raise ValueError(f"source must be 'images' or 'latents', got {self.source!r}")

    def __call__(self, raw: dict[str, Any], rng: random.Random,
                 size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The training sample of ``raw``; ``size`` (width, height) is its aspect-ratio bucket's, if any."""
        meta = sample_meta(raw)
        out: dict[str, Any] = {"key": raw["__key__"]}
        if self.caption_field is not None and self.caption_field not in meta:
            self._warn_once("caption_field", missing_caption_field(raw, meta, self.caption_field))
        out["caption"] = sample_caption(raw, meta, self.caption_field)
        label = meta.get("label")
        if label is None and "cls" in raw:
            label = raw["cls"].decode(errors="replace").strip()
        if label is not None:
            try:
                out["label"] = int(label)
            except (ValueError, TypeError):  # the image and caption are fine: kept, without a class label
                self._warn_once("label", f"sample {raw['__key__']}: its label {label!r} (json 'label' or .cls) is "
                                "not an integer class index; reading such samples without a label (class-"
                                "conditional training needs integer labels 0..num_classes-1)")
        if self.source == "images":
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                raise KeyError(f"sample {raw['__key__']} has no image member ({', '.join(IMAGE_EXTS)})")
            state = rng.getstate()  # the mask replays the image's crop and flip
            image = decode_image(raw[ext])
            out["image"] = self.transform.to_uint8(image, rng, size)  # to float after collation
            mask_ext = next((f"mask.{e}" for e in IMAGE_EXTS if f"mask.{e}" in raw), None)
            if mask_ext is not None:
                mask = decode_image(raw[mask_ext])
                if mask.size != image.size:
                    raise ValueError(f"sample {raw['__key__']}: mask is {mask.size[0]}x{mask.size[1]} but the image "
                                     f"is {image.size[0]}x{image.size[1]}; masks must have the image's size")
                replay = random.Random()
                replay.setstate(state)
                mask_u8 = dataclasses.replace(self.transform, mode="L").to_uint8(mask, replay, size)
                out["mask"] = (mask_u8 >= 128).to(torch.uint8) * 255
        else:
            mean = torch.from_numpy(load_npy(raw["latent_mean.npy"]).astype(np.float32))
            if self.sample_latents and "latent_std.npy" in raw:
                std = torch.from_numpy(load_npy(raw["latent_std.npy"]).astype(np.float32))
                g = torch.Generator().manual_seed(rng.getrandbits(63))
                mean = mean + std * torch.randn(mean.shape, generator=g)
            out["latent"] = mean
            for name in ("text_hidden", "text_pooled", "text_mask"):
                if f"{name}.npy" in raw:
                    out[name] = torch.from_numpy(load_npy(raw[f"{name}.npy"]))
        return out

    def _warn_once(self, kind: str, message: str) -> None:
        """Warn about a kind of sample problem once per process, not once per sample."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, stacklevel=3)


def check_labels(batch: dict[str, Any], num_classes: int | None) -> None:
    """A collated batch's ``label`` [B] against a class-conditional UNet of ``num_classes`` classes (None: no
    classes, labels unused). Raises ConfigError when the batch has none (a sample without one drops them all) or one
    lies outside [0, num_classes): the UNet's embedding would fail with a bare IndexError (a device-side assert on a
    GPU). Runs on the host, before the batch moves to the device."""
    if num_classes is None:
        return
    labels, keys = batch.get("label"), batch.get("key") or []  # the keys: for the messages only
    if labels is None:
        raise ConfigError(f"unet.num_classes={num_classes} makes the UNet class-conditional, but a batch (samples "
                          f"{list(keys[:4])}) has no class labels: every sample needs an integer label in "
                          f"0..{num_classes - 1} (json 'label' or a .cls member); label the shards or set "
                          "unet.num_classes=null")
    outside = (labels < 0) | (labels >= num_classes)
    if bool(outside.any()):
        where = [keys[i] for i in outside.nonzero().flatten().tolist()[:4] if i < len(keys)]
        raise ConfigError(f"class labels {sorted(set(labels[outside].tolist()))[:8]} (samples {where}) lie outside the "
                          f"UNet's classes [0, {num_classes}) (unet.num_classes={num_classes}): set unet.num_classes "
                          "above the largest label, or relabel the shards 0..num_classes-1")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list strings; ``label`` becomes a tensor only when every sample has one. A ``mask`` that only
    some samples have is kept, zeros standing for the others, with ``mask_given`` [B] bool saying whose it is."""
    batch: dict[str, Any] = {}
    names = dict.fromkeys(name for s in samples for name in s)
    for name in names:
        values = [s.get(name) for s in samples]
        if name == "mask" and any(v is not None for v in values) and any(v is None for v in values):
            like = next(v for v in values if v is not None)
            batch["mask_given"] = torch.tensor([v is not None for v in values])
            values = [v if v is not None else torch.zeros_like(like) for v in values]
        if any(v is None for v in values):
            continue
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif name == "label":
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    return batch
