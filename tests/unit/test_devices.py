"""A device named on a command line: a name torch does not know, or an accelerator this machine lacks, is a
ConfigError naming the flag before any work, and the CLIs that take --device exit 2 with one line."""

from __future__ import annotations

import pytest
import torch

from ldm.data import cache_latents
from ldm.devices import parse_device
from ldm.errors import ConfigError
from ldm.eval import fid, ref_stats


def test_known_devices_pass_and_unknown_ones_name_the_flag():
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"--device 'foo' is not a torch device.*e\.g\. cpu, cuda"):
        parse_device("foo")
    with pytest.raises(ConfigError, match=r"^vae_device 'cuda:x'"):
        parse_device("cuda:x", "vae_device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_an_accelerator_this_machine_lacks_is_refused():
    with pytest.raises(ConfigError, match="this machine has no cuda device; use --device cpu"):
        parse_device("cuda")


@pytest.mark.parametrize("main, argv", [
    (fid.main, ["gen", "ref.npz"]),
    (ref_stats.main, ["src", "--out", "ref.npz"]),
    (cache_latents.main, ["shards", "out", "--vae", "vae.ckpt", "--size", "16"]),
])
def test_the_clis_exit_2_with_one_line(main, argv, capsys):
    assert main([*argv, "--device", "foo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device 'foo' is not a torch device") and "Traceback" not in err
