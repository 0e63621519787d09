"""Rounding speed: wall time of quantizing the first blocks of SmolLM2 per preset, with the mean
relative output error of its layers (so a faster commit can be checked for the same quality).

The calibration is tiny on purpose (default 2 × 128 tokens, what the real-model tests use), so
the time is the rounding's own (clipping search, GPTQ/LDLQ, greedy passes), not the forward
passes. Run it at two commits to compare them, e.g. from a worktree of the older one:

    OMP_NUM_THREADS=1 python bench/experiments/rounding_speed.py --presets quip-w2,gptq-w4g128 --blocks 6 \
        --out bench/results/rounding-speed.json
    PYTHONPATH=/path/to/old-worktree OMP_NUM_THREADS=1 python bench/experiments/rounding_speed.py ... --out old.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--presets", default="quip-w2,gptq-w4g128")
    p.add_argument("--blocks", type=int, default=6, help="quantize only the first N decoder blocks")
    p.add_argument("--nsamples", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("bench/results/rounding-speed.json"))
    args = p.parse_args()

    import subprocess

    import torch

    import lowbit

    commit = subprocess.run(["git", "-C", str(Path(lowbit.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    rows = []
    for preset in args.presets.split(","):
        model, tok = lowbit.load_model(args.model)
        # cut here, not with lowbit.models.keep_first_blocks: the script also times older commits
        model.model.layers = model.model.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
        calib = lowbit.data.calibration("c4", tok, n=args.nsamples, seqlen=args.seqlen, seed=0)
        t0 = time.perf_counter()
        report = lowbit.quantize(model, preset, calib, show_progress=False).report
        seconds = time.perf_counter() - t0
        errors = [layer.rel_output_error for layer in report.layers]
        rows.append({"preset": preset, "blocks": args.blocks, "seconds": seconds,
                     "mean_rel_output_error": sum(errors) / len(errors)})
    result = {"lowbit": str(Path(lowbit.__file__).parent), "commit": commit, "threads": torch.get_num_threads(),
              "nsamples": args.nsamples, "seqlen": args.seqlen, "rows": rows}
    print(f"lowbit {commit} ({result['threads']} thread(s)), first {args.blocks} blocks, "
          f"calibration {args.nsamples} × {args.seqlen}")
    print(f"{'preset':16s} {'seconds':>9s} {'mean rel. output error':>24s}")
    for r in rows:
        print(f"{r['preset']:16s} {r['seconds']:9.1f} {r['mean_rel_output_error']:24.5f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
