"""Per-layer output error on held-out calibration tokens, for rounding variants side by side.

For one block of the full-precision model, collects Hessians from ``--fit`` calibration samples
and measures ``tr(ΔW·H·ΔWᵀ)`` on ``--heldout`` other samples, as a ratio to RTN (lower is
better). ``--variants gptq``: GPTQ with and without clipping search and act-order (why GPTQ
closes only part of RTN's gap); ``--variants quip``: QuIP's pieces (incoherence kind, grid,
greedy passes, rescaling) against GPTQ. Prints a table, writes JSON.

    python bench/experiments/layer_errors.py --block 3 --bits 4 --out bench/results/layer-errors-b3-w4.json
    python bench/experiments/layer_errors.py --block 3 --bits 2 --variants quip \\
        --out bench/results/layer-errors-b3-w2-quip.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lowbit
from lowbit.grids import UniformGrid
from lowbit.hessians import HessianAccumulator
from lowbit.methods.weights import round_weight
from lowbit.models import block_linears, find_blocks
from lowbit.pipeline.capture import capture_block_inputs, run_block
from lowbit.recipes import TransformSpec, WeightSpec
from lowbit.rounding import proxy_loss, rtn_quantize
from lowbit.transforms import Incoherence, incoherence

_GPTQ = dict(method="gptq", act_order=True, clip_search=True)
_QUIP = dict(method="ldlq", act_order=True, grid="rms", greedy_passes=1)
VARIANTS = {  # name -> (weights section, transform section)
    "none": {},  # RTN only (with --mu: just the incoherence measurement)
    "gptq": {
        "gptq": (dict(method="gptq"), {}),
        "gptq+act_order": (dict(method="gptq", act_order=True), {}),
        "gptq+act_order+clip": (_GPTQ, {}),
        "rtn+clip": (dict(method="rtn", clip_search=True), {}),
    },
    "quip": {
        "gptq+act+clip": (_GPTQ, {}),
        "ldlq-rg+rms": (_QUIP, {}),
        "had+rtn+rms": (dict(method="rtn", grid="rms"), dict(incoherence="hadamard")),
        "had+gptq+act+clip": (_GPTQ, dict(incoherence="hadamard")),
        "had+ldlq+rms": (dict(_QUIP, greedy_passes=0, act_order=False), dict(incoherence="hadamard")),
        "had+ldlq-rg+rms": (_QUIP, dict(incoherence="hadamard")),
        "had+ldlq-rg+rms,no-rescale": (_QUIP, dict(incoherence="hadamard", rescale=False)),
        "had+ldlq-rg+rms,3-passes": (dict(_QUIP, greedy_passes=3), dict(incoherence="hadamard")),
        "kron+ldlq-rg+rms": (_QUIP, dict(incoherence="kron")),
    },
}


def _mu(w: torch.Tensor, h: torch.Tensor, name: str) -> dict[str, float]:
    """μ_W and μ_H (QuIP's incoherence) as they are, and after each transform (with rescaling)."""
    mu_w, mu_h = incoherence(w, h)
    out = {"mu_w": mu_w, "mu_h": mu_h}
    for kind in ("hadamard", "kron"):
        t = Incoherence.fit(w, h, kind, 0, name)
        out[f"mu_w_{kind}"], out[f"mu_h_{kind}"] = incoherence(t.forward_weight(w.double()), t.forward_hessian(h))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--fit", type=int, default=16)
    p.add_argument("--heldout", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--variants", choices=sorted(VARIANTS), default="gptq")
    p.add_argument("--mu", action="store_true", help="also QuIP's incoherence μ of W and H before/after the transforms")
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

    variants = {name: (WeightSpec(**{"bits": args.bits, "group_size": args.group_size, **ws}), TransformSpec(**ts))
                for name, (ws, ts) in VARIANTS[args.variants].items()}
    rows = []
    print(f"{'layer':18s}{'rtn rel.err':>12s}" + "".join(f"{v:>{max(len(v) + 1, 10)}s}" for v in variants))
    for n, m in layers.items():
        w, h, ht = m.weight.data, fit[n].hessian(), held[n].hessian()
        rtn = proxy_loss(rtn_quantize(w, UniformGrid(args.bits, group_size=args.group_size)).dequantize() - w, ht)
        row = {"layer": n, "rtn_rel_output_error": rtn / proxy_loss(w, ht)}
        for name, (spec, transform) in variants.items():
            q = round_weight(w, h if spec.method != "rtn" else None, spec, n, transform)
            row[name] = proxy_loss(q.weight() - w, ht) / rtn
        if args.mu:
            row.update(_mu(w, h, n))
        rows.append(row)
        print(f"{n:18s}{row['rtn_rel_output_error']:12.2e}"
              + "".join(f"{row[v]:>{max(len(v) + 1, 10)}.3f}" for v in variants), flush=True)
    if args.mu:
        keys = [k for k in rows[0] if k.startswith("mu_")]
        print(f"{'layer':18s}" + "".join(f"{k:>16s}" for k in keys))
        for row in rows:
            print(f"{row['layer']:18s}" + "".join(f"{row[k]:16.2f}" for k in keys))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
