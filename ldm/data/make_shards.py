"""Write webdataset-compatible shards from an image folder or a built-in dataset.

    python -m ldm.data.make_shards SRC OUT [--maxcount N] [--size S] [--format png|jpg] [--length N] [--seed N]

SRC is a folder of images or ``shapes`` / ``mnist``. Folder captions come from a ``.txt`` beside each image (same
stem) or from one ``captions.json`` / ``captions.jsonl`` / ``captions.csv`` in SRC (file name -> caption).
OUT gets ``000000.tar, 000001.tar, ...`` (members ``{key}.png|jpg``, ``{key}.txt``, ``{key}.json``) and
``index.json``. Source item ``i`` always goes to shard ``i // maxcount`` (skipped items leave that shard smaller),
so each shard is a fixed function of the source: shards are written to a temporary name and renamed when complete,
and a rerun skips complete shards and writes only the missing ones. Wrong input (a zero or negative count, a missing
SRC, a source where every item is skipped) prints ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.checkpoint import atomic_write_bytes
from ldm.data.shards import ShardWriter, clean_temporaries, count_samples, write_index
from ldm.data.transforms import decode_image, eight_bit, exif_orientation
from ldm.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILES = ("captions.json", "captions.jsonl", "captions.csv")
STATS_DIR = "_stats"
RUN_NAME = "run.json"  # in STATS_DIR: the arguments of the run that wrote the shards
# what a built-in dataset's length and size are when not given (None)
BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {"shapes": {"length": 10_000, "size": 32}}


class SkipSample(Exception):
    """A source item that cannot become a sample; the message is the reason counted in the report."""


@dataclass
class Item:
    """One source item, loaded lazily so that skipped shards cost nothing."""

    load: Callable[[], tuple[Image.Image | bytes, str, dict[str, Any]]]  # -> (image or encoded bytes, caption, meta)


@dataclass
class Report:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards_written: int = 0
    shards_reused: int = 0

    def text(self) -> str:
        lines = [
            f"samples written: {self.written}; shards written: {self.shards_written}, "
            f"already complete: {self.shards_reused}; skipped: {sum(self.skipped.values())}"
        ]
        lines += [f"  skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sources


def _read_caption_table(src: Path) -> dict[str, str] | None:
    """Captions from captions.json (dict or list of records), .jsonl (records) or .csv (file,caption), read as
    UTF-8 with or without a byte order mark (Notepad, Excel's "CSV UTF-8" and PowerShell write one). A file that does
    not parse is a ConfigError naming it."""
    for name in CAPTION_FILES:
        path = src / name
        if not path.exists():
            continue
        try:
            return _parse_caption_table(path)
        except (ValueError, TypeError, AttributeError, IndexError, csv.Error) as err:  # UnicodeDecodeError too
            raise ConfigError(f"{path} is not a valid caption file ({type(err).__name__}: {err}). Fix: write it as "
                              "UTF-8: captions.json a mapping {file: caption} or a list of {file, caption} records, "
                              "captions.jsonl one such record per line, captions.csv rows of file,caption") from None
    return None


def _parse_caption_table(path: Path) -> dict[str, str]:
    """{file: caption} of one caption file (its kind by name)."""
    table: dict[str, str] = {}
    if path.name.endswith(".json"):
        data = json.loads(path.read_text(encoding="utf-8-sig"))
        if not isinstance(data, dict | list):
            raise ValueError(f"a mapping or a list of records, not {type(data).__name__}")
        records = data.items() if isinstance(data, dict) else ((_file_of(r), _caption_of(r)) for r in data)
        table.update({str(k): str(v) for k, v in records})
    elif path.name.endswith(".jsonl"):
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                r = json.loads(line)
                table[_file_of(r)] = _caption_of(r)
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if rows and [c.strip().lower() for c in rows[0][:2]] in (["file", "caption"], ["file_name", "text"],
                                                                  ["image", "caption"], ["file_name", "caption"]):
            rows = rows[1:]
        table.update({r[0]: r[1] for r in rows if len(r) >= 2})
    return table


def _file_of(record: dict[str, Any]) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"a caption record must be an object with file and caption fields, got {record!r}")
    for k in ("file", "file_name", "image", "path", "filename"):
        if k in record:
            return str(record[k])
    raise ValueError(f"caption record without a file field: {record}")


def _caption_of(record: dict[str, Any]) -> str:
    for k in ("caption", "text", "prompt"):
        if k in record:
            return str(record[k])
    raise ValueError(f"caption record without a caption field: {record}")


def folder_items(src: Path) -> list[Item]:
    """Images under ``src`` (recursive, sorted by relative path) with their captions."""
    table = _read_caption_table(src)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    def make(path: Path) -> Item:
        rel = path.relative_to(src).as_posix()

        def load() -> tuple[Image.Image | bytes, str, dict[str, Any]]:
            if table is not None:
                caption = table.get(rel, table.get(path.name))
            else:
                txt = path.with_suffix(".txt")
                try:
                    caption = txt.read_text(encoding="utf-8-sig").strip() if txt.exists() else None
                except UnicodeDecodeError as err:  # skipped and counted, as an unreadable image is
                    raise SkipSample("caption not UTF-8") from err
            if caption is None or not caption.strip():
                raise SkipSample("missing caption")
            try:
                data = path.read_bytes()
                decode_image(data)
            except Exception as err:
                raise SkipSample(f"unreadable image ({type(err).__name__})") from err
            return data, caption.strip(), {"source": rel}

        return Item(load)

    return [make(p) for p in files]


# the order a built-in dataset's items are written in, where it is not the dataset's (recorded with the run, so shards
# written in an earlier order are refused rather than reused)
ITEM_ORDER = {"mnist": "classes in turn"}


def builtin_items(name: str, length: int | None, size: int | None, seed: int,
                  colors: Sequence[str] | None = None) -> list[Item]:
    """The items of a built-in dataset (``length`` None: its default; ``size`` None: 32 for shapes; ``colors``:
    the shapes' palette, None for the default seven)."""
    if colors is not None and name != "shapes":
        raise ConfigError(f"colors= applies to the shapes dataset only, not {name!r}")
    if name == "shapes":
        from ldm.data.builtin.shapes import ShapesDataset

        try:
            default = BUILTIN_DEFAULTS["shapes"]
            ds = ShapesDataset(size=default["size"] if size is None else size, seed=seed,
                               length=default["length"] if length is None else length, colors=colors)
        except ValueError as err:
            raise ConfigError(str(err)) from None

        def shape_item(i: int) -> Item:
            def load() -> tuple[Image.Image | bytes, str, dict[str, Any]]:
                it = ds[i]
                meta = {k: it[k] for k in ("color", "shape", "position", "center", "extent")}
                return it["image"], it["caption"], {**meta, "index": i, "seed": seed}

            return Item(load)

        return [shape_item(i) for i in range(len(ds))]
    if name == "mnist":
        from ldm.data.builtin.mnist import MNISTDataset, interleaved_order

        mn = MNISTDataset()
        n = len(mn) if length is None else min(length, len(mn))

        def digit_item(i: int) -> Item:
            def load() -> tuple[Image.Image | bytes, str, dict[str, Any]]:
                it = mn[i]
                return it["image"], it["caption"], {"label": it["label"], "index": i}

            return Item(load)

        # the classes in turn: balanced shards and subsets (the digits ship sorted by class); index: the dataset's
        return [digit_item(int(i)) for i in interleaved_order(mn.labels)[:n]]
    raise ConfigError(f"unknown builtin {name!r}: use one of shapes, mnist, or an image folder")


# ---------------------------------------------------------------------------------------------- encoding


def _encode(image: Image.Image | bytes, fmt: str | None, size: int | None) -> tuple[bytes, str]:
    """Encoded bytes and extension. Source bytes that already are PNG/JPEG are kept when no resize or other
    format is asked for and they are stored upright (EXIF Orientation 1 or none); everything else is decoded (turned
    upright, as the reader would) and re-encoded (PNG lossless, JPEG quality 95)."""
    if isinstance(image, bytes):
        if size is None:
            kind = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg"}
            ext = next((v for k, v in kind.items() if image.startswith(k)), None)
            if ext is not None and (fmt is None or fmt == ext) and _stored_upright(image):
                return image, ext
        image = decode_image(image)
    if size is not None and min(image.size) != size:
        image = _resizable(image)
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))),
                             Image.Resampling.LANCZOS)
    fmt = fmt or "png"
    buf = io.BytesIO()
    if fmt == "jpg":
        image = eight_bit(image)  # PIL's convert would clip 16-bit greys at 255 (almost white)
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(buf, "JPEG", quality=95)
    else:
        if image.mode not in ("L", "RGB", "RGBA", "LA", "I;16"):
            image = eight_bit(image)
            if image.mode not in ("L", "RGB", "RGBA", "LA"):
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
        image.save(buf, "PNG")
    return buf.getvalue(), fmt


