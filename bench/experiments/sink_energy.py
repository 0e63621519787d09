"""How much of each linear layer's input energy sits on one token (attention sinks).

Runs one C4 calibration window through the full-precision model and prints, per block and
layer, the share of ``Σ‖x_t‖²`` carried by position 0 and by the largest single position.

    python bench/experiments/sink_energy.py --blocks 0,1,5,15,29 --out bench/results/sink-energy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lowbit
from lowbit.models import block_linears, find_blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--blocks", default="0,1,5,15,29")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench/results/sink-energy.json"))
    args = p.parse_args()

    model, tok = lowbit.load_model(args.model)
    ids = lowbit.data.calibration("c4", tok, n=1, seqlen=2048, seed=args.seed)
    _, blocks = find_blocks(model)
    rows = []

    def hook(block: int, name: str):
        def record(_m, inputs):
            energy = inputs[0][0].double().pow(2).sum(-1)
            rows.append({"block": block, "layer": name, "pos0_share": float(energy[0] / energy.sum()),
                         "max_share": float(energy.max() / energy.sum()), "argmax": int(energy.argmax())})
        return record

    handles = [m.register_forward_pre_hook(hook(b, n)) for b in map(int, args.blocks.split(","))
               for n, m in block_linears(blocks[b]).items()]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    print(f"{'block':>5s}  {'layer':18s}{'pos 0':>8s}{'max':>8s}{'at':>6s}")
    for r in rows:
        print(f"{r['block']:5d}  {r['layer']:18s}{r['pos0_share']:8.3f}{r['max_share']:8.3f}{r['argmax']:6d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
