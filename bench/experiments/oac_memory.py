"""Memory and time of OAC's gradient pass, in one pass or split over several (``hessian.passes``).

Each configuration runs in its own process, so that each peak RSS is that configuration's alone.
``passes 0`` is the same forward and backward with no layer summed: the pass's floor (model,
activations, gradients), so ``peak − floor`` is what the sums themselves cost.

    OMP_NUM_THREADS=1 python bench/experiments/oac_memory.py --passes 0,1,2,4 --nsamples 2 --seqlen 2048 \\
        --out bench/results/oac-memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import lowbit
    from lowbit.compare.peers import decoder_linears
    from lowbit.hessians.output_adaptive import _one_pass, output_adaptive_hessians

    model, tok = lowbit.load_model(args.model)
    ids = lowbit.data.calibration("c4", tok, n=args.nsamples, seqlen=args.seqlen, seed=0)
    if not args.child:  # the floor: the pass's own forward and backward with no layer summed
        _, cost = _one_pass(model, {}, ids, show_progress=False, state=None, save_every=8)
        print(json.dumps({"passes": 0, "seconds": cost["seconds"], "peak_memory_mb": cost["peak_memory_mb"],
                          "hessians_mb": 0, "dtype": "-"}))
        return
    layers = decoder_linears(model)
    extra = {"passes": args.child} if args.child > 1 else {}  # (older lowbit: no ``passes``)
    with tempfile.TemporaryDirectory() as tmp:  # a state file, as `lowbit quantize` keeps one
        hessians, cost = output_adaptive_hessians(model, layers, ids, show_progress=False,
                                                  state=Path(tmp) / "oac_hessians.safetensors", **extra)
        first = hessians.pop(next(iter(layers)))
    sums_mb = sum(m.in_features**2 for m in layers.values()) * first.element_size() / 2**20
    print(json.dumps({"passes": args.child, "seconds": cost["seconds"], "peak_memory_mb": cost["peak_memory_mb"],
                      "hessians_mb": sums_mb, "dtype": str(first.dtype)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--passes", default="0,1,2,4", help="configurations, comma-separated (0: no layer summed)")
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("bench/results/oac-memory.json"))
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        return child(args)

    rows = []
    for passes in map(int, args.passes.split(",")):
        cmd = [sys.executable, __file__, "--child", str(passes), "--model", args.model,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"passes {r['passes']}: {r['seconds']:.1f} s, peak {r['peak_memory_mb']:.0f} MB, "
              f"Hessians {r['hessians_mb']:.0f} MB ({r['dtype']})", flush=True)
    floor = next((r["peak_memory_mb"] for r in rows if r["passes"] == 0), None)
    print(f"\n{'passes':>6s}{'seconds':>10s}{'peak MB':>10s}{'over floor':>12s}{'Hessians MB':>13s}")
    for r in rows:
        over = f"{r['peak_memory_mb'] - floor:.0f}" if floor is not None else "-"
        print(f"{r['passes']:6d}{r['seconds']:10.1f}{r['peak_memory_mb']:10.0f}{over:>12s}{r['hessians_mb']:13.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k != "child"},
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
