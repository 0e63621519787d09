"""The report's figures: perplexity vs effective bits (with the Pareto front), per-layer error over
depth by layer type, and time per block. Each returns the PNG path, or None when there is nothing to draw."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from lowbit.errors import LowbitError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LowbitError("the report's plots need matplotlib: pip install 'lowbit[report]'") from None
    return plt


def _line_styles(names: list[str]) -> dict[str, dict]:
    """A distinct style per line: 20 colours, then the same colours dashed, then dotted (the default
    cycle of 10 gives two rows one colour in a comparison of a dozen rows)."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    dashes = ("-", "--", ":")
    return {n: {"color": colors[i % len(colors)], "ls": dashes[(i // len(colors)) % len(dashes)]}
            for i, n in enumerate(names)}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (fewer bits and lower perplexity), by bits."""
    front: list[tuple[float, float]] = []
    for bits, ppl in sorted(points):
        if not front or ppl < front[-1][1]:
            front.append((bits, ppl))
    return front


def plot_pareto(rows: list[dict], dataset: str, fp_ppl: float | None, out: Path) -> Path | None:
    pts = [(r["effective_bits"], r["perplexity"][dataset], r["name"], r["kind"]) for r in rows
           if r.get("status") == "ok" and r["kind"] != "fp" and dataset in r.get("perplexity", {})]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker, color in (("recipe", "o", "tab:blue"), ("peer", "s", "tab:orange")):
        sel = [p for p in pts if p[3] == kind]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, color=color,
                       label="lowbit" if kind == "recipe" else "peer", zorder=3)
        for b, p, name, _ in sel:
            ax.annotate(name, (b, p), textcoords="offset points", xytext=(4, 3), fontsize=7)
    front = pareto_front([(p[0], p[1]) for p in pts])
    ax.plot([f[0] for f in front], [f[1] for f in front], "k--", lw=1, label="Pareto front", zorder=2)
    if fp_ppl is not None:
        ax.axhline(fp_ppl, color="gray", lw=1, ls=":", label=f"full model ({fp_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per weight (codes + scales + zeros + outliers + low-rank)")
    ax.set_ylabel(f"{dataset} perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_layer_errors(rows: list[dict], out: Path) -> Path | None:
    """One panel per layer type (q_proj, …, down_proj); one line per recipe over block index."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for layer in r.get("layers") or []:
            err, label = layer.get("rel_output_error"), r["name"]
            if err is None:  # no calibration inputs (RTN): only the weight error is known, and said so
                err, label = layer.get("rel_weight_error"), f"{label} (weight error)"
            if err:
                series[layer["name"].rsplit(".", 1)[-1]][label].append((layer["block"], err))
    if not series:
        return None
    plt = _pyplot()
    style = _line_styles(sorted({name for by_row in series.values() for name in by_row}))
    types = sorted(series)
    cols = min(4, len(types))
    nrows = -(-len(types) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False, sharex=True)
    for ax, t in zip(axes.flat, types):
        for name, pts in sorted(series[t].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, label=name, **style[name])
        ax.set_title(t, fontsize=9)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("block")
    axes[0][0].set_ylabel("relative output error")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_block_times(rows: list[dict], out: Path) -> Path | None:
    sel = [r for r in rows if r.get("block_seconds")]
    if not sel:
        return None
    plt = _pyplot()
    style = _line_styles([r["name"] for r in sel])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r in sel:
        ax.plot(range(len(r["block_seconds"])), r["block_seconds"], marker=".", lw=1, label=r["name"], **style[r["name"]])
    ax.set_xlabel("block")
    ax.set_ylabel("seconds")
    ax.set_title("quantization time per block")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
