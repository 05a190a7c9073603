"""Pictures of the diffusion process: the forward-noising strip and log-SNR curves.

CLI (key=value arguments, like the Hydra entry points):
    python -m ldm.viz forward [image=PATH] [schedule=linear|cosine|scaled_linear] [out=strip.png] [size=128] [seed=0]
    python -m ldm.viz logsnr [out=logsnr.png]
A wrong argument prints ``error: ...`` and exits with status 2.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.diffusion.noise_schedule import NoiseSchedule
from ldm.diffusion.schedules import SCHEDULE_ALIASES
from ldm.errors import ConfigError

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
USAGE = """usage:
    python -m ldm.viz forward [image=PATH] [schedule=linear|cosine|scaled_linear] [out=strip.png] [size=128] [seed=0]
    python -m ldm.viz logsnr [out=logsnr.png]"""
KEYS = {"forward": ("image", "schedule", "out", "size", "seed"), "logsnr": ("out",)}
MAX_SIZE = 4096  # pixels per side of the forward strip's frames


def demo_image(size: int = 128) -> Image.Image:
    """A deterministic colourful picture (gradient sky, sun, hills, house) to show noising on without a dataset."""
    y = np.linspace(0, 1, size)[:, None]
    sky = np.stack([90 + 80 * y, 150 + 60 * y, 235 - 30 * y], axis=-1) * np.ones((1, size, 1))
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    s = size
    d.ellipse([0.68 * s, 0.08 * s, 0.88 * s, 0.28 * s], fill=(250, 210, 60))
    d.polygon([(0, 0.75 * s), (0.35 * s, 0.5 * s), (0.7 * s, 0.75 * s)], fill=(60, 140, 70))
    d.rectangle([0, 0.72 * s, s, s], fill=(70, 160, 60))
    d.rectangle([0.45 * s, 0.5 * s, 0.75 * s, 0.8 * s], fill=(200, 60, 50))
    d.polygon([(0.42 * s, 0.5 * s), (0.6 * s, 0.34 * s), (0.78 * s, 0.5 * s)], fill=(110, 60, 40))
    d.rectangle([0.56 * s, 0.62 * s, 0.64 * s, 0.8 * s], fill=(60, 40, 30))
    return img


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def to_image(x: torch.Tensor) -> Image.Image:
    """Float tensor [3, H, W] in [-1, 1] -> PIL RGB (clipped)."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def forward_strip(
    image: Image.Image, schedule: NoiseSchedule, fractions: Sequence[float] = FRACTIONS, seed: int = 0
) -> Image.Image:
    """One image noised to t = f (T - 1) for each fraction f, side by side (the same noise draw for all)."""
    x0 = to_tensor(image)[None]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    T = schedule.num_train_timesteps
    frames = [to_image(schedule.add_noise(x0, noise, round(f * (T - 1)))[0]) for f in fractions]
    w, h = frames[0].size
    strip = Image.new("RGB", (w * len(frames), h))
    for i, frame in enumerate(frames):
        strip.paste(frame, (i * w, 0))
    return strip


def plot_log_snr(schedules: dict[str, NoiseSchedule], out: str | Path) -> None:
    """Plot log-SNR against t / T for each named schedule into ``out`` (needs matplotlib, in the dev extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install -e '.[dev]' or pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in schedules.items():
        t = np.arange(s.num_train_timesteps) / (s.num_train_timesteps - 1)
        log_snr = s.log_snr().numpy()
        finite = np.isfinite(log_snr)
        ax.plot(t[finite], log_snr[finite], label=name)
    ax.set_xlabel("t / T")
    ax.set_ylabel("log SNR = log(alpha_bar / (1 - alpha_bar))")
    ax.axhline(0, color="gray", lw=0.5)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _closest(word: str, choices: Sequence[str]) -> str:
    """" (did you mean 'x'?)" for the choice closest to ``word``, or ""."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _int(key: str, value: str, lo: int, hi: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not lo <= number <= hi:
        raise ConfigError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return number


