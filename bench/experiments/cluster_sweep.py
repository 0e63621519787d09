"""RPTQ cluster-count sweep: perplexity against the number of activation clusters, as a table,
JSON and a plot. Each point is one ``bench/quality.py`` row (its own process) of ``--recipe``
with ``activations.clusters_norm = clusters_mlp = k`` and ``clusters_head = min(k, --head-cap)``.
By default weights stay in float (``weights.method=none``) so that the curve isolates the
activation/KV quantization; pass ``--weights gptq`` for the W4 version.

    python bench/experiments/cluster_sweep.py --recipe rptq-w4a4kv4 --clusters 1,4,8,16,32,64 \
        --nsamples 16 --windows 8 --out bench/results/rptq-cluster-sweep.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent  # bench/, where quality.py lives


def point(args: argparse.Namespace, k: int) -> dict:
    sets = [f"activations.clusters_norm={k}", f"activations.clusters_mlp={k}",
            f"activations.clusters_head={min(k, args.head_cap)}", f"weights.method={args.weights}"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(BENCH / "quality.py"), "--model", args.model, "--recipes", args.recipe,
               "--nsamples", str(args.nsamples), "--windows", str(args.windows), "--datasets", args.datasets,
               "--out", str(out)] + [a for s in sets for a in ("--set", s)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.read_text())["rows"][0]
    if "error" in row:
        raise RuntimeError(f"k={k}: {row['error']}")
    return {"clusters": k, "clusters_head": min(k, args.head_cap), **row}


def plot(rows: list[dict], datasets: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [r["clusters"] for r in rows]
    for d in datasets:
        ax.plot(ks, [r[d] for r in rows], marker="o", label=d)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("clusters per norm output / down-proj input")
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipe", default="rptq-w4a4kv4")
    p.add_argument("--weights", default="none", help="weights.method for every point (none: float weights)")
    p.add_argument("--clusters", default="1,4,8,16,32,64")
    p.add_argument("--head-cap", type=int, default=4, help="clusters per head are min(k, this)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--datasets", default="wikitext2,c4")
    p.add_argument("--out", type=Path, default=Path("bench/results/rptq-cluster-sweep.json"))
    args = p.parse_args()

    datasets = args.datasets.split(",")
    rows = []
    print(f"{'clusters':>8s}{'per head':>9s}" + "".join(f"{d:>11s}" for d in datasets) + f"{'calib s':>9s}")
    for k in (int(x) for x in args.clusters.split(",")):
        rows.append(point(args, k))
        r = rows[-1]
        print(f"{k:8d}{r['clusters_head']:9d}" + "".join(f"{r[d]:11.3f}" for d in datasets)
              + f"{r['quant_seconds']:9.1f}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        protocol = {"model": args.model, "recipe": args.recipe, "weights": args.weights, "nsamples": args.nsamples,
                    "windows": args.windows, "command": " ".join([Path(sys.executable).name, *sys.argv])}
        args.out.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
    title = f"{args.model} {args.recipe} (weights: {args.weights}), {args.nsamples} calib, {args.windows} windows"
    plot(rows, datasets, title, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
