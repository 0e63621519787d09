"""Write BENCHMARKS.md, the page users read, from the committed results under ``bench/results/`` alone.

    python bench/page.py            # rewrites BENCHMARKS.md
    python bench/page.py --check    # exit 1 if BENCHMARKS.md is not what the results give (CI runs this)

Every number on the page is read from a results file named next to it; nothing is typed in. The lab
notes (how each number was found, dead ends, reruns) live in ``docs/experiments/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.compare.report import gap_ratios, ratio_line

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "BENCHMARKS.md"
COMPARE = "compare-smollm2-q16/results.json"
# later rows under the same protocol, run as their own comparison (the full model's row reused from COMPARE)
MORE_COMPARES = ("compare-smollm2-q16-tuned/results.json", "compare-smollm2-q16-quarot/results.json")
# W4A8 and W4A4KV4 rows were measured by bench/quality.py (same Q16/8 protocol, no KL)
ACTIVATION_RUNS = ("aser-quick-main.json", "rptq-quick-rptq.json", "rptq-quick-naive.json")
CLASSES = ("W4", "W3", "W2", "W1", "W4A8", "W4A4", "W4A4KV4")
FULL = RESULTS / "full-protocol"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def compare_rows() -> list[tuple[str, dict]]:
    """Every comparison row, each once (a later report's reused full-model row is the first report's)."""
    seen: set[str] = set()
    out = []
    for name in (COMPARE, *MORE_COMPARES):
        if (RESULTS / name).exists():
            for r in _load(name)["rows"]:
                if r["name"] not in seen:
                    seen.add(r["name"])
                    out.append((name, r))
    return out


def _class(w_bits: int, a_bits: int, kv_bits: int) -> str | None:
    if a_bits >= 16 and kv_bits >= 16:
        return f"W{w_bits}"
    if w_bits == 4 and a_bits == 8 and kv_bits >= 16:
        return "W4A8"
    if w_bits == 4 and a_bits == 4:
        return "W4A4KV4" if kv_bits == 4 else "W4A4" if kv_bits >= 16 else None
    return None


def _gptq_7b() -> list[str]:
    """gptq-w4g128 at the 7B shape has only partial runs (4 h on this CPU): their peaks, newest last."""
    rows = sorted((json.loads(f.read_text()) for f in RESULTS.glob("scale-7b-gptq-partial*.json")),
                  key=lambda r: r.get("date", "2026-12-07"))
    lines = [f"- gptq-w4g128, {len(r['blocks_done'])} of 32 blocks ({r.get('date', '2026-12-07')}): peak "
             f"{r['peak_memory_mb']:.0f} MB, {sum(r['block_seconds'].values()) / len(r['block_seconds']):.0f} s per "
             f"block" for r in rows]
    return ["Partial runs (`bench/results/scale-7b-gptq-partial*.json`; the peak is GPTQ's, reached in every block):",
            "", *lines] if lines else []


def quick_rows() -> dict[str, list[dict]]:
    """Every Q16/8 row, by bit-width class: name, peer or not, effective bits, perplexities, KL, cost."""
    out: dict[str, list[dict]] = {c: [] for c in CLASSES}
    for source, r in compare_rows():
        if r["status"] != "ok" or r["name"] == "fp" or (c := _class(r["w_bits"], r["a_bits"], r["kv_bits"])) is None:
            continue
        name = r["name"] + (f" ({r['iters']} iters)" if "iters" in r else "")
        out[c].append({"name": name, "peer": r["kind"] == "peer", "bits": r["effective_bits"],
                       "wikitext2": r["perplexity"]["wikitext2"], "c4": r["perplexity"]["c4"], "kl": r.get("kl"),
                       "seconds": r["quant_seconds"], "mb": r["peak_memory_mb"], "source": source})
    for f in ACTIVATION_RUNS:
        for r in _load(f)["rows"]:
            c = _class(r["bits"], r["a_bits"], r["kv_bits"])
            if r.get("overrides") or c is None:
                continue
            out[c].append({"name": r["recipe"], "peer": False, "bits": r["effective_bits"], "wikitext2": r["wikitext2"],
                           "c4": r["c4"], "kl": None, "seconds": r["quant_seconds"],
                           "mb": r["quant_peak_memory_mb"], "source": f})
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{digits}e}" if abs(x) >= 1e5 else f"{x:.{digits}f}"


def _bold_best(rows: list[dict], key: str) -> set[int]:
    values = [r[key] for r in rows if r[key] is not None]
    return {i for i, r in enumerate(rows) if values and r[key] == min(values)}


def class_table(rows: list[dict]) -> list[str]:
    """One class's rows, best (lowest) per column in bold."""
    rows = sorted(rows, key=lambda r: r["wikitext2"])
    cols = (("wikitext2", 3), ("c4", 3), ("kl", 3), ("seconds", 0), ("mb", 0))
    best = {k: _bold_best(rows, k) for k, _ in cols}
    lines = ["| preset | by | eff. bits | WikiText-2 | C4 | KL | quantize s | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        cells = [f"**{_fmt(r[k], d)}**" if i in best[k] else _fmt(r[k], d) for k, d in cols]
        by = "peer" if r["peer"] else "lowbit"
        lines.append(f"| {r['name']} | {by} | {r['bits']:.3f} | " + " | ".join(cells) + " |")
    return lines


def summary(classes: dict[str, list[dict]], fp: dict[str, float]) -> list[str]:
    """The first screen: per class, lowbit's best preset and its cost, and the best peer beside it — at any
    storage in the class, and at no more effective bits than that peer (the fair comparison)."""
    lines = ["| bits | best lowbit preset | WikiText-2 / C4 | eff. bits | quantize s | best peer | its WikiText-2 / C4 "
             "(eff. bits) | lowbit's best at ≤ the peer's bits | gap to FP, lowbit ÷ peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    gap = lambda r: r["wikitext2"] - fp["wikitext2"]  # noqa: E731
    for c, rows in classes.items():
        ours = [r for r in rows if not r["peer"]]
        if not ours:
            continue
        o = min(ours, key=gap)
        head = (f"| {c} | {o['name']} | {_fmt(o['wikitext2'])} / {_fmt(o['c4'])} | {o['bits']:.3f} | "
                f"{o['seconds']:.0f} | ")
        peers = [r for r in rows if r["peer"]]
        if not peers:
            lines.append(head + "– (none run) | – | – | – |")
            continue
        p = min(peers, key=gap)
        fair = [r for r in ours if r["bits"] <= p["bits"] + 1e-9]
        f = min(fair, key=gap) if fair else None
        lines.append(head + f"{p['name']} | {_fmt(p['wikitext2'])} / {_fmt(p['c4'])} ({p['bits']:.3f}) | "
                     + (f"{f['name']} ({f['bits']:.3f}): {_fmt(f['wikitext2'])} | {gap(f) / gap(p):.2f} |" if f
                        else "– (none that small) | – |"))
    return lines


def full_rows() -> list[str]:
    """The papers' protocol: every row under bench/results/full-protocol/ (all 148 / 254 windows)."""
    lines = ["| recipe | WikiText-2 | C4 | KL (first 16 WikiText-2 windows) | quantize s | peak MB |",
             "|---|---|---|---|---|---|"]
    rows = []
    for d in sorted(p for p in FULL.iterdir() if p.is_dir()):
        ppl: dict[str, float] = {}
        for f in ("eval.json", "eval-wikitext2.json"):
            if (d / f).exists():
                ppl.update({k: v["ppl"] for k, v in json.loads((d / f).read_text())["perplexity"].items()})
        kl_file = d / "eval-kl16.json"
        kl = json.loads(kl_file.read_text())["kl"]["wikitext2"] if kl_file.exists() else None
        rep = json.loads((d / "report.json").read_text()) if (d / "report.json").exists() else {}
        rows.append((ppl.get("wikitext2", float("inf")), d.name, ppl, kl, rep))
    for _, name, ppl, kl, rep in sorted(rows):
        sec = f"{rep['total_seconds']:.0f}" if rep.get("total_seconds") else "–"
        mb = f"{rep['peak_memory_mb']:.0f}" if rep.get("peak_memory_mb") else "–"
        lines.append(f"| {name} | {_fmt(ppl.get('wikitext2'))} | {_fmt(ppl.get('c4')) if 'c4' in ppl else 'not run'} | "
                     f"{_fmt(kl)} | {sec} | {mb} |")
    return lines


def _embed(name: str) -> list[str]:
    """A maintained benchmark's own table (written by its script), dropped in as it is."""
    text = (RESULTS / name).read_text().strip().splitlines()
    return [line for line in text if not line.startswith("# ")]


def page() -> str:
    compare = _load(COMPARE)
    fp = next(r["perplexity"] for r in compare["rows"] if r["name"] == "fp")
    classes = quick_rows()
    out = ["# Benchmarks", "",
           "<!-- generated by `python bench/page.py` from bench/results/; edit the script, not this page -->", "",
           "SmolLM2-135M on a 2-core CPU (torch 2.13.0, float32, one thread per row), under the quick protocol",
           "**Q16/8**: 16 × 2048 C4 calibration tokens (GPTQ's sampling, seed 0), the first 8 WikiText-2 and C4",
           "windows of 2048 tokens. Full precision: WikiText-2 "
           f"{_fmt(fp['wikitext2'])}, C4 {_fmt(fp['c4'])}. Lower is better everywhere; best per column in bold.", "",
           "## Best preset per bit width", "", *summary(classes, fp), "",
           "The last column: the WikiText-2 perplexity lost to quantization by lowbit's best preset that stores no "
           "more bits per weight than the best peer, divided by the peer's loss (below 1: lowbit is better). "
           "The same per storage budget, as `lowbit compare` reports it (rows above a budget never count):", "",
           *[f"- {ratio_line(g)}" for g in gap_ratios([r for _, r in compare_rows()], "wikitext2")], "",
           "Reproduce a row: `lowbit compare smollm2-135m --recipes gptq-w4g128 --report runs/q16 --nsamples 16 "
           "--windows 8` (add `--peers autoround@w4g128` for a peer; extra `peers`). Check that the committed numbers "
           "still come out: `python bench/reproduce.py` (" + _reproduce_line() + ").", "",
           "![perplexity against effective bits](bench/results/compare-smollm2-q16/pareto.png)", "",
           "## Every Q16/8 row, by bit width", ""]
    for c, rows in classes.items():
        if rows:
            srcs = sorted({r["source"] for r in rows})
            out += [f"### {c}", "", *class_table(rows), "", "From " + ", ".join(f"`bench/results/{s}`" for s in srcs)
                    + ".", ""]
    out += ["## Full protocol (the papers': 128 × 2048 calibration, all 148 WikiText-2 and 254 C4 windows)", "",
            *full_rows(), "", "From `bench/results/full-protocol/<recipe>/` (`eval.json`, `eval-kl16.json`, "
            "`report.json`); each row by `python bench/full_row.py RECIPE --work runs`.", "",
            "## Runtime on the CPU (decode and prefill, packed checkpoints)", "", *_embed("runtime.md"), "",
            "From `bench/results/runtime.json` (`python bench/runtime.py`).", "",
            "## Exports read back by serving engines", "", *_embed("exports.md"), "",
            "From `bench/results/exports.json` (`python bench/exports.py`).", "",
            "## Models larger than memory (random weights at the Llama-2-7B shape)", "", *_embed("scale-7b.md"), "",
            "From `bench/results/scale-7b.json` (`python bench/scale.py --shape 7b`).", "", *_gptq_7b(), "",
            *_reproduce_section(),
            "## Caveats", "",
            "- Q16/8 is a quick protocol: 8 windows are 16k tokens, so differences under about 1 % of perplexity "
            "are noise between presets (not between runs: a run is deterministic for a fixed seed and thread count).",
            "- SmolLM2-135M comes from a GGUF file whose linear weights were already on a 4-bit grid (Q4_1, groups "
            "of 32): the \"full precision\" reference is that dequantized model, which flatters 4-bit rounding on "
            "groups that line up with it.",
            "- auto-round rows ran its light recipe (the iterations are in the row's name), not its default 200 "
            "steps, which did not fit on this CPU.",
            "- W4A8 and W4A4KV4 rows were measured by `bench/quality.py` on the fake-quantized model (no KL); "
            "the other rows by `lowbit compare`.",
            "- Times are CPU times of one or two threads per row, often with another row on the second core (each "
            "row's `threads` is in its results file); compare them as ratios, not across machines.",
            "- A comparison row is cached by its recipe and protocol, not by the code that ran it: rows that code "
            "changes moved are found by `bench/reproduce.py` and replaced by their reruns (2026-12-07: quip-w2, "
            "quip-w3, quip-w4 and oac-w2; `docs/experiments/2026-12-07-engine-and-tuning.md`).",
            "- quip-w2-tuned ran at 11f5c58, before tuned scales were kept as float16 (f0dc204): the model it "
            "evaluated and the checkpoint it wrote differ by at most one float16 step per group scale.", "",
            "How each number was found, and what did not work: the dated notes in `docs/experiments/`.", ""]
    return "\n".join(out)


def _reproduce_section() -> list[str]:
    if not (RESULTS / "reproduce.md").exists():
        return []
    return ["## Do the committed numbers still come out?", "", *_embed("reproduce.md"), "",
            "From `bench/results/reproduce.json` (`python bench/reproduce.py`). A row marked **no** was a cached "
            "row that older code made (its recipe's bytes are the same before and after the change being checked: "
            "`bench/results/same-codes-7a64984.json`); the comparison report now holds the rerun.", ""]


def _reproduce_line() -> str:
    path = RESULTS / "reproduce.json"
    if not path.exists():
        return "not run yet"
    rows = json.loads(path.read_text())["rows"]
    same = [n for n, r in rows.items() if r["printed"]]
    return f"last run: {len(same)} of {len(rows)} rows equal to every printed digit, `bench/results/reproduce.md`"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail if BENCHMARKS.md differs from what the results give")
    text = page()
    if p.parse_args().check:
        if PAGE.read_text() != text:
            sys.exit("BENCHMARKS.md is not what bench/results/ gives: run python bench/page.py and commit it")
        return
    PAGE.write_text(text)


if __name__ == "__main__":
    main()
