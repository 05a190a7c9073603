"""Generate an evaluation set (e.g. COCO-30k) from a checkpoint: image i depends on its index alone, so the set splits
across torchrun ranks without communication and an interrupted job resumes where it stopped.

    python -m ldm.eval.generate CKPT --captions FILE --n N --out DIR [--seed S] [--batch-size B] [--steps K]
        [--guidance G] [--sampler NAME] [--dtype bf16] [--no-ema] [--device D]
    torchrun --nproc-per-node 8 -m ldm.eval.generate CKPT --captions FILE --num-images N --out DIR ...

FILE holds one caption per line (blank lines ignored); image i uses caption i modulo their number and the generator
``torch.Generator(device).manual_seed(seed + i)`` alone; a class-conditional model samples it with class i modulo
its number of classes (balanced classes: list the captions in class order to pair them).
DIR gets ``{i:06d}.png`` with its caption in ``{i:06d}.txt``
(the layout ``python -m ldm.eval.clip_score`` and ``python -m ldm.data.make_shards`` read) and ``generate.json``, the
settings; a rerun with other settings into the same DIR is refused. Under torchrun (RANK / WORLD_SIZE, or LOCAL_RANK
/ LOCAL_WORLD_SIZE) rank r takes the indices i with i % world_size == r; no process group is created. The number of
images is ``--num-images`` there: torchrun's own parser refuses ``--n``, an abbreviation of several of its options.
Each PNG is written to a temporary name and renamed, and a rerun skips the indices whose PNG exists. The last line is
``wrote N images (skipped M existing) to DIR`` (prefixed with ``rank r/w:`` under torchrun). Wrong input prints
``error: ...`` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ldm.checkpoint import atomic_write_bytes, atomic_write_text, load_parts
from ldm.devices import parse_device
from ldm.errors import ConfigError
from ldm.pipeline import LatentDiffusionPipeline

SETTINGS_FILE = "generate.json"
MAX_SEED = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)
_NOT_COMPARED = ("n", "captions_file")  # a rerun may ask for more images, or read the same captions from elsewhere
# arguments generate_images sets itself, per image
_OWN_ARGUMENTS = ("prompt", "generator", "num_images_per_prompt", "latents", "output_type")


def image_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """The generator of image ``index``: ``seed + index`` on ``device``, the same whatever the batch or rank."""
    return torch.Generator(device=device).manual_seed(seed + index)


def class_labels_of(pipe: LatentDiffusionPipeline, indices: Sequence[int],
                    class_labels: Sequence[int] | None = None) -> list[int] | None:
    """The classes images ``indices`` sample with: ``class_labels`` (one per index) or, by default, image i's class
    i modulo the number of classes (balanced classes); None for a UNet without classes."""
    if pipe.num_classes is None or class_labels is not None:
        return None if class_labels is None else list(class_labels)
    return [int(i) % pipe.num_classes for i in indices]


def generate_images(pipe: LatentDiffusionPipeline, captions: Sequence[str], indices: Sequence[int], *, seed: int = 0,
                    batch_size: int = 16, class_labels: Sequence[int] | None = None,
                    **call_kwargs: Any) -> list[Image.Image]:
    """Image ``indices[k]`` from caption ``captions[k]``, each with its own generator (:func:`image_generator`), in
    batches of ``batch_size``: an image depends on its index, caption and ``call_kwargs`` only, not on the batching.

    ``call_kwargs`` go to every pipeline call (``num_inference_steps``, ``guidance_scale``, ``sampler``, ...); the
    prompt, generators, latents and output type are this function's. A class-conditional model samples image
    ``indices[k]`` with class ``class_labels[k]``, by default its index modulo the number of classes
    (:func:`class_labels_of`).
    """
    own = sorted(set(call_kwargs) & set(_OWN_ARGUMENTS))
    if own:
        raise ConfigError(f"generate_images sets {', '.join(own)} itself (one generator per index, PIL output): "
                          "drop them from the call's keyword arguments")
    if len(captions) != len(indices):
        raise ConfigError(f"got {len(captions)} captions for {len(indices)} indices: give one caption per index")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if class_labels is not None and len(class_labels) != len(indices):
        raise ConfigError(f"got {len(class_labels)} class labels for {len(indices)} indices: give one per index")
    labels = class_labels_of(pipe, indices, class_labels)
    images: list[Image.Image] = []
    device = pipe.device
    for start in range(0, len(indices), batch_size):
        chunk = range(start, min(start + batch_size, len(indices)))
        generators = [image_generator(seed, int(indices[k]), device) for k in chunk]
        classes = None if labels is None else [labels[k] for k in chunk]
        out = pipe([captions[k] for k in chunk], generator=generators, output_type="pil", class_labels=classes,
                   **call_kwargs)
        images.extend(out)
    return images


def make_out_folder(out: Path, flag: str = "--out") -> None:
    """Create ``out`` (and its parents); one that cannot be made is a ConfigError naming ``flag``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag}={out}: cannot create the folder ({err.strerror}): give a folder you can write "
                          "to") from None


