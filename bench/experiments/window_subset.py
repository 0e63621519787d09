"""Perplexity of a comparison's rows on their first N evaluation windows, from the per-window log
each row keeps (``runs/<row>/eval/<dataset>.nll.json``) — no forward pass is run.

Why: a full-protocol row (128 calibration samples, all windows) read on its first 8 windows is
directly comparable with a quick-protocol row (16 samples, first 8 windows) of the same recipe,
so the effect of the calibration sample count is seen apart from the evaluation's.

    python bench/experiments/window_subset.py runs/full-report --windows 8 \\
        --quick bench/results/compare-smollm2-q16/results.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def subset_ppl(log: Path, n: int, seqlen: int) -> tuple[float, float, int] | None:
    """(first-n ppl, ppl over the windows logged so far, windows logged) of one row and dataset."""
    values = json.loads(log.read_text())["values"]
    if len(values) < n:
        return None
    per_window = seqlen - 1
    return (math.exp(sum(values[:n]) / (n * per_window)), math.exp(sum(values) / (len(values) * per_window)),
            len(values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", type=Path, help="a `lowbit compare` report directory")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--quick", type=Path, help="results.json of a quick-protocol report, for its rows' numbers")
    p.add_argument("--out", type=Path, default=Path("bench/results/window-subset.json"))
    args = p.parse_args()

    quick = {}
    if args.quick:
        quick = {r["name"]: r.get("perplexity", {}) for r in json.loads(args.quick.read_text())["rows"]}
    rows = []
    print(f"{'row':16s} {'dataset':10s} {'first ' + str(args.windows):>10s} {'quick':>10s} {'logged':>10s} "
          f"{'windows':>8s}")
    for log in sorted(args.report.glob("runs/*/eval/*.nll.json")):
        run = log.parent.parent
        job = run / "job.json"
        name = json.loads(job.read_text())["name"] if job.exists() else run.name
        dataset = log.name.split(".")[0]
        got = subset_ppl(log, args.windows, args.seqlen)
        if got is None:
            continue
        first, logged, count = got
        q = quick.get(name, {}).get(dataset)
        rows.append({"row": name, "dataset": dataset, "first_windows": args.windows, "ppl_first": first,
                     "ppl_quick": q, "ppl_logged": logged, "windows_logged": count})
        print(f"{name:16s} {dataset:10s} {first:10.3f} {q if q is not None else float('nan'):10.3f} "
              f"{logged:10.3f} {count:8d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"report": str(args.report), "windows": args.windows, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
