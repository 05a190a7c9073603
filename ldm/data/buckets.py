"""Aspect-ratio buckets for multi-resolution training (SDXL's scheme): sizes at a pixel budget, and each sample's
bucket, so that every batch holds images of one size.

``BucketSpec(pixels=256 * 256, step=64, max_ratio=2.0).sizes()`` lists (width, height) pairs, both multiples of
``step``, as near the budget as the step allows without exceeding it, with aspect ratios up to ``max_ratio``. An
image goes to the bucket whose aspect ratio is nearest its own (in log ratio). The reader batches per bucket
(``ReadPlan.buckets``); it needs each sample's bucket before reading, to give every rank the same number of batches,
so ``shard_buckets`` reads each shard's image sizes once (the ``width``/``height`` of the sample's json, as
img2dataset writes them, else the image header) and caches the result under ``$LDM_CACHE/buckets``.

No library we use does this: webdataset has no bucketing, and the bucketing samplers of kohya's sd-scripts and
diffusers' examples work on map-style datasets, not on a sharded stream with exact resume.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from ldm.errors import ConfigError


@dataclass(frozen=True)
class BucketSpec:
    """The bucket sizes: ``pixels`` the area budget (e.g. 256 * 256), ``step`` the side granularity (a multiple of
    the VAE's and UNet's downsampling), ``max_ratio`` the largest long/short side ratio."""

    pixels: int = 256 * 256
    step: int = 64
    max_ratio: float = 2.0

    def __post_init__(self) -> None:
        if self.step < 1 or self.pixels < self.step * self.step:
            raise ConfigError(f"data.buckets: pixels={self.pixels} must hold at least one step x step square "
                              f"(step={self.step})")
        if self.max_ratio < 1:
            raise ConfigError(f"data.buckets.max_ratio must be >= 1, got {self.max_ratio}")

    @classmethod
    def from_config(cls, value: Mapping[str, Any] | BucketSpec | None) -> BucketSpec | None:
        """``data.buckets`` (None: off; a mapping of the fields) as a spec; unknown keys are refused."""
        if value is None or isinstance(value, BucketSpec):
            return value
        unknown = set(value) - {"pixels", "step", "max_ratio"}
        if unknown:
            raise ConfigError(f"data.buckets: unknown keys {sorted(unknown)}; use pixels, step, max_ratio")
        return cls(**{k: value[k] for k in value})

    def sizes(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each bucket, from the tallest to the widest."""
        out = set()
        for side in range(self.step, self.pixels // self.step + 1, self.step):
            other = self.pixels // side // self.step * self.step
            if other >= self.step and max(side, other) / min(side, other) <= self.max_ratio:
                out.add((side, other))
                out.add((other, side))
        return tuple(sorted(out, key=lambda s: s[0] / s[1]))

    def assign(self, width: int, height: int) -> int:
        """The index (into ``sizes()``) of the bucket whose aspect ratio is nearest ``width / height``."""
        ratio = math.log(width / height)
        sizes = self.sizes()
        return min(range(len(sizes)), key=lambda i: (abs(math.log(sizes[i][0] / sizes[i][1]) - ratio), i))

    def square(self) -> int:
        """The bucket of a square image (where samples lost to damage are grouped)."""
        return self.assign(1, 1)


def image_size(raw: Mapping[str, Any]) -> tuple[int, int]:
    """(width, height) of a raw sample's image: from its json (``width``/``height``) when present, else from the
    image header (PIL reads the header only), as displayed: swapped when its EXIF Orientation turns it sideways."""
    from ldm.data.transforms import IMAGE_EXTS, exif_orientation

    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
            if isinstance(meta, dict) and int(meta.get("width", 0)) > 0 and int(meta.get("height", 0)) > 0:
                return int(meta["width"]), int(meta["height"])
        except (ValueError, TypeError):
            pass
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ValueError(f"sample {raw.get('__key__')} has no image member ({', '.join(IMAGE_EXTS)})")
    with Image.open(io.BytesIO(raw[ext])) as image:
        width, height = image.size
        # orientations 5-8 turn the stored pixels by 90 degrees: the reader (decode_image) sees them upright
        return (height, width) if exif_orientation(image) >= 5 else (width, height)


def shard_buckets(url: str, count: int, spec: BucketSpec) -> tuple[int, ...]:
    """The bucket of each of the ``count`` samples of shard ``url``, in tar order (a damaged one's: the square
    bucket); read once, then from the cache."""
    from ldm.data.shards import cached, iter_shard

    def read() -> list[int]:
        ids = []
        for raw in iter_shard(url, count):
            try:
                ids.append(spec.square() if "__error__" in raw else spec.assign(*image_size(raw)))
            except Exception:  # undecodable: the loader skips it at decode time; any fixed bucket keeps positions
                ids.append(spec.square())
        return ids

    key = json.dumps({"url": str(url), "count": count, "spec": asdict(spec), "stamp": _stamp(url)}, sort_keys=True)
    return tuple(cached("buckets", key, read))


def _stamp(url: str) -> list[int] | None:
    """(size, mtime) of a local shard, so a rewritten one is read again; None for remote ones."""
    from ldm.data.urls import is_local, local_path

    if not is_local(url):
        return None
    st = os.stat(local_path(url))
    return [st.st_size, int(st.st_mtime_ns)]
