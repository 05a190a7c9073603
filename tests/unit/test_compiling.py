"""compile_in_place: torch.compile whose kernels are cached under $LDM_CACHE/inductor, so a rerun does not compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from ldm.compiling import compile_in_place

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import json, torch
from torch import nn
from torch._dynamo.utils import counters
from ldm.compiling import compile_in_place
torch.set_num_threads(1)
m = compile_in_place(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 3, 1)))
x = torch.randn(2, 3, 8, 8, requires_grad=True)
m(x).square().mean().backward()
print(json.dumps({k: dict(counters[k]) for k in ("inductor", "aot_autograd")}))
"""


def _compile_in_a_new_process(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(LDM_CACHE=str(cache), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_reuses_the_compiled_graphs_from_ldm_cache(tmp_path):
    first = _compile_in_a_new_process(tmp_path)
    assert first["inductor"].get("fxgraph_cache_miss", 0) > 0 and not first["inductor"].get("fxgraph_cache_hit")
    assert (tmp_path / "inductor" / "fxgraph").is_dir()
    second = _compile_in_a_new_process(tmp_path)
    assert second["inductor"].get("fxgraph_cache_hit", 0) == first["inductor"]["fxgraph_cache_miss"]
    assert not second["inductor"].get("fxgraph_cache_miss")
    assert second["aot_autograd"].get("autograd_cache_hit", 0) > 0  # the backward graph too


def test_a_cache_dir_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "ldm"))
    module = compile_in_place(nn.Linear(2, 2))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert isinstance(module, nn.Linear) and "weight" in module.state_dict()  # in place: the names stay
    assert module._compiled_call_impl is not None and torch.is_tensor(module.weight)


def test_torchs_own_default_folder_is_replaced_and_an_unset_variable_set(tmp_path, monkeypatch):
    """torch writes its default (a temporary folder) into TORCHINDUCTOR_CACHE_DIR once it has looked it up: that
    value is not a user's choice, so it is replaced by $LDM_CACHE/inductor, as an unset variable is."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ldm.compiling import keep_compiled_kernels

    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "ldm"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    keep_compiled_kernels()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ldm" / "inductor")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    keep_compiled_kernels()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ldm" / "inductor")


def test_an_empty_ldm_cache_is_the_default_not_the_current_folder(monkeypatch):
    from ldm.local_cache import cache_dir

    monkeypatch.setenv("LDM_CACHE", "")
    assert cache_dir("inductor") == Path("~/.cache/ldm").expanduser() / "inductor"
