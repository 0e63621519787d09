"""Where quantization error lives: per-layer relative output error over depth and layer type
(the picture the ASER paper starts from), for RTN-W4 per channel, W4A8 (plus 8-bit per-token
activations), and W4A8 after whitened low-rank reconstruction of rank ``--rank``.

Every layer is measured on the full-precision model's own inputs (block by block): the
low-rank branch is fitted on a random half of the calibration tokens, and ``‖Y − Ŷ‖² / ‖Y‖²``
(``Y = X·Wᵀ``) is measured on up to ``--tokens`` of the other half. Writes JSON and a plot.

    python bench/experiments/error_profile.py --nsamples 8 --out bench/results/error-profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per layer used for the errors")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("bench/results/error-profile.json"))
    args = p.parse_args()

    import lowbit
    from lowbit.activations import ActQuantizer
    from lowbit.grids import UniformGrid
    from lowbit.models import block_linears, find_blocks
    from lowbit.pipeline.capture import capture_block_inputs, run_block
    from lowbit.rounding.rtn import rtn_quantize
    from lowbit.transforms.lowrank import reconstruct_error

    model, tok = lowbit.load_model(args.model)
    calib = lowbit.data.calibration("c4", tok, n=args.nsamples, seqlen=args.seqlen, seed=0)
    _, blocks = find_blocks(model)
    inputs, kwargs = capture_block_inputs(model, blocks, calib)
    act = ActQuantizer(args.a_bits, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b, block in enumerate(blocks):
        seen: dict[str, list[torch.Tensor]] = defaultdict(list)
        linears = block_linears(block)
        handles = [m.register_forward_pre_hook(lambda _m, a, n=n, seen=seen:
                                               seen[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
                   for n, m in linears.items()]
        with torch.no_grad():
            outputs = run_block(block, inputs, kwargs[b])
        for h in handles:
            h.remove()
        for name, layer in linears.items():
            x = torch.cat(seen[name]).double()
            order = torch.randperm(x.shape[0], generator=gen)
            fit, held = x[order[: len(order) // 2]], x[order[len(order) // 2:]]
            h = fit.T @ fit  # the branch is fitted on one half of the tokens, measured on the other
            x = held[: args.tokens]
            w = layer.weight.detach().double()
            qw = rtn_quantize(w.float(), UniformGrid(bits=args.bits)).weight().double()
            y = x @ w.T
            denom = float(y.pow(2).sum())
            xq = act(x.float()).double()
            lr = reconstruct_error(w - qw, h, rank=args.rank)
            branch = lr.product().double() if lr is not None else torch.zeros_like(w)
            rows.append({
                "block": b, "layer": name,
                "weight_only": float((y - x @ qw.T).pow(2).sum()) / denom,
                "w_a": float((y - xq @ qw.T).pow(2).sum()) / denom,
                "w_a_lowrank": float((y - xq @ (qw + branch).T).pow(2).sum()) / denom,
            })
        inputs = outputs
        print(f"block {b:2d} " + " ".join(f"{r['layer'].split('.')[-1]}={r['w_a']:.2e}" for r in rows[-len(linears):]),
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    protocol = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "command": " ".join([Path(sys.executable).name, *sys.argv])}
    args.out.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    plot(rows, args, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["layer"].split(".")[-1] for r in rows},
                   key=lambda k: [r["layer"].split(".")[-1] for r in rows].index(k))
    panels = [("weight_only", f"RTN W{args.bits}"), ("w_a", f"W{args.bits}A{args.a_bits} (per-token)"),
              ("w_a_lowrank", f"W{args.bits}A{args.a_bits} + whitened rank {args.rank}")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for kind in kinds:
            pts = [(r["block"], r[key]) for r in rows if r["layer"].endswith(kind)]
            ax.plot(*zip(*pts), marker=".", label=kind)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative output error ‖Y−Ŷ‖²/‖Y‖²")
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"{args.model}: per-layer quantization error ({args.nsamples}×{args.seqlen} C4 tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
