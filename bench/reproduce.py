"""Do the committed Q16/8 numbers still come out? Re-run a fixed subset of rows and diff them.

One preset per method (rtn, gptq, quip, oac from the comparison report; aser, rptq from their quality
runs) is run again by the same command that made its committed row, under the quick protocol Q16/8
(16 x 2048 C4 calibration tokens, seed 0; the first 8 WikiText-2 and C4 windows), one thread. Each
row's perplexities are compared with the committed ones: ``printed`` = equal to the 3 decimals the
benchmark page prints, ``exact`` = the same float. Rows land in ``bench/results/reproduce.json`` as
they finish, each with the commit it ran at; a rerun skips the rows already there (``--fresh`` runs them again).

    OMP_NUM_THREADS=1 python bench/reproduce.py [--rows gptq-w4g128,oac-w2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from lowbit.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "reproduce.json"
RUNS = Path("runs") / "reproduce"
COMPARE = RESULTS / "compare-smollm2-q16" / "results.json"
Q = ["--nsamples", "16", "--windows", "8"]
# row -> the committed results file it came from ("compare": the comparison report)
ROWS = {"rtn-w4g128": "compare", "gptq-w4g128": "compare", "quip-w4": "compare", "quip-w3": "compare",
        "oac-w2": "compare", "aser-w4a8": "aser-quick-main.json", "rptq-w4a8": "rptq-quick-rptq.json"}
DATASETS = ("wikitext2", "c4")


def committed(row: str) -> dict[str, float]:
    if ROWS[row] == "compare":
        rows = json.loads(COMPARE.read_text())["rows"]
        return next(r["perplexity"] for r in rows if r["name"] == row)
    rows = json.loads((RESULTS / ROWS[row]).read_text())["rows"]
    found = next(r for r in rows if r["recipe"] == row and not r.get("overrides"))
    return {d: found[d] for d in DATASETS}


def rerun(row: str) -> tuple[dict[str, float], list[str]]:
    """The row's perplexities now, by the command that made the committed one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if ROWS[row] == "compare":
        report = RUNS / "compare"  # one report: the full model's row is run once and cached
        cmd = ["lowbit", "compare", "smollm2-135m", "--recipes", row, "--report", str(report), *Q]
        subprocess.run([sys.executable, "-m", "lowbit.cli", *cmd[1:]], check=True, env=env, cwd=ROOT)
        rows = json.loads((ROOT / report / "results.json").read_text())["rows"]
        return next(r["perplexity"] for r in rows if r["name"] == row), cmd
    out = RUNS / f"{row}.json"
    cmd = ["python", "bench/quality.py", "--recipes", row, *Q, "--datasets", ",".join(DATASETS), "--out", str(out)]
    subprocess.run([sys.executable, *cmd[1:]], check=True, env=env, cwd=ROOT)
    found = next(r for r in json.loads((ROOT / out).read_text())["rows"] if r["recipe"] == row)
    return {d: found[d] for d in DATASETS}, cmd


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip()


def table(data: dict) -> str:
    lines = [f"Q16/8 rows re-run against the committed numbers ({data['protocol']}).", "",
             "| row | run at | committed wikitext2 / c4 | now | printed digits equal | exact |",
             "|---|---|---|---|---|---|"]
    for name, r in data["rows"].items():
        c, n = r["committed"], r["now"]
        lines.append(f"| {name} | {r['commit']} | {c['wikitext2']:.3f} / {c['c4']:.3f} | {n['wikitext2']:.3f} / "
                     f"{n['c4']:.3f} | {'yes' if r['printed'] else '**no**'} | {'yes' if r['exact'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma separated, of: {', '.join(ROWS)}")
    p.add_argument("--fresh", action="store_true", help="re-run rows already recorded for this commit")
    args = p.parse_args()
    wanted = args.rows.split(",")
    if unknown := [r for r in wanted if r not in ROWS]:
        sys.exit(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    data = json.loads(OUT.read_text()) if OUT.exists() else {"protocol": "Q16/8, one thread", "rows": {}}
    for row in wanted:
        if row in data["rows"] and not args.fresh:
            continue
        now, cmd = rerun(row)
        old = committed(row)
        data["rows"][row] = {"commit": commit(), "committed": old, "now": now, "command": " ".join(cmd),
                             "printed": all(round(now[d], 3) == round(old[d], 3) for d in DATASETS),
                             "exact": all(now[d] == old[d] for d in DATASETS)}
        atomic_write_text(OUT, json.dumps(data, indent=1) + "\n")  # each row as it lands, whole or not at all
        atomic_write_text(OUT.with_suffix(".md"), table(data))
        print(table(data), flush=True)


if __name__ == "__main__":
    main()