def check_json_out(path: str | None) -> None:
    """``--json PATH`` must be writable where it points (its folder exists, PATH is no folder): checked before the
    judge samples, so a typo costs seconds, not the figures of a long evaluation."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {path} is a folder: give a file name, e.g. {target / 'figures.json'}")
    if not target.parent.is_dir():
        raise ConfigError(f"--json {path}: the folder {target.parent} does not exist; create it or give another path")


def write_json(path: str, figures: dict) -> None:
    """The judge's figures as JSON, written atomically (an interrupted write leaves no half file)."""
    atomic_write_text(path, json.dumps(figures, indent=2))


def judge_samples(pipe: LatentDiffusionPipeline, captions: Sequence[str], *, seed: int = 0, batch_size: int = 100,
                  class_labels: Sequence[int] | None = None, **call_kwargs: Any) -> torch.Tensor:
    """The built-in judges' samples as uint8 [N, C, H, W]: batches of ``batch_size`` captions, the batch that starts
    at image i drawing from one CPU generator seeded ``seed + i`` (the protocol their recorded figures use). A
    class-conditional model samples image i with ``class_labels[i]`` (default: i modulo its classes)."""
    labels = class_labels_of(pipe, range(len(captions)), class_labels)
    out = []
    for i in range(0, len(captions), batch_size):
        x = pipe(list(captions[i:i + batch_size]), generator=torch.Generator().manual_seed(seed + i),
                 output_type="tensor", class_labels=None if labels is None else labels[i:i + batch_size],
                 **call_kwargs)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- command line


def read_captions(path: str | os.PathLike, option: str = "--captions ") -> list[str]:
    """The non-blank lines of ``path``, stripped; ``option`` names the flag or config key in the errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option}{path}: no such file; give a text file with one caption per line")
    try:
        captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise ConfigError(f"{option}{path} is not UTF-8 text ({err}); give one caption per line") from None
    if not captions:
        raise ConfigError(f"{option}{path} holds no captions (only blank lines); write one caption per line")
    return captions


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment: RANK / WORLD_SIZE, else LOCAL_RANK / LOCAL_WORLD_SIZE, else
    (0, 1)."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if os.environ.get(rank_var, "") != "":
            try:
                rank, world = int(os.environ[rank_var]), int(os.environ.get(world_var) or 1)
            except ValueError:
                raise ConfigError(f"{rank_var}={os.environ[rank_var]!r} / {world_var}={os.environ.get(world_var)!r} "
                                  "are not integers: run under torchrun or unset them") from None
            if not 0 <= rank < world:
                raise ConfigError(f"{rank_var}={rank} is outside [0, {world_var}={world}): run under torchrun or "
                                  "set both consistently")
            return rank, world
    return 0, 1


def default_device() -> torch.device:
    """This process' accelerator (index LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator()
        assert kind is not None
        return torch.device(kind.type, int(os.environ.get("LOCAL_RANK") or 0))
    return torch.device("cpu")


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _remove_stale_temporaries(out: Path, mine: set[int]) -> None:
    """Temporaries a killed run of this rank left (``.000123.png.XXXX.tmp``); other ranks' are theirs to remove."""
    with os.scandir(out) as entries:
        for entry in entries:
            name = entry.name
            stem = name[1:].split(".", 1)[0]
            if name.startswith(".") and name.endswith(".tmp") and stem.isdigit() and int(stem) in mine:
                Path(entry.path).unlink(missing_ok=True)


def _check_settings(out: Path, settings: dict[str, Any], rank: int) -> None:
    """Refuse to add images made with other settings to DIR; rank 0 records the settings on first use."""
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if not isinstance(old, dict):
            raise ConfigError(f"{path} is not the settings file generate writes: delete it or use another --out")
        differ = sorted(k for k in settings if k not in _NOT_COMPARED and old.get(k) != settings[k])
        if differ:
            raise ConfigError(f"{out} holds images generated with other settings ({', '.join(differ)} differ from "
                              f"{path}): use a new --out, or delete {SETTINGS_FILE} to mix them knowingly")
        if old.get("n", 0) >= settings["n"]:
            return
    if rank == 0:
        atomic_write_bytes(path, (json.dumps(settings, indent=2) + "\n").encode())


