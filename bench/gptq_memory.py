"""Peak memory of GPTQ on one layer, in n×n float64 Hessian copies beyond the caller's Hessian.

At a 7B model's widths one copy is large (4096 inputs: 134 MB; the down projection's 11008: 0.97 GB), so
the copies GPTQ holds at once set the quantizer's peak. Each case runs in its own process; the peak is the
kernel's high-water mark of resident memory (``VmHWM``, reset just before the call), minus what was resident
before it. ``--lowbit DIR`` measures another checkout (e.g. a worktree of an older commit) the same way.

    OMP_NUM_THREADS=1 python bench/gptq_memory.py --widths 4096,11008 --out bench/results/gptq-memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASE = """
import hashlib, json, sys, time
import psutil, torch
torch.set_num_threads(1)
from lowbit.grids import UniformGrid
from lowbit.rounding import gptq_quantize
n, rows, act = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
g = torch.Generator().manual_seed(0)
h = torch.zeros(n, n, dtype=torch.float64)
for _ in range(4):  # a full-rank Hessian from 4n samples, a quarter at a time
    x = torch.randn(n, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2, n, dtype=torch.float64)
    h.addmm_(x.T, x, alpha=1 / (4 * n))
    del x
w = torch.randn(rows, n, generator=g)
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
before = psutil.Process().memory_info().rss
t = time.perf_counter()
qw = gptq_quantize(w, h, UniformGrid(4, group_size=128), act_order=act)
seconds = time.perf_counter() - t
peak = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
digest = hashlib.sha256(qw.codes.numpy().tobytes() + qw.scale.numpy().tobytes()).hexdigest()[:16]
print(json.dumps({"width": n, "rows": rows, "act_order": act, "extra_mb": (peak - before) / 2**20,
                  "copies": (peak - before) / (n * n * 8), "seconds": seconds, "codes": digest}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="4096", help="input widths, comma separated")
    p.add_argument("--rows", type=int, default=256, help="output rows (the peak is the Hessian's; rows add little)")
    p.add_argument("--lowbit", default=None, help="a checkout to measure instead of the installed lowbit")
    p.add_argument("--label", default="this checkout")
    p.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md (appends to OUT.json)")
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.lowbit:
        env["PYTHONPATH"] = args.lowbit
    rows = []
    for n in map(int, args.widths.split(",")):
        for act in (False, True):
            # cwd: ``python -c`` puts the working folder first on sys.path, before PYTHONPATH
            r = subprocess.run([sys.executable, "-c", CASE, str(n), str(args.rows), str(int(act))], env=env,
                               cwd=args.lowbit, capture_output=True, text=True, check=True)
            rows.append({**json.loads(r.stdout.strip().splitlines()[-1]), "lowbit": args.label})
            print(rows[-1], flush=True)
    if args.out:
        old = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else []
        rows = [r for r in old if r["lowbit"] != args.label] + rows
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        lines = ["| lowbit | width | act-order | extra peak MB | float64 n×n copies | seconds | codes |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['lowbit']} | {r['width']} | {r['act_order']} | {r['extra_mb']:.0f} | {r['copies']:.2f} | "
                  f"{r['seconds']:.1f} | {r['codes']} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
