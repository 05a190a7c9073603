"""keep_freed_host_memory: after it, freeing and allocating the same large tensors takes no page faults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import json, resource, sys, torch
from ldm.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "1" else None

def step():  # as a training step's activations: many blocks alive at once, then all freed
    held = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(20)]
    del held

for _ in range(4):  # warm-up: the heap grows to its size over the first steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(keep: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN, "1" if keep else "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = _faults(False), _faults(True)
    # glibc's default raises its mmap threshold once a 1 MiB block is freed, then trims the 20 MiB freed at the top
    # of its heap (past twice the threshold): every step faults its 5,120 pages in again, zeroed
    assert default["faults"] > 10 * 4000, default
    assert kept["applied"] is True and kept["faults"] < 50, kept
