"""How long each bad-input error of the CLI tests takes, as a whole process (goal: under 2 s wall).

Runs every case of ``tests/test_cli.py``'s ``BAD_INPUTS`` (plus ``--help`` and ``--version``) as
``python -m lowbit.cli …`` from the repository root, one warm-up and ``--runs`` counted runs each,
and records the median wall time, the CPU time and the peak resident memory of the process;
writes a table (Markdown) and JSON:

    python bench/cli_errors.py --out bench/results/cli-errors.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bad_inputs() -> list[list[str]]:
    spec = importlib.util.spec_from_file_location("test_cli", REPO / "tests" / "test_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [["--help"], ["--version"], *[args for args, _ in module.BAD_INPUTS]]


def _run(args: list[str]) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one ``lowbit`` process, and its exit code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], cwd=REPO, capture_output=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024, r.returncode  # ru_maxrss: the largest child so far


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON file; the table goes beside it as .md")
    args = p.parse_args()
    rows = []
    for case in _bad_inputs():
        _run(case)  # warm-up: file cache, bytecode
        runs = [_run(case) for _ in range(args.runs)]
        rows.append({"args": case, "exit_code": runs[-1][3], "wall_s_median": statistics.median(r[0] for r in runs),
                     "wall_s_max": max(r[0] for r in runs), "cpu_s_median": statistics.median(r[1] for r in runs)})
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = ["| command | exit | wall s (median) | wall s (max) | CPU s (median) |", "|---|---|---|---|---|"]
    lines += [f"| `lowbit {' '.join(r['args'])}` | {r['exit_code']} | {r['wall_s_median']:.2f} | "
              f"{r['wall_s_max']:.2f} | {r['cpu_s_median']:.2f} |" for r in rows]
    slowest = max(r["wall_s_max"] for r in rows)
    lines += ["", f"{len(rows)} commands × {args.runs} runs; slowest run {slowest:.2f} s; largest process "
              f"{peak:.0f} MB resident; {os.cpu_count()} CPUs, Python {platform.python_version()}"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": args.runs, "largest_process_mb": peak, "rows": rows}, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
