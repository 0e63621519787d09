"""``report.md`` and ``report.html``: one table, the gap ratio against peers, and the figures."""

from __future__ import annotations

import html
import json
from pathlib import Path

from lowbit.compare.config import CompareConfig
from lowbit.compare.plots import plot_block_times, plot_layer_errors, plot_pareto


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _ppl(x) -> str:
    return "–" if x is None else (f"{x:.3f}" if x < 1000 else f"{x:.3g}")


def _sharing(row: dict) -> str:
    """How a row's times were taken: its threads, and the ``--jobs`` (rows at once) of the run."""
    if "threads" not in row:
        return "–"
    return f"{row['threads']} / {row.get('rows_at_once', '?')}"  # '?': cached before it was recorded


def full_model_row(rows: list[dict]) -> dict | None:
    """The unquantized model's row, if it ran: every gap is measured from it."""
    return next((r for r in rows if r["kind"] == "fp" and r.get("status") == "ok"), None)


def table(rows: list[dict], cfg: CompareConfig) -> tuple[list[str], list[list[str]]]:
    fp = full_model_row(rows)
    d0 = cfg.datasets[0]
    head = (["row", "kind", "weights", "act / KV", "eff. bits"] + cfg.datasets + [f"Δ {d0}", "KL", "quant s",
            "threads / jobs", "peak MB", "ckpt MB", "status"])
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        ppl = r.get("perplexity", {})
        w = "–" if "w_bits" not in r else (f"W{r['w_bits']}" + (f"g{r['group_size']}" if r.get("group_size") else ""))
        a = "–" if "a_bits" not in r else f"A{r['a_bits']} / KV{r['kv_bits']}"
        gap = ppl.get(d0) - fp["perplexity"][d0] if ok and fp and d0 in ppl else None
        body.append([r["name"], r["kind"], w, a, _num(r.get("effective_bits"), ".3f")]
                    + [_ppl(ppl.get(d)) for d in cfg.datasets]
                    + [_num(gap, "+.3f") if gap is not None and abs(gap) < 1000 else _ppl(gap),
                       _num(r.get("kl"), ".4f"), _num(r.get("quant_seconds"), ".1f"), _sharing(r),
                       _num(r.get("peak_memory_mb"), ".0f"), _num(r.get("checkpoint_mb"), ".1f"), r.get("status", "?")])
    return head, body


BUDGETS = (2.3, 3.3, 4.3)  # effective bits per weight: W2g64, W3g128 and W4g128 with their scales fit


def gap_ratios(rows: list[dict], dataset: str, budgets: tuple[float, ...] = BUDGETS) -> list[dict]:
    """Per storage budget (weight-only rows): lowbit's best perplexity gap to the full model among its rows
    that store at most that many bits per weight, over the best peer's among the peers' rows within the same
    budget. A row above the budget never counts, for either side: no ratio sets 2.96 bits against 2.25."""
    fp = full_model_row(rows)
    if fp is None:
        return []
    base = fp["perplexity"][dataset]
    usable = [r for r in rows if r.get("status") == "ok" and r["kind"] in ("recipe", "peer")
              and r.get("a_bits", 16) == 16 and dataset in r["perplexity"] and r.get("effective_bits") is not None]
    out = []
    for budget in budgets:
        best = {}
        for r in usable:
            gap = r["perplexity"][dataset] - base
            if r["effective_bits"] <= budget and (r["kind"] not in best or gap < best[r["kind"]][0]):
                best[r["kind"]] = (gap, r)
        if "recipe" in best and "peer" in best:
            (lg, lr), (pg, pr) = best["recipe"], best["peer"]
            out.append({"budget": budget, "lowbit": lr["name"], "lowbit_bits": lr["effective_bits"], "lowbit_gap": lg,
                        "peer": pr["name"], "peer_bits": pr["effective_bits"], "peer_gap": pg,
                        "ratio": lg / pg if pg > 0 else None})
    return out


def ratio_line(g: dict) -> str:
    return (f"≤ {g['budget']} bits: {g['lowbit']} ({g['lowbit_bits']:.2f} bits) {g['lowbit_gap']:+.3f} vs "
            f"{g['peer']} ({g['peer_bits']:.2f} bits) {g['peer_gap']:+.3f} → {_num(g['ratio'], '.3g')}")


def _protocol_lines(cfg: CompareConfig) -> list[str]:
    win = "all" if cfg.windows is None else f"first {cfg.windows}"
    return [f"model: `{cfg.model}`",
            f"calibration: {cfg.nsamples} × {cfg.calib_seqlen} tokens of {cfg.calib_dataset} (seed {cfg.seed}), "
            "the same samples for every row",
            f"evaluation: {', '.join(cfg.datasets)}, {win} windows of {cfg.eval_seqlen} tokens; "
            f"KL(full ‖ row) on {cfg.datasets[0]}" + ("" if cfg.kl else " (off)")
            + (f", first {cfg.kl_window_count()} windows" if cfg.kl and cfg.kl_window_count() != cfg.windows else ""),
            "overrides: " + (", ".join(f"`{o}`" for o in cfg.overrides) or "none")]


def write_report(rows: list[dict], cfg: CompareConfig, out: Path) -> tuple[Path, Path]:
    d0 = cfg.datasets[0]
    fp = full_model_row(rows)
    figures = [("Perplexity vs effective bits", plot_pareto(rows, d0, fp["perplexity"][d0] if fp else None,
                                                             out / "pareto.png")),
               ("Per-layer relative output error over depth, by layer type",
                plot_layer_errors(rows, out / "layer_error.png")),
               ("Quantization time per block", plot_block_times(rows, out / "block_time.png"))]
    figures = [(title, p) for title, p in figures if p is not None]
    head, body = table(rows, cfg)
    ratios = gap_ratios(rows, d0)
    (out / "gap_ratios.json").write_text(json.dumps(ratios, indent=1))

    md = ["# lowbit compare", "", *[f"- {line}" for line in _protocol_lines(cfg)], "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    if ratios:
        md += ["", f"Gap ratio per storage budget (lowbit's best {d0} perplexity gap ÷ the best peer's, among the "
               "weight-only rows that store no more bits per weight than the budget):", ""]
        md += [f"- {ratio_line(g)}" for g in ratios]
    for title, p in figures:
        md += ["", f"## {title}", "", f"![{title}]({p.name})"]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    esc = html.escape
    rows_html = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    ratio_html = "".join(f"<li>{esc(ratio_line(g))}</li>" for g in ratios)
    figs_html = "\n".join(f"<h2>{esc(t)}</h2><img src='{p.name}' alt='{esc(t)}'>" for t, p in figures)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lowbit compare — {esc(cfg.model)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}
table{{border-collapse:collapse;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}tr:nth-child(even){{background:#f6f6f6}}img{{max-width:100%}}</style>
</head><body><h1>lowbit compare</h1>
<ul>{''.join(f'<li>{esc(line)}</li>' for line in _protocol_lines(cfg))}</ul>
<table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead>
<tbody>
{rows_html}
</tbody></table>
{f'<h2>Gap ratio ({esc(d0)})</h2><ul>{ratio_html}</ul>' if ratios else ''}
{figs_html}
</body></html>
"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return md_path, html_path
