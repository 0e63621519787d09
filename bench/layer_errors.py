"""Why GPTQ closes only part of RTN's gap: per-layer output error on held-out calibration tokens.

For one block of the full-precision model, collects Hessians from ``--fit`` calibration samples
and measures ``tr(ΔW·H·ΔWᵀ)`` on ``--heldout`` other samples, for RTN and GPTQ with and without
clipping search and act-order, as a ratio to RTN (lower is better). Prints a table, writes JSON.

    python bench/layer_errors.py --block 3 --bits 4 --out bench/results/layer-errors-b3-w4.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lowbit
from lowbit.grids import UniformGrid
from lowbit.hessians import HessianAccumulator
from lowbit.models import block_linears, find_blocks
from lowbit.pipeline.capture import capture_block_inputs, run_block
from lowbit.rounding import gptq_quantize, proxy_loss, rtn_quantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--fit", type=int, default=16)
    p.add_argument("--heldout", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("bench/results/layer-errors.json"))
    args = p.parse_args()

    model, tok = lowbit.load_model(args.model)
    calib = lowbit.data.calibration("c4", tok, n=args.fit + args.heldout, seqlen=args.seqlen, seed=0)
    _, blocks = find_blocks(model)
    inputs, kwargs = capture_block_inputs(model, blocks, calib)
    for b in range(args.block):
        inputs = run_block(blocks[b], inputs, kwargs[b])
    block = blocks[args.block]
    layers = block_linears(block)
    fit = {n: HessianAccumulator(m.in_features) for n, m in layers.items()}
    held = {n: HessianAccumulator(m.in_features) for n, m in layers.items()}
    target: dict = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: target[n].add(a[0])) for n, m in layers.items()]
    with torch.no_grad():
        for i in range(inputs.shape[0]):
            target.update(fit if i < args.fit else held)
            block(inputs[i : i + 1], **kwargs[args.block])
    for h in hooks:
        h.remove()

    variants = {
        "gptq": dict(clip=False, act_order=False),
        "gptq+act_order": dict(clip=False, act_order=True),
        "gptq+act_order+clip": dict(clip=True, act_order=True),
        "rtn+clip": dict(clip=True, act_order=None),
    }
    rows = []
    print(f"{'layer':18s}{'rtn rel.err':>12s}" + "".join(f"{v:>22s}" for v in variants))
    for n, m in layers.items():
        w, h, ht = m.weight.data, fit[n].hessian(), held[n].hessian()
        rtn = proxy_loss(rtn_quantize(w, UniformGrid(args.bits, group_size=args.group_size)).dequantize() - w, ht)
        row = {"layer": n, "rtn_rel_output_error": rtn / proxy_loss(w, ht)}
        for name, v in variants.items():
            grid = UniformGrid(args.bits, group_size=args.group_size, clip_search=v["clip"])
            q = rtn_quantize(w, grid) if v["act_order"] is None else gptq_quantize(w, h, grid, act_order=v["act_order"])
            row[name] = proxy_loss(q.dequantize() - w, ht) / rtn
        rows.append(row)
        print(f"{n:18s}{row['rtn_rel_output_error']:12.2e}" + "".join(f"{row[v]:22.3f}" for v in variants))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
