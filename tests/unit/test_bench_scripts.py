"""The bench scripts run as users run them (``python bench/NAME.py``), where bench/ heads ``sys.path``: no script may
take the name of an installed top-level module, which every import of that name would then load instead (diffusers
imports the ``kernels`` package, for one). Folders the repository root holds (``data/`` after the quickstart) are not
installed modules: a script does not see the root on its path."""

from __future__ import annotations

import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _installed_spec(name: str):
    """Where ``import name`` finds a module on this interpreter's path without the repository root (which pytest puts
    there, and ``python bench/NAME.py`` does not). Built-in and frozen modules come before the path, so no script can
    shadow them."""
    path = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    return importlib.machinery.PathFinder.find_spec(name, path)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_no_bench_script_shadows_an_installed_module(script):
    name = Path(script).stem
    spec = _installed_spec(name)
    origin = None if spec is None else spec.origin or str(list(spec.submodule_search_locations or []))
    assert origin is None or Path(origin).parent == BENCH, (
        f"bench/{script} shadows the installed module {name} ({origin}) when run as a script: rename it")


def test_a_diffusers_comparison_runs_as_a_script():
    """bench/pipeline.py imports diffusers' UNet and pipeline, and bench/unet.py's configs, as `python bench/...`."""
    command = ["bench/pipeline.py", "--config", "tiny", "--batch", "1", "--steps", "2", "--repeats", "1",
               "--device", "cpu", "--threads", "1"]
    out = subprocess.run([sys.executable, *command], cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert any(line.startswith("images/s") and "ratio" in line for line in out.stdout.splitlines()), out.stdout


def test_the_pipeline_comparison_refuses_arms_that_disagree():
    """At 6 DDIM steps diffusers steps t - 1000 // 6, off its own trailing grid, where ldm steps to the next
    timestep: the two arms run different samplers, and the script says so instead of printing a ratio."""
    command = ["bench/pipeline.py", "--config", "tiny", "--batch", "1", "--steps", "6", "--sampler", "ddim",
               "--repeats", "1", "--device", "cpu", "--threads", "1"]
    out = subprocess.run([sys.executable, *command], cwd=BENCH.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "latents disagree" in out.stderr, (out.stdout, out.stderr[-2000:])
    assert "ratio" not in out.stdout
