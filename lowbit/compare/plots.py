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


def spread_labels(boxes: list[tuple[float, float, float, float]]) -> list[float]:
    """Bottom edges for labels ``(x, y, width, height)`` (display units, anchored at their point's
    (x, y)) such that no two overlap: each label moves up past the ones already placed that it would
    cover. Rows of nearly equal bits and perplexity (four 4-bit rows within 0.2 bits) otherwise print
    their names on top of each other."""
    placed: list[tuple[float, float, float, float]] = []
    out = [0.0] * len(boxes)
    for i in sorted(range(len(boxes)), key=lambda k: (boxes[k][1], boxes[k][0])):
        x, y, w, h = boxes[i]
        moved = True
        while moved:
            moved = False
            for px, py, pw, ph in placed:
                if x < px + pw and px < x + w and y < py + ph and py < y + h:
                    y, moved = py + ph, True
        placed.append((x, y, w, h))
        out[i] = y
    return out


def _draw_pareto(ax, pts: list[tuple], fp_ppl: float | None, log: bool) -> None:
    for kind, marker, color in (("recipe", "o", "tab:blue"), ("peer", "s", "tab:orange")):
        sel = [p for p in pts if p[3] == kind]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker, color=color,
                       label="lowbit" if kind == "recipe" else "peer", zorder=3)
    front = pareto_front([(p[0], p[1]) for p in pts])
    ax.plot([f[0] for f in front], [f[1] for f in front], "k--", lw=1, label="Pareto front", zorder=2)
    if fp_ppl is not None:
        ax.axhline(fp_ppl, color="gray", lw=1, ls=":", label=f"full model ({fp_ppl:.2f})")
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")


def _label_points(fig, ax, pts: list[tuple], renderer) -> None:
    """Names beside their points (left of a point near the right edge, so no name leaves its panel),
    moved apart where they would overlap, with a thin line back to a point whose name had to move.
    Needs the figure drawn at its final layout: the names are placed in its display pixels."""
    ax.autoscale(False)  # a leader line must not move the limits the names were placed against
    right = ax.get_window_extent(renderer).x1
    pad = 4 * fig.dpi / 72  # the 4-point gap between a point and its name
    texts, boxes, anchors = [], [], []
    for b, p, name, _ in pts:
        x, y = ax.transData.transform((b, p))
        t = ax.text(0, 0, name, fontsize=7, transform=None)
        w, h = t.get_window_extent(renderer).size
        left = x + pad + w > right
        texts.append(t)
        boxes.append((x - pad - w if left else x + pad, y, w, h))
        anchors.append((x, x - pad if left else x + pad))
    for t, (x0, y, _, h), (px, edge), low in zip(texts, boxes, anchors, spread_labels(boxes)):
        t.set_position((x0, low))
        if low - y > h:
            ax.plot(*ax.transData.inverted().transform([(px, y), (edge, low + h / 2)]).T,
                    color="0.6", lw=0.5, zorder=1)


def plot_pareto(rows: list[dict], dataset: str, fp_ppl: float | None, out: Path) -> Path | None:
    """All rows on a log scale; beside it, when some rows are within 2x of the full model and others
    are not, those rows alone on a linear scale, where 4-bit rows 0.1 perplexity apart can be told apart."""
    pts = [(r["effective_bits"], r["perplexity"][dataset], r["name"], r["kind"]) for r in rows
           if r.get("status") == "ok" and r["kind"] != "fp" and dataset in r.get("perplexity", {})]
    if not pts:
        return None
    near = [p for p in pts if fp_ppl is not None and p[1] <= 2 * fp_ppl]
    panels = [(pts, True, "all rows")]
    if 2 <= len(near) < len(pts):
        panels.append((near, False, f"within 2x of the full model ({len(near)} rows)"))
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False, dpi=120)
    for ax, (sel, log, title) in zip(axes[0], panels):
        _draw_pareto(ax, sel, fp_ppl, log)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("effective bits per weight (codes + scales + zeros + outliers + low-rank)", fontsize=8)
        ax.set_ylabel(f"{dataset} perplexity")
        ax.margins(x=0.05, y=0.08)
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi + 0.3 * (hi - lo))  # room for the names right of the highest-bit points
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()  # final limits and layout, once for every panel
    for ax, (sel, _, _) in zip(axes[0], panels):
        _label_points(fig, ax, sel, fig.canvas.get_renderer())
    fig.savefig(out, dpi=fig.dpi)  # the names sit at pixel positions of this resolution
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
        ax.plot(range(len(r["block_seconds"])), r["block_seconds"], marker=".", lw=1, label=r["name"],
                **style[r["name"]])
    ax.set_xlabel("block")
    ax.set_ylabel("seconds")
    ax.set_title("quantization time per block")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
