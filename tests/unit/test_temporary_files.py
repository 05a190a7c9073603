"""Files written through a temporary renamed into place get the mode a plain write would give them (0666 less the
umask), not mkstemp's 0600: a run folder's checkpoints stay readable to the group and to other accounts."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import atomic_torch_save, atomic_write_text
from ldm.convert import save_state_dict
from ldm.temporary_files import current_umask


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_renamed_files_get_the_mode_a_plain_write_gives(tmp_path: Path, umask: int) -> None:
    assert current_umask() == umask
    plain = tmp_path / "plain.ckpt"
    torch.save({"w": torch.ones(2)}, plain)
    written = [tmp_path / "atomic.ckpt", tmp_path / "config.yaml", tmp_path / "sd.safetensors", tmp_path / "sd.ckpt"]
    atomic_torch_save({"w": torch.ones(2)}, written[0])
    atomic_write_text(written[1], "a: 1\n")
    save_state_dict({"w": torch.ones(2)}, written[2], metadata={"k": "v"})
    save_state_dict({"w": torch.ones(2)}, written[3])
    assert _mode(plain) == 0o666 & ~umask
    assert {p.name: _mode(p) for p in written} == {p.name: _mode(plain) for p in written}
    assert not list(tmp_path.glob(".*.tmp"))
