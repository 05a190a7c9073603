"""The forward-noising strip and the claim docs/diffusion.md makes about it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ldm.diffusion import NoiseSchedule
from ldm.errors import ConfigError
from ldm.viz import demo_image, forward_strip, main, parse_args


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


def test_cli_refuses_unknown_keys_naming_the_closest(tmp_path, capsys):
    """``forward shedule=linear`` used to run with the default schedule, ignoring the typo."""
    with pytest.raises(SystemExit) as exit_:
        main(["forward", "shedule=cosine", f"out={tmp_path / 's.png'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key 'shedule' for forward (did you mean 'schedule'?); valid keys: image, "
                          "schedule, out, size, seed")
    assert "Traceback" not in err and not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("argv,match", [
    ([], "give a command, forward or logsnr"),
    (["forwrd"], "unknown command 'forwrd' \\(did you mean 'forward'\\?\\)"),
    (["forward", "size"], "expected key=value arguments, got 'size'"),
    (["forward", "=3"], "unknown key '' for forward"),
    (["logsnr", "size=3"], "unknown key 'size' for logsnr; valid keys: out"),
    (["forward", "schedule=cosin"], "unknown schedule 'cosin' \\(did you mean 'cosine'\\?\\)"),
    (["forward", "size=0"], r"size must be an integer in \[1, 4096\], got '0'"),
    (["forward", "size=1e2"], "size must be an integer"),
    (["forward", "size=32.0"], "size must be an integer"),
    (["forward", "size="], "size must be an integer"),
    (["forward", "seed=-1"], "seed must be an integer in"),
    (["forward", "seed=nan"], "seed must be an integer in"),
    (["forward", "size=8", "size=16"], "size is given twice"),
    (["forward", "image=/no/such/file.png"], "image=/no/such/file.png: no such file"),
    (["forward", "out=strip.xyz"], "cannot write .xyz; use one of .*png"),
    (["forward", "out=/no/such/dir/strip.png"], "the folder /no/such/dir does not exist"),
    (["logsnr", "out=plot"], "cannot write a file without a suffix"),
])
def test_parse_args_refuses_bad_input(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)


def test_parse_args_parses_and_fills_defaults(tmp_path):
    command, args = parse_args(["forward", "size=16", "seed=3", "schedule=cosine", f"out={tmp_path / 'a.png'}"])
    assert command == "forward"
    assert args == {"image": None, "schedule": "cosine", "size": 16, "seed": 3, "out": tmp_path / "a.png"}
    assert parse_args(["forward"])[1]["out"].name == "forward_linear.png"
    assert parse_args(["logsnr"])[1] == {"out": Path("logsnr.png")}


def test_an_unreadable_image_is_a_clean_error(tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(SystemExit) as exit_:
        main(["forward", f"image={bad}", f"out={tmp_path / 's.png'}", "size=8"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: image={bad} is not an image PIL can read")


def test_an_output_that_cannot_be_written_exits_2_naming_it(tmp_path, capsys):
    """A folder without write permission, or a file system that refuses the file (/proc), was a traceback."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for args in (["forward", "size=8", "out=/proc/strip.png"], ["logsnr", "out=/proc/logsnr.png"]):
            with pytest.raises(SystemExit) as exit_:
                main(args)
            assert exit_.value.code == 2 and "out=/proc/" in capsys.readouterr().err
        if os.geteuid() != 0:  # root writes anyway; its refusal is /proc's above
            with pytest.raises(ConfigError, match="cannot write there"):
                parse_args(["forward", f"out={locked / 'strip.png'}"])
    finally:
        locked.chmod(0o755)
