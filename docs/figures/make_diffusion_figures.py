"""Regenerate the figures of docs/diffusion.md: python docs/figures/make_diffusion_figures.py"""

from pathlib import Path

from PIL import Image, ImageDraw

from ldm.diffusion import NoiseSchedule
from ldm.viz import FRACTIONS, demo_image, forward_strip, plot_log_snr

HERE = Path(__file__).parent


def main() -> None:
    image = demo_image(128)
    rows = {
        "linear": NoiseSchedule.from_name("linear"),
        "cosine": NoiseSchedule.from_name("cosine"),
    }
    strips = {name: forward_strip(image, s) for name, s in rows.items()}
    label_w, head_h = 70, 18
    w, h = next(iter(strips.values())).size
    fig = Image.new("RGB", (label_w + w, head_h + h * len(strips)), "white")
    d = ImageDraw.Draw(fig)
    for i, f in enumerate(FRACTIONS):
        d.text((label_w + i * 128 + 50, 3), f"{int(f * 100)}% T", fill="black")
    for j, (name, strip) in enumerate(strips.items()):
        d.text((8, head_h + j * h + h // 2 - 6), name, fill="black")
        fig.paste(strip, (label_w, head_h + j * h))
    fig.save(HERE / "forward_linear_vs_cosine.png")
    plot_log_snr(
        {
            "linear (1e-4..0.02)": NoiseSchedule.from_name("linear"),
            "scaled_linear (SD: 0.00085..0.012)": NoiseSchedule.from_name("scaled_linear", beta_start=0.00085,
                                                                          beta_end=0.012),
            "cosine": NoiseSchedule.from_name("cosine"),
            "scaled_linear, zero terminal SNR": NoiseSchedule.from_name("scaled_linear", beta_start=0.00085,
                                                                        beta_end=0.012, rescale_betas_zero_snr=True),
        },
        HERE / "log_snr.png",
    )


if __name__ == "__main__":
    main()
