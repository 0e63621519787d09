"""Time a packed checkpoint's per-call dequantization, layer by layer (one thread).

A packed layer unpacks and dequantizes its whole matrix on every forward, so this is paid once
per layer per call on the CPU path. Prints a table and writes JSON; the sum of each dequantized
matrix (float64) is printed too, so two commits can be checked to give the same weights:

    OMP_NUM_THREADS=1 python bench/experiments/dequant_speed.py runs/quip-w3 --out bench/results/dequant-speed.json
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/older/worktree python bench/experiments/dequant_speed.py runs/quip-w3 \\
        --out old.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    import lowbit
    from lowbit.models import find_blocks
    from lowbit.runtime import QuantLinear

    model, _ = lowbit.load_model(args.checkpoint)
    _, blocks = find_blocks(model)
    rows = []
    print(f"{'layer':24s}{'shape':>12s}{'bits':>5s}{'ms/call':>9s}{'sum':>16s}")
    with torch.no_grad():
        for name, layer in blocks[args.block].named_modules():
            if not isinstance(layer, QuantLinear):  # a QuIP layer's packed codes are its ``inner``
                continue
            w = layer.quantized().dequantize()
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                layer.quantized().dequantize()
            ms = (time.perf_counter() - t0) / args.repeats * 1e3
            row = {"layer": name, "shape": list(w.shape), "bits": layer.bits, "ms": ms, "sum": float(w.double().sum())}
            rows.append(row)
            print(f"{name:24s}{str(tuple(w.shape)):>12s}{layer.bits:5d}{ms:9.2f}{row['sum']:16.6f}")
    if args.out:
        args.out.write_text(json.dumps({"checkpoint": args.checkpoint, "block": args.block, "lowbit": lowbit.__file__,
                                        "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
