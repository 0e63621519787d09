"""Replace rows of a committed comparison report by reruns under the same key and protocol (or add rows it does
not have yet), then rebuild the report (report.md/html, gap ratios, figures) from its rows with
``write_report``. How the stale quip-w2, quip-w3, quip-w4 and oac-w2 rows were replaced on 2026-12-07, and a
new row added to the tuned report on 2026-12-08:

    python bench/experiments/replace_rows.py runs/reproduce/compare/results.json quip-w3 oac-w2 quip-w4
    python bench/experiments/replace_rows.py runs/tuned-q16/results.json quip-w2
    COMMITTED=bench/results/compare-smollm2-q16-tuned python bench/experiments/replace_rows.py \
        runs/tuned-q16-w4/results.json quip-w4-tuned

A row is replaced only when the rerun's key equals the committed row's and its perplexities differ; a named
row the report lacks is added.
"""
import json
import os
import sys
from pathlib import Path

from lowbit.compare.config import CompareConfig
from lowbit.compare.report import write_report

committed = Path(os.environ.get("COMMITTED", "bench/results/compare-smollm2-q16"))
rerun = json.loads(Path(sys.argv[1]).read_text())
data = json.loads((committed / "results.json").read_text())
fresh = {r["name"]: r for r in rerun["rows"]}
assert rerun["protocol"] == data["protocol"]
changed = []
for i, r in enumerate(data["rows"]):
    n = fresh.get(r["name"])
    if n is not None and n["key"] == r["key"] and r["name"] in sys.argv[2:] and n["perplexity"] != r["perplexity"]:
        data["rows"][i] = n
        changed.append(r["name"])
have = {r["name"] for r in data["rows"]}
for name in sys.argv[2:]:
    if name not in have and name in fresh:
        data["rows"].append(fresh[name])
        changed.append(name)
(committed / "results.json").write_text(json.dumps(data, indent=1) + "\n")
p = data["protocol"]
cfg = CompareConfig(model=p["model"], recipes=[r["name"] for r in data["rows"] if r["kind"] == "recipe"],
                    peers=[r["name"] for r in data["rows"] if r["kind"] == "peer"], calib_dataset=p["calib_dataset"],
                    nsamples=p["nsamples"], calib_seqlen=p["calib_seqlen"], seed=p["seed"], datasets=p["datasets"],
                    windows=p["windows"], eval_seqlen=p["eval_seqlen"], kl=p["kl"])
write_report(data["rows"], cfg, committed)
print("replaced", changed)
