"""When PyTorch's CPU int4 / int8 kernels beat the reference path, by input dtype and number of rows.

One SmolLM2-135M-shaped layer (1536 × 576: gate/up), RTN 4-bit on groups of 128 and 8-bit per channel,
one thread. For each row count and dtype: the reference path (``QuantLinear`` dequantizing its weight,
then a dense matmul) and the kernel alone (``lowbit.runtime.kernels``), median of ``--repeats`` calls
after a warm-up. These are the measurements behind the kernels' ``max_rows`` and bfloat16-only rule:

    OMP_NUM_THREADS=1 python bench/experiments/kernel_rows.py --out bench/results/kernel-rows.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lowbit.methods.weights import round_weight
from lowbit.recipes import WeightSpec
from lowbit.runtime import packed_module
from lowbit.runtime.kernels import kernel_for

ROWS = (1, 8, 32, 64, 128, 256, 512)
CASES = {"int4 g128": {"bits": 4, "group_size": 128}, "int8 per channel": {"bits": 8, "group_size": None}}


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON file; the table goes beside it as .md")
    args = p.parse_args()
    torch.set_num_threads(1)
    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    rows = []
    for case, spec in CASES.items():
        qw = round_weight(w, None, WeightSpec(method="rtn", **spec), name=case)
        layer = packed_module(qw, None)
        kernel = kernel_for(layer.quantized(), spec["group_size"])
        for dtype in (torch.bfloat16, torch.float32):
            for m in ROWS:
                x = torch.randn(m, 576).to(dtype)
                slow = dtype == torch.float32 and m >= 64  # float32 kernels take seconds here: fewer calls
                reps = 1 if slow else args.repeats
                rows.append({"case": case, "dtype": str(dtype).removeprefix("torch."), "rows": m,
                             "reference_ms": _ms(lambda: layer(x), args.repeats),
                             "kernel_ms": _ms(lambda: kernel(x), reps)})
    lines = ["| layer | dtype | rows | reference ms | kernel ms | kernel / reference |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['dtype']} | {r['rows']} | {r['reference_ms']:.2f} | {r['kernel_ms']:.2f} | "
              f"{r['kernel_ms'] / r['reference_ms']:.2f} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        meta = {"machine": platform.machine(), "threads": 1, "shape": [1536, 576], "repeats": args.repeats}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
