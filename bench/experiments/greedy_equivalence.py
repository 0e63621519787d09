"""Same inputs, two greedy passes: does this checkout's greedy refinement pick the same codes as
the one at another commit, layer by layer, when both see exactly the same weights and Hessian?

Quantizes the first blocks of the model with a QuIP preset; at every layer both versions refine
the same LDLQ result and the older one's codes go on (so the inputs stay the same down the
model). Prints how many layers differ, by how many codes, and the proxy-loss ratio new/old;
writes JSON. Separates "the rounding changed" from "a near-tie tipped and the 2-bit model went
elsewhere" when perplexities of two commits differ.

    OMP_NUM_THREADS=1 python bench/experiments/greedy_equivalence.py --against b4d1640 --blocks 8 \
        --out bench/results/greedy-equivalence.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import tempfile
from pathlib import Path


def _module_at(rev: str, path: str):
    repo = Path(__file__).resolve().parents[2]
    text = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{path}"], capture_output=True, text=True,
                          check=True).stdout
    file = Path(tempfile.mkdtemp()) / Path(path).name
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(f"at_{rev}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="the other commit")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", default="quip-w2")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", type=Path, default=Path("bench/results/greedy-equivalence.json"))
    args = p.parse_args()

    import lowbit
    import lowbit.methods.weights as dispatch
    from lowbit.models import keep_first_blocks
    from lowbit.rounding.quantized import proxy_loss

    old = _module_at(args.against, "lowbit/rounding/greedy.py").greedy_refine
    new = dispatch.greedy_refine
    layers = []

    def both(wd, hd, qw, grid, passes, order=None):
        a, b = old(wd, hd, qw, grid, passes, order=order), new(wd, hd, qw, grid, passes, order=order)
        loss_a, loss_b = (proxy_loss(x.dequantize().double() - wd, hd) for x in (a, b))
        layers.append({"codes_differ": float((a.codes != b.codes).float().mean()),
                       "loss_new_over_old": loss_b / loss_a})
        return a

    dispatch.greedy_refine = both
    model, tok = lowbit.load_model(args.model)
    keep_first_blocks(model, args.blocks)
    calib = lowbit.data.calibration("c4", tok, n=args.nsamples, seqlen=args.seqlen, seed=0)
    lowbit.quantize(model, args.preset, calib, show_progress=False)

    differ = [x for x in layers if x["codes_differ"] > 0]
    ratio = statistics.geometric_mean(x["loss_new_over_old"] for x in layers)
    print(f"{args.preset}, first {args.blocks} blocks, calibration {args.nsamples} × {args.seqlen}, "
          f"this checkout vs {args.against}: {len(differ)} of {len(layers)} layers pick other codes")
    for x in differ:
        print(f"  {x['codes_differ']:.2e} of codes differ; proxy loss new/old {x['loss_new_over_old']:.6f}")
    print(f"geometric mean of proxy loss new/old over all layers: {ratio:.7f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"against": args.against, "preset": args.preset, "blocks": args.blocks,
                                    "nsamples": args.nsamples, "seqlen": args.seqlen, "layers": layers,
                                    "layers_differing": len(differ), "geomean_loss_ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
