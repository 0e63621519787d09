"""What auto-round costs here: run lowbit's auto-round peer on SmolLM2 with a comparison's
calibration set and ``$LOWBIT_AUTOROUND_ITERS`` iterations per block; auto-round's own progress
bar shows seconds per block (the BENCHMARKS.md numbers were read from it after two blocks).

    LOWBIT_AUTOROUND_ITERS=2 python bench/experiments/autoround_cost.py --calib runs/cmp-report/calibration.pt
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", type=Path, required=True, help="a comparison's calibration.pt")
    p.add_argument("--scheme", default="w4g128")
    p.add_argument("--out", type=Path, default=Path("bench/results/autoround-cost.json"))
    args = p.parse_args()

    from lowbit.compare.config import WeightScheme
    from lowbit.compare.peers import AUTOROUND_ITERS_ENV, run_peer
    from lowbit.models import load_model

    model, tok = load_model(args.model)
    calib = torch.load(args.calib)
    t0 = time.perf_counter()
    extra = run_peer("autoround", model, tok, calib, WeightScheme.parse(args.scheme), Path(tempfile.mkdtemp()))
    row = {"scheme": args.scheme, "iters": os.environ.get(AUTOROUND_ITERS_ENV), "seconds": time.perf_counter() - t0,
           "threads": torch.get_num_threads(), **{k: v for k, v in extra.items() if not isinstance(v, (list, dict))}}
    print(f"{'scheme':8s} {'iters':>6s} {'seconds':>9s}\n"
          f"{row['scheme']:8s} {str(row['iters']):>6s} {row['seconds']:9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