def _out(value: str, formats: Sequence[str]) -> Path:
    """An output file whose folder exists and whose suffix names a format that can be written."""
    path = Path(value)
    if not value or path.is_dir():
        raise ConfigError(f"out={value!r} must name a file to write (e.g. out=strip.png), not a folder")
    if path.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"out={value}: cannot write {path.suffix or 'a file without a suffix'}; use one of "
                          f"{', '.join('.' + f for f in formats)}")
    if not path.parent.is_dir():
        raise ConfigError(f"out={value}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"out={value}: cannot write there (no write permission): choose another out=")
    return path


def _image_formats() -> list[str]:
    """The suffixes the strip can be saved as (RGB formats this PIL writes)."""
    Image.init()
    return [ext for ext in ("bmp", "gif", "jpeg", "jpg", "png", "tif", "tiff", "webp")
            if Image.registered_extensions().get("." + ext) in Image.SAVE]


def parse_args(argv: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``[command, key=value, ...]`` -> (command, its checked values with the defaults filled in).

    An unknown command or key (with the closest valid one suggested), a repeated key, or a value that is wrong
    (a size that is not an integer, an unknown schedule, a missing image, an unwritable ``out``) is a ConfigError.
    """
    if not argv:
        raise ConfigError(f"give a command, forward or logsnr\n{USAGE}")
    command, *rest = argv
    if command not in KEYS:
        raise ConfigError(f"unknown command {command!r}{_closest(command, list(KEYS))}; expected forward or logsnr"
                          f"\n{USAGE}")
    given: dict[str, str] = {}
    for arg in rest:
        key, eq, value = arg.partition("=")
        if not eq:
            raise ConfigError(f"expected key=value arguments, got {arg!r}\n{USAGE}")
        if key not in KEYS[command]:
            raise ConfigError(f"unknown key {key!r} for {command}{_closest(key, KEYS[command])}; valid keys: "
                              f"{', '.join(KEYS[command])}")
        if key in given:
            raise ConfigError(f"{key} is given twice ({given[key]!r} and {value!r}): give it once")
        given[key] = value
    if command == "logsnr":
        return command, {"out": _out(given.get("out", "logsnr.png"), _PLOT_FORMATS)}
    schedule = given.get("schedule", "linear")
    if schedule not in SCHEDULE_ALIASES:
        raise ConfigError(f"unknown schedule {schedule!r}{_closest(schedule, list(SCHEDULE_ALIASES))}; expected "
                          f"one of {', '.join(SCHEDULE_ALIASES)}")
    image = given.get("image")
    if image is not None and not Path(image).is_file():
        raise ConfigError(f"image={image}: no such file")
    return command, {
        "image": None if image is None else Path(image),
        "schedule": schedule,
        "size": _int("size", given.get("size", "128"), 1, MAX_SIZE),
        "seed": _int("seed", given.get("seed", "0"), 0, 2**63 - 1),
        "out": _out(given.get("out", f"forward_{schedule}.png"), _image_formats()),
    }


# what matplotlib's Agg canvas writes
_PLOT_FORMATS = ("eps", "jpeg", "jpg", "pdf", "png", "ps", "svg", "svgz", "tif", "tiff", "webp")


def run(command: str, args: dict[str, Any]) -> Path:
    """Make the figure ``parse_args`` described; returns the file written."""
    if command == "forward":
        size = args["size"]
        if args["image"] is None:
            image = demo_image(size)
        else:
            try:
                with Image.open(args["image"]) as img:
                    image = img.convert("RGB")
            except OSError as err:
                raise ConfigError(f"image={args['image']} is not an image PIL can read: {err}") from None
        image = image.resize((size, size), Image.BICUBIC)
        strip = forward_strip(image, NoiseSchedule.from_name(args["schedule"]), seed=args["seed"])
    try:
        if command == "forward":
            strip.save(args["out"])
        else:
            plot_log_snr({n: NoiseSchedule.from_name(n) for n in ("linear", "scaled_linear", "cosine")}, args["out"])
    except OSError as err:  # a full disk, a file system that refuses the file
        raise ConfigError(f"out={args['out']}: cannot write it ({err})") from None
    return args["out"]


def main(argv: list[str] | None = None) -> None:
    """The CLI: ``-h`` prints the usage; a wrong argument prints ``error: ...`` and exits with status 2."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return
    try:
        out = run(*parse_args(argv))
    except ConfigError as err:  # a wrong input: its message, no traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
