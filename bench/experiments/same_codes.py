"""Do two versions of lowbit write the same quantized model? A hash per preset of every layer's codes, scales and
zeros and of the whole fake-quantized state, on a tiny random Llama (or SmolLM2's first two blocks).

Run it once per version, each from its own worktree, and compare the two lines (2026-12-07: every preset
equal between 7a64984, before the block engine, and the engine's commits):

    OMP_NUM_THREADS=1 PYTHONPATH=../old-worktree python bench/experiments/same_codes.py --presets rtn-w4g128,oac-w2
    OMP_NUM_THREADS=1 python bench/experiments/same_codes.py --presets rtn-w4g128,oac-w2
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the tests' tiny model factories


def fingerprint(model: torch.nn.Module, weights: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        qw = weights[name]
        for field in ("codes", "scale", "zero"):
            t = getattr(qw, field, None)
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
    for _, p in sorted(model.state_dict().items()):
        h.update(p.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", required=True, help="comma separated")
    p.add_argument("--real", action="store_true", help="SmolLM2's first two blocks, 2 x 128 tokens of C4")
    args = p.parse_args()
    import lowbit
    from lowbit.data.protocol import calibration
    from lowbit.models import keep_first_blocks
    from lowbit.pipeline import quantize_model

    if args.real:
        base, tok = lowbit.load_model("smollm2-135m")
        calib, n, seqlen = calibration("c4", tok, n=2, seqlen=128, seed=0), 2, 128
    else:
        from conftest import tiny_llama

        calib, n, seqlen = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1)), 6, 32
    out = {}
    for name in args.presets.split(","):
        rec = lowbit.recipes.apply_overrides(lowbit.recipes.get(name),
                                             [f"calibration.nsamples={n}", f"calibration.seqlen={seqlen}"])
        if not args.real and rec.weights.group_size and rec.weights.group_size > 64:  # the tiny model's 64 inputs
            rec = lowbit.recipes.apply_overrides(rec, ["weights.group_size=32"])
        model = keep_first_blocks(copy.deepcopy(base), 2) if args.real else tiny_llama(layers=2)
        result = quantize_model(model, rec, calib, show_progress=False)
        out[name] = fingerprint(model, result.weights)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
