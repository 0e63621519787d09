"""Quality benchmark: perplexity gap to the full model, time and peak memory per recipe.

Each recipe runs in its own subprocess so that peak memory is its own. Prints a table and
writes JSON (one object per row, plus the protocol). Example (quick CPU protocol):

    python bench/quality.py --recipes rtn-w4,gptq-w4 --nsamples 32 --windows 40 \
        --out bench/results/quality-quick.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run_one(args: argparse.Namespace, recipe: str) -> dict:
    """Quantize (unless ``fp``) and evaluate in this process; returns one result row."""
    import dataclasses

    import torch

    import lowbit
    from lowbit.memory import peak_memory_mb
    from lowbit.recipes import apply_overrides

    model, tok = lowbit.load_model(args.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    row: dict = {"recipe": recipe, "overrides": args.set, "device": str(next(model.parameters()).device)}
    if recipe != "fp":
        rec = apply_overrides(lowbit.recipes.get(recipe), args.set)
        cal = {k: v for k, v in dict(nsamples=args.nsamples, seqlen=args.seqlen).items() if v is not None}
        rec = rec.with_overrides(calibration=dataclasses.replace(rec.calibration, **cal))
        rec.validate()
        t0 = time.perf_counter()
        result = lowbit.quantize(model, rec, tokenizer=tok, show_progress=False)
        report = result.report
        row.update(quant_seconds=time.perf_counter() - t0, quant_peak_memory_mb=report.peak_memory_mb,
                   nsamples=rec.calibration.nsamples, calib_seqlen=rec.calibration.seqlen, bits=rec.weights.bits,
                   group_size=rec.weights.group_size,
                   mean_rel_output_error=_mean([r.rel_output_error for r in report.layers]),
                   effective_bits=result.effective_bits,
                   hessian_pass=report.hessian_pass, a_bits=rec.activations.bits, kv_bits=rec.activations.kv_bits,
                   act_granularity=rec.activations.granularity if rec.activations.enabled else None,
                   lowrank_extra_params=_lowrank_share(result.weights))
    for d in args.datasets.split(","):
        r = lowbit.eval.perplexity(model, tok, d, windows=args.windows, show_progress=False)
        row[d] = r.ppl
        row[f"{d}_windows"] = r.windows
    row["peak_memory_mb"] = peak_memory_mb()  # whole process: load + quantize + evaluate
    return row


def _lowrank_share(quant: dict) -> float | None:
    """Extra parameters (and multiply-adds per token) of the low-rank branches, as a share of the
    quantized layers': Σ r·(m+n) / Σ m·n."""
    branch = sum(qw.lowrank.rank * sum(qw.codes.shape) for qw in quant.values() if qw.lowrank is not None)
    return branch / sum(qw.codes.numel() for qw in quant.values()) if branch else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", default="fp,rtn-w4,gptq-w4", help="comma separated; 'fp' = unquantized")
    p.add_argument("--nsamples", type=int, default=None, help="calibration samples (recipe default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration length (recipe default 2048)")
    p.add_argument("--windows", type=int, default=None, help="first N eval windows (default: all)")
    p.add_argument("--datasets", default="wikitext2,c4")
    p.add_argument("--set", action="append", default=[], help="recipe override, e.g. weights.act_order=false")
    p.add_argument("--out", type=Path, default=Path("bench/results/quality.json"))
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.single:
        print(json.dumps(run_one(args, args.single)))
        return
    rows = []
    base = [a for a in sys.argv[1:]]
    for recipe in args.recipes.split(","):
        cmd = [sys.executable, __file__, *base, "--single", recipe]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"recipe": recipe, "error": out.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        _print(rows[-1:], args, header=len(rows) == 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"protocol": _protocol(args), "rows": rows}, indent=1))


def _protocol(args) -> dict:
    return {"model": args.model, "nsamples": args.nsamples or 128, "calib_seqlen": args.seqlen or 2048,
            "windows": args.windows or "all", "eval_seqlen": 2048, "overrides": args.set,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def _print(rows, args, header):
    ds = args.datasets.split(",")
    if header:
        print(f"{'recipe':16s}{'bits/w':>7s}" + "".join(f"{d:>11s}" for d in ds) + f"{'quant s':>9s}{'quant MB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['recipe']:16s} ERROR {r['error']}")
            continue
        bits = f"{r['effective_bits']:7.3f}" if r.get("effective_bits") is not None else f"{'-':>7s}"
        print(f"{r['recipe']:16s}{bits}" + "".join(f"{r[d]:11.3f}" for d in ds)
              + f"{r.get('quant_seconds', 0):9.1f}{r.get('quant_peak_memory_mb', r['peak_memory_mb']):9.0f}",
              flush=True)


if __name__ == "__main__":
    main()