def _positive_int(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    return value


def run(args: argparse.Namespace) -> tuple[int, int, Path]:
    """Generate this rank's missing images; returns (written, skipped, out)."""
    from tqdm import tqdm

    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        raise ConfigError(f"checkpoint {ckpt} does not exist: pass a latent diffusion checkpoint "
                          "(RUN/ldm/checkpoints/last.ckpt) or an SD single file")
    n = _positive_int("--n (the number of images)", args.n)
    batch_size = _positive_int("--batch-size", args.batch_size)
    if not 0 <= args.seed <= MAX_SEED - n:
        raise ConfigError(f"--seed must lie in [0, 2**64 - n] (image i uses seed + i), got {args.seed}")
    captions = read_captions(args.captions)
    rank, world = rank_and_world()
    device = parse_device(args.device) if args.device else default_device()

    parts = load_parts(ckpt, use_ema=not args.no_ema)
    if not args.no_ema and not parts.ema:  # recorded as the raw weights, which is what samples
        warnings.warn(f"{ckpt} holds no EMA weights: generating with its raw weights (recorded as use_ema=false; "
                      "--no-ema says so and silences this)", stacklevel=2)
    pipe = LatentDiffusionPipeline.from_parts(parts).to(device)
    if args.compile:
        pipe.compile_unet()
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler, dtype=args.dtype)
    c = pipe.check_call(captions[0], **call)  # every setting checked before any image
    stat = ckpt.stat()
    settings = {
        "checkpoint": str(ckpt.resolve()), "checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
        "use_ema": parts.ema, "captions_file": str(Path(args.captions).resolve()),
        "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(), "num_captions": len(captions),
        "seed": args.seed, "device_type": device.type, "height": c.height, "width": c.width,
        "dtype": str(c.autocast_dtype or torch.float32), "sampling": c.sampling.to_dict(), "n": n,
    }
    out = Path(args.out)
    make_out_folder(out)
    _check_settings(out, settings, rank)

    mine = list(range(rank, n, world))
    _remove_stale_temporaries(out, set(mine))
    with os.scandir(out) as entries:
        present = {e.name for e in entries}
    todo = [i for i in mine if f"{i:06d}.png" not in present]
    for i in mine:  # the captions of images already there too (a deleted .txt comes back)
        if f"{i:06d}.png" in present:
            _write_caption(out, i, captions[i % len(captions)], present)
    progress = tqdm(total=len(todo), desc=f"generating (rank {rank}/{world})", unit="img", disable=rank != 0)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        texts = [captions[i % len(captions)] for i in chunk]
        images = generate_images(pipe, texts, chunk, seed=args.seed, batch_size=batch_size, **call)
        for i, text, image in zip(chunk, texts, images, strict=True):
            _write_caption(out, i, text, present)  # before the PNG: a PNG on disk always has its caption
            atomic_write_bytes(out / f"{i:06d}.png", _png_bytes(image), many=True)  # DIR may hold 30k files
        progress.update(len(chunk))
    progress.close()
    return len(todo), len(mine) - len(todo), out


def _write_caption(out: Path, i: int, text: str, present: set[str]) -> None:
    path = out / f"{i:06d}.txt"
    if path.name in present and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_bytes(path, text.encode("utf-8"), many=True)


def main(argv: list[str] | None = None) -> int:
    """The CLI; returns the exit status (2 with ``error: ...`` on stderr for wrong input)."""
    p = argparse.ArgumentParser(prog="python -m ldm.eval.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="latent diffusion checkpoint (or an SD single file)")
    p.add_argument("--captions", required=True, metavar="FILE",
                   help="one caption per line; image i uses line i modulo their number")
    # --num-images under torchrun, whose own parser refuses --n as an ambiguous abbreviation of its options
    p.add_argument("--n", "--num-images", dest="n", type=int, required=True,
                   help="number of images (indices 0 .. n-1); --num-images under torchrun")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the checkpoint's)")
    p.add_argument("--dtype", default=None, help="bf16 | fp16: autocast the text encoder and UNet (default fp32)")
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA weights")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (pays for many images; kernels cached under $LDM_CACHE/inductor)")
    p.add_argument("--device", default=None,
                   help="torch device (default: the accelerator numbered LOCAL_RANK if there is one, else cpu)")
    args = p.parse_args(argv)
    try:
        written, skipped, out = run(args)
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    rank, world = rank_and_world()
    prefix = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{prefix}wrote {written} images (skipped {skipped} existing) to {out}")
    return 0


if __name__ == "__main__":
    from ldm.host_memory import keep_freed_host_memory

    keep_freed_host_memory()  # the sampling steps reuse freed memory (no page faults)
    sys.exit(main())
