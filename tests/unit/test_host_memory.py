"""keep_freed_host_memory: after it, glibc keeps the blocks a step frees and the next step reuses them, instead of
handing them back to the OS and faulting them in again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import ctypes, json, mmap, resource, sys, torch
from ldm.host_memory import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "1" else None

class MallInfo2(ctypes.Structure):  # glibc's accounting of its own heap: independent of the kernel's counters
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
heap = lambda: libc.mallinfo2().arena  # bytes glibc's main heap holds from the OS
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = (ctypes.c_void_p * 20)()

def raw_step():  # 20 blocks of 1 MiB off the top of the heap, written, then freed: nothing is left above them
    for i in range(20):
        blocks[i] = libc.malloc(1 << 20)
        ctypes.memset(blocks[i], 1, 1 << 20)
    during = heap()
    for i in range(20):
        libc.free(blocks[i])
    return during, heap()

def torch_step():  # as a training step's activations: many blocks alive at once, then all freed
    held = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(20)]
    during = heap()
    del held
    return during, heap()

result = {"applied": applied}
for name, step in (("raw", raw_step), ("torch", torch_step)):
    for _ in range(4):  # warm-up: the heap grows to its size over the first steps
        step()
    before, sizes = faults(), [step() for _ in range(10)]
    result[name] = {"faults": faults() - before, "returned": max(during - after for during, after in sizes),
                    "held": min(during for during, _ in sizes)}
probe = mmap.mmap(-1, 8 << 20)  # does this kernel count minor faults? (some sandboxes report none)
before = faults()
for offset in range(0, 8 << 20, 4096):
    probe[offset] = 1
result["faults_counted"] = faults() > before
print(json.dumps(result))
"""


def _run(keep: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN, "1" if keep else "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, kept = _run(False), _run(True)
    if default["raw"]["held"] < 20 << 20:  # the blocks did not come from glibc's heap: an allocator is preloaded
        pytest.skip(f"malloc here is not glibc's: its heap holds {default['raw']['held']} bytes during a step")
    # glibc's default raises its mmap threshold once a 1 MiB block is freed, then trims the 20 MiB freed at the top
    # of its heap (past twice the threshold): every step hands its memory back and faults it in again, zeroed
    assert default["raw"]["returned"] >= 16 << 20, default
    assert kept["applied"] is True, kept
    # kept: nothing is handed back, whether the freed blocks sit at the top of the heap (raw) or wherever torch's
    # allocations leave them
    assert kept["raw"]["returned"] == 0 and kept["torch"]["returned"] == 0, kept
    if default["faults_counted"]:  # 5,120 pages a step by default (or a few huge pages where the kernel gives them)
        raw_default, raw_kept = default["raw"]["faults"], kept["raw"]["faults"]
        assert raw_default >= 10 and raw_kept * 10 <= raw_default, (default, kept)
        assert kept["torch"]["faults"] < 50, kept
