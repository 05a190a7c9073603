"""The quickstart's training steps on the CPU with and without ``keep_freed_host_memory`` (glibc's thresholds).

The setting is per process, so each measurement is a fresh process; the two kinds alternate, ``--pairs`` times, in
one run of this script. Each process times ``--steps`` steps after three warm-up steps and reports the median step
time, minor page faults and system CPU time per step. Printed: the medians over processes and the time ratio
default/kept (> 1: keeping freed memory is faster).

    python bench/host_memory.py --pairs 3 --steps 15 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from quickstart_steps import ROOT, STEPS


def measure(kind: str, keep: bool, steps: int, threads: int) -> dict:
    """In this process: set the thresholds (or not), build the step, time it."""
    if keep:
        from ldm.host_memory import keep_freed_host_memory

        assert keep_freed_host_memory(), "glibc's mallopt refused the thresholds"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step = STEPS[kind]()
    for _ in range(3):
        step()
    times, faults, system = [], [], []
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        times.append(time.perf_counter() - start)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(after.ru_stime - before.ru_stime)
    med = statistics.median
    return {"ms": med(times) * 1e3, "faults": med(faults), "sys_ms": med(system) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=sorted(STEPS), default=["ldm", "vae"])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, keep = args.child
        print(json.dumps(measure(kind, keep == "1", args.steps, args.threads)))
        return
    for kind in args.kinds:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for pair in range(args.pairs):
            for keep in ((False, True) if pair % 2 == 0 else (True, False)):
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(int(keep)), "--steps",
                                      str(args.steps), "--threads", str(args.threads)], capture_output=True,
                                     text=True, check=True, cwd=ROOT)
                runs[keep].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {keep: {k: statistics.median(r[k] for r in rs) for k in ("ms", "faults", "sys_ms")}
               for keep, rs in runs.items()}
        ratios = [d["ms"] / k["ms"] for d, k in zip(runs[False], runs[True], strict=True)]
        for keep, label in ((False, "default"), (True, "kept   ")):
            m = med[keep]
            print(f"{kind} step, {label}: {m['ms']:7.1f} ms, {m['faults']:7.0f} minor faults, "
                  f"{m['sys_ms']:5.1f} ms system time per step")
        print(f"{kind} step: ratio default/kept {med[False]['ms'] / med[True]['ms']:.3f} "
              f"(per pair {min(ratios):.2f}..{max(ratios):.2f}, {args.pairs} pairs of processes, "
              f"{args.steps} steps each, {args.threads} threads)")


if __name__ == "__main__":
    main()
