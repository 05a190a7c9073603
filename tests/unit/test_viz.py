"""The forward-noising strip and the claim docs/diffusion.md makes about it."""

from __future__ import annotations

import numpy as np

from ldm.diffusion import NoiseSchedule
from ldm.viz import demo_image, forward_strip, main


def _frames(strip, n=5):
    arr = np.asarray(strip, dtype=np.float64)
    w = arr.shape[1] // n
    return [arr[:, i * w:(i + 1) * w] for i in range(n)]


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_forward_strip_starts_clean_and_cosine_keeps_the_image_longer():
    image = demo_image(64)
    lin = _frames(forward_strip(image, NoiseSchedule.from_name("linear")))
    cos = _frames(forward_strip(image, NoiseSchedule.from_name("cosine")))
    clean = np.asarray(image, dtype=np.float64)
    assert np.abs(lin[0] - clean).mean() < 2  # t=0 keeps the image (noise std sqrt(beta_0) = 0.01)
    corr_lin = [_corr(f, clean) for f in lin]
    corr_cos = [_corr(f, clean) for f in cos]
    assert corr_lin[2] < 0.35 < corr_cos[2]  # by 50% of T linear has destroyed the image; cosine has not
    assert all(c < 0.1 for c in (corr_lin[4], corr_cos[4]))
    assert corr_lin == sorted(corr_lin, reverse=True)


def test_cli_writes_strip_and_plot(tmp_path):
    main(["forward", "schedule=cosine", f"out={tmp_path / 's.png'}", "size=32"])
    main(["logsnr", f"out={tmp_path / 'l.png'}"])
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "l.png").stat().st_size > 0
