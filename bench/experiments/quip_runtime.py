"""Cost of QuIP's transforms at inference: one layer's forward on a batch of tokens.

Compares a dense float32 ``nn.Linear``, a packed ``QuantLinear`` (codes dequantized per call), and
a ``QuipLinear`` with the randomized Hadamard or Kronecker transforms applied to activations —
and, for scale, the same transforms as dense ``n×n`` matrix products. Prints a table, writes JSON.

    python bench/experiments/quip_runtime.py --tokens 2048 --out bench/results/quip-runtime.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lowbit.methods.weights import round_weight
from lowbit.recipes import TransformSpec, WeightSpec
from lowbit.runtime import packed_module

SHAPES = {"q_proj 576→576": (576, 576), "gate 576→1536": (1536, 576), "down 1536→576": (576, 1536)}


def _time(fn, x, repeats: int) -> float:
    with torch.no_grad():
        fn(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("bench/results/quip-runtime.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'layer':16s}{'dense':>9s}{'packed':>9s}{'quip-had':>10s}{'quip-kron':>10s}{'dense-rot':>10s}  (ms/call)")
    for label, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f) * 0.02
        x = torch.randn(args.tokens, in_f)
        dense = torch.nn.Linear(in_f, out_f, bias=False)
        dense.weight.data = w
        spec = WeightSpec(method="rtn", bits=args.bits)
        packed = packed_module(round_weight(w, None, spec, label), None)
        quip = {k: packed_module(round_weight(w, None, spec, label, TransformSpec(incoherence=k)), None)
                for k in ("hadamard", "kron")}
        v, u = (quip["hadamard"].transform.v.matrix(torch.float32), quip["hadamard"].transform.u.matrix(torch.float32))
        row = {"layer": label, "tokens": args.tokens,
               "dense_ms": _time(dense, x, args.repeats), "packed_ms": _time(packed, x, args.repeats),
               "quip_hadamard_ms": _time(quip["hadamard"], x, args.repeats),
               "quip_kron_ms": _time(quip["kron"], x, args.repeats),
               "packed_plus_dense_rotations_ms": _time(lambda t: packed(t @ v.T) @ u, x, args.repeats)}
        rows.append(row)
        print(f"{label:16s}{row['dense_ms']:9.2f}{row['packed_ms']:9.2f}{row['quip_hadamard_ms']:10.2f}"
              f"{row['quip_kron_ms']:10.2f}{row['packed_plus_dense_rotations_ms']:10.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "threads": torch.get_num_threads(),
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
