"""HQQ vs RTN relative weight error ‖Ŵ − W‖/‖W‖ on a few SmolLM2 layers (no data involved): whether
HQQ's collapse at 3 and 2 bits comes from a larger weight error or from how it is distributed.

    python bench/experiments/hqq_weight_error.py --layers model.layers.3.self_attn.q_proj,model.layers.3.mlp.down_proj
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", default="model.layers.3.self_attn.q_proj,model.layers.3.mlp.down_proj")
    p.add_argument("--schemes", default="w4g128,w3g128,w3g64,w2g64")
    p.add_argument("--out", type=Path, default=Path("bench/results/hqq-weight-error.json"))
    args = p.parse_args()

    from lowbit.compare.config import WeightScheme
    from lowbit.compare.peers import hqq_peer
    from lowbit.grids import UniformGrid
    from lowbit.models import load_model
    from lowbit.rounding.rtn import rtn_quantize

    model, _ = load_model(args.model)
    modules = dict(model.named_modules())
    rows = []
    print(f"{'layer':32s} {'scheme':8s} {'HQQ':>8s} {'RTN':>8s}")
    for name in args.layers.split(","):
        w = modules[name].weight.data.float()
        for text in args.schemes.split(","):
            scheme = WeightScheme.parse(text)
            rel = lambda q: float((q - w).norm() / w.norm())  # noqa: E731
            hqq = rel(hqq_peer.fake_quantize(w, scheme))
            rtn = rel(rtn_quantize(w, UniformGrid(bits=scheme.bits, group_size=scheme.group_size)).weight())
            rows.append({"layer": name, "scheme": text, "hqq": hqq, "rtn": rtn})
            print(f"{name:32s} {text:8s} {hqq:8.4f} {rtn:8.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
