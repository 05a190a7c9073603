"""Pictures of the diffusion process: the forward-noising strip and log-SNR curves.

CLI (key=value arguments, like the Hydra entry points):
    python -m ldm.viz forward image=PATH schedule=linear|cosine|scaled_linear out=strip.png [size=128] [seed=0]
    python -m ldm.viz logsnr out=logsnr.png
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.diffusion.noise_schedule import NoiseSchedule

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


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


def _parse(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"expected key=value arguments, got {arg!r}\n{__doc__}")
        k, v = arg.split("=", 1)
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("forward", "logsnr"):
        raise SystemExit(__doc__)
    args = _parse(argv[1:])
    if argv[0] == "forward":
        size = int(args.get("size", 128))
        image = Image.open(args["image"]).convert("RGB") if "image" in args else demo_image(size)
        image = image.resize((size, size), Image.BICUBIC)
        schedule = NoiseSchedule.from_name(args.get("schedule", "linear"))
        out = args.get("out", f"forward_{args.get('schedule', 'linear')}.png")
        forward_strip(image, schedule, seed=int(args.get("seed", 0))).save(out)
    else:
        out = args.get("out", "logsnr.png")
        plot_log_snr({n: NoiseSchedule.from_name(n) for n in ("linear", "scaled_linear", "cosine")}, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
