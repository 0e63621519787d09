"""One full-protocol row, through the CLI a user runs, resumable at every step; prints the row and
writes its raw files to ``bench/results/full-protocol/<row>/``.

The steps: ``lowbit quantize`` (128 × 2048 C4 calibration, ``--resume``), ``lowbit eval`` on every
WikiText-2 and C4 window (the checkpoint's per-window log keeps finished windows), the first 8
windows of each (read from that log: no forward), and KL to the full model on the first 16
WikiText-2 windows. A step whose output exists is not run again, so after a kill or a lost session
the same command continues. On the 2-core CPU one row is ≈ 55 min of quantization and ≈ 50 min of
evaluation on one core; two rows side by side fit a session.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/full_row.py quip-w3 --work runs
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/full_row.py oac-w1 --work runs \
        --hessian-cache runs/hessians      # OAC rows share one gradient pass
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "full-protocol"
KEEP = ("--keep-dequantized",)  # same numbers; binary rows' windows ≈ 40 % faster on the CPU


def _lowbit(*args: str, out: Path | None = None) -> None:
    """Run the CLI; with ``out``, its JSON goes there (whole or not at all)."""
    cmd = [sys.executable, "-m", "lowbit.cli", *args]
    print("+ lowbit " + " ".join(args), file=sys.stderr, flush=True)
    if out is None:
        subprocess.run(cmd, check=True)
        return
    text = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    json.loads(text)  # refuse to keep anything but one JSON object
    out.write_text(text)


def run_row(recipe: str, work: Path, model: str, hessian_cache: Path | None, kl_windows: int) -> dict:
    ckpt = work / recipe
    files = {"eval": work / f"{recipe}.eval.json", "first8": work / f"{recipe}.eval-first8.json",
             "kl": work / f"{recipe}.eval-kl{kl_windows}.json"}
    if not (ckpt / "lowbit_config.json").exists():
        extra = ["--hessian-cache", str(hessian_cache)] if hessian_cache else []
        _lowbit("quantize", model, "--recipe", recipe, "--out", str(ckpt), "--resume", *extra)
    if not files["eval"].exists():
        _lowbit("eval", str(ckpt), "--ppl", "wikitext2,c4", "--json", *KEEP, out=files["eval"])
    if not files["first8"].exists():
        _lowbit("eval", str(ckpt), "--ppl", "wikitext2,c4", "--windows", "8", "--json", out=files["first8"])
    if not files["kl"].exists():
        _lowbit("eval", str(ckpt), "--ppl", "wikitext2", "--windows", str(kl_windows), "--kl", "--json", *KEEP,
                out=files["kl"])
    dest = RESULTS / recipe
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ckpt / "report.json", dest / "report.json")
    for name, f in (("eval", files["eval"]), ("eval-first8", files["first8"]), (f"eval-kl{kl_windows}", files["kl"])):
        shutil.copy(f, dest / f"{name}.json")
    report = json.loads((ckpt / "report.json").read_text())
    ev, first8, kl = (json.loads(f.read_text()) for f in files.values())
    return {"row": recipe, "wikitext2": ev["perplexity"]["wikitext2"]["ppl"], "c4": ev["perplexity"]["c4"]["ppl"],
            "kl": kl["kl"]["wikitext2"], "first8": [first8["perplexity"][d]["ppl"] for d in ("wikitext2", "c4")],
            "quant_seconds": report.get("total_seconds"), "peak_memory_mb": report.get("peak_memory_mb"),
            "hessian_pass": report.get("hessian_pass") or None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", help="presets or recipe files, one row each, in order")
    ap.add_argument("--work", type=Path, required=True, help="where checkpoints and raw JSON live while running")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hessian-cache", type=Path, default=None, help="shared OAC gradient pass (lowbit quantize)")
    ap.add_argument("--kl-windows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as one JSON file")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [run_row(r, args.work, args.model, args.hessian_cache, args.kl_windows) for r in args.recipes]
    print(f"{'row':20s} {'WikiText-2':>11s} {'C4':>10s} {'KL':>7s} {'first 8':>19s} {'quant s':>8s} {'peak MB':>8s}")
    for r in rows:
        print(f"{r['row']:20s} {r['wikitext2']:11.3f} {r['c4']:10.3f} {r['kl']:7.3f} "
              f"{r['first8'][0]:9.3f}/{r['first8'][1]:<9.3f} {r['quant_seconds'] or 0:8.0f} "
              f"{r['peak_memory_mb'] or 0:8.0f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