def _stored_upright(data: bytes) -> bool:
    """Whether encoded image bytes need no EXIF rotation (raw bytes of a rotated photo would keep the tag, which
    another reader might ignore)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return exif_orientation(image) == 1
    except Exception:
        return False


def _resizable(image: Image.Image) -> Image.Image:
    """The image in a mode that PIL resizes by filtering: it resizes palette and 1-bit images by nearest neighbour
    whatever filter is asked for (a fine pattern aliases, a checkerboard turns black)."""
    if image.mode == "1":
        return image.convert("L")
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
    return image


# ---------------------------------------------------------------------------------------------- writer


def make_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    maxcount: int = 1000,
    size: int | None = None,
    fmt: str | None = None,
    length: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    colors: Sequence[str] | None = None,
) -> Report:
    """Write (or complete) the shards of ``src`` into ``out``; returns the counts, with skip reasons.

    Raises ConfigError for wrong input (zero or negative ``maxcount``/``length``/``size``, a missing source) and
    when every source item was skipped (the message gives the reasons); then no index.json is written.
    """
    from ldm.data.builtin import BUILTINS

    _check_positive(maxcount=maxcount, length=length, size=size)
    if fmt not in (None, "png", "jpg"):
        raise ConfigError(f"--format must be png or jpg, got {fmt!r}")
    name = str(src)
    resize = size  # shorter side to resize to when encoding (None: keep)
    if name in BUILTINS and not Path(name).is_dir():
        items = builtin_items(name, length, size, seed, colors)
        if name == "shapes":
            resize = None  # shapes draws at the requested size; mnist's 28 px digits are resized
        fmt = fmt or "png"
    else:
        if not Path(src).is_dir():
            raise ConfigError(f"SRC={src} is neither a folder nor a builtin ({', '.join(BUILTINS)})")
        items = folder_items(Path(src))
    if not items:
        raise ConfigError(f"no images found in {src} (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
    out = Path(out)
    try:
        (out / STATS_DIR).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as err:
        raise ConfigError(f"OUT={out}: cannot make the shard folder there ({err.strerror}: {err.filename}); give a "
                          "new or existing folder, not a file") from None
    clean_temporaries(out)
    clean_temporaries(out / STATS_DIR)

    run = {"source": name, "items": len(items), "maxcount": maxcount, "size": size, "format": fmt, "seed": seed,
           "length": length, "colors": list(colors) if colors is not None else None, "order": ITEM_ORDER.get(name)}
    run_path = out / STATS_DIR / RUN_NAME
    if run_path.exists():
        # records from before colors and order were: the defaults (MNIST's order then: sorted by class)
        previous = {"colors": None, "order": None, **json.loads(run_path.read_text())}
        if previous != run:
            said = ", ".join(f"{k} {previous.get(k)!r} -> {v!r}" for k, v in run.items() if previous.get(k) != v)
            raise ConfigError(f"{out} holds shards of a different run ({said}); use a new OUT folder, or delete "
                              "this one to write it again")
    else:
        foreign = sorted(out.glob("*.tar"))
        if foreign:  # shards no run recorded (copied in, another tool's): they would be "reused" as this run's
            raise ConfigError(f"{out} holds shards ({foreign[0].name}, ...) that no make_shards run recorded (no "
                              f"{STATS_DIR}/{RUN_NAME}): use a new OUT folder, or delete them to write it again")
        atomic_write_bytes(run_path, json.dumps(run).encode())

    report = Report()
    shards: list[dict[str, Any]] = []
    num_shards = -(-len(items) // maxcount)
    for s in range(num_shards):
        shard_name = f"{s:06d}.tar"
        stats_path = out / STATS_DIR / f"{s:06d}.json"
        if (out / shard_name).exists():
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {
                "count": count_samples(out / shard_name), "skipped": {}}
            report.shards_reused += 1
        else:
            skipped: Counter = Counter()
            with ShardWriter(out / shard_name) as writer:
                for i in range(s * maxcount, min(len(items), (s + 1) * maxcount)):
                    try:
                        image, caption, meta = items[i].load()
                        data, ext = _encode(image, fmt, resize)
                    except SkipSample as err:
                        skipped[str(err)] += 1
                        continue
                    meta = {**meta, "caption": caption}
                    writer.write(f"{i:08d}", {ext: data, "txt": caption.encode(), "json": json.dumps(meta).encode()})
                stats = {"count": writer.count, "skipped": dict(skipped)}
                atomic_write_bytes(stats_path, json.dumps(stats).encode())  # before the tar rename (in __exit__)
            report.shards_written += 1
        report.written += stats["count"]
        report.skipped.update(stats["skipped"])
        shards.append({"name": shard_name, "count": stats["count"]})
        if log:
            log(f"{shard_name}: {stats['count']} samples")
    shards = [s for s in shards if s["count"] > 0]
    if not shards:  # an index of nothing would only fail later, in the reader; the empty shards would stick
        for s in range(num_shards):
            (out / f"{s:06d}.tar").unlink(missing_ok=True)
            (out / STATS_DIR / f"{s:06d}.json").unlink(missing_ok=True)
        run_path.unlink(missing_ok=True)
        reasons = "; ".join(f"{reason}: {n}" for reason, n in sorted(report.skipped.items()))
        raise ConfigError(f"no samples written to {out}: all {len(items)} items of {name} were skipped ({reasons}). "
                          "Fix the source (images must decode; folder images need a caption: a .txt beside each "
                          "image or a captions.json/.jsonl/.csv in SRC) and rerun")
    write_index(out, shards, source=name, skipped=dict(report.skipped))
    if log:
        log(report.text())
    return report


def _check_positive(**values: int | None) -> None:
    """ConfigError naming the flag when a count or size is zero or negative (None means the default)."""
    for flag, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{flag} must be a positive integer, got {value!r}")


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with ``error: ...`` on stderr for wrong input)."""
    p = argparse.ArgumentParser(prog="python -m ldm.data.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image folder, or a builtin: shapes, mnist")
    p.add_argument("out", help="output folder for the shards and index.json")
    p.add_argument("--maxcount", type=int, default=1000, help="source items per shard (default 1000)")
    p.add_argument("--size", type=int, default=None, help="shapes: image size; mnist, folder: resize shorter side to S")
    p.add_argument("--format", choices=("png", "jpg"), default=None, help="image encoding (default: keep / png)")
    p.add_argument("--length", type=int, default=None, help="builtin: number of items")
    p.add_argument("--seed", type=int, default=0, help="builtin shapes: dataset seed")
    p.add_argument("--colors", nargs="+", default=None,
                   help="builtin shapes: the colours to draw (default: the seven; extra ones: cyan)")
    a = p.parse_args(argv)
    try:
        make_shards(a.src, a.out, maxcount=a.maxcount, size=a.size, fmt=a.format, length=a.length, seed=a.seed,
                    colors=a.colors)
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
