"""Collect the ``--onload`` Q16/8 rows on SmolLM2 from their run logs into ``bench/results/onload-smollm2-q16.json``.

Each log holds one ``lowbit quantize smollm2-135m -r RECIPE --nsamples 16 --onload -o runs/onload-q16/NAME``
followed by ``lowbit eval runs/onload-q16/NAME --onload --ppl wikitext2,c4 --windows 8 --json``:

    python bench/experiments/onload_rows.py runs/onload-q16/gptq-w4g128.log runs/onload-q16/quip-w3.log
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "results" / "onload-smollm2-q16.json"  # bench/results/
PROTOCOL = "Q16/8: 16 x 2048 C4 calibration tokens (seed 0); the first 8 WikiText-2 and C4 windows of 2048 tokens"


def row(log: Path) -> dict:
    text = log.read_text()
    ppl = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])["perplexity"]
    saved = re.search(r"saved (\S+) checkpoint .*quantization ([\d.]+) s", text)
    peaks = re.findall(r"peak memory (\d+) MB \(whole process\)", text)
    dtype = re.search(r"onloading one block at a time in (\w+)", text).group(1)
    recipe = saved.group(1)
    return {"recipe": recipe, "dtype": dtype, "quant_seconds": float(saved.group(2)), "quant_peak_mb": int(peaks[0]),
            "eval_peak_mb": int(peaks[1]), "perplexity": {d: v["ppl"] for d, v in ppl.items()},
            "commands": [f"lowbit quantize smollm2-135m -r {recipe} --nsamples 16 --onload"
                         + (f" --dtype {dtype}" if dtype != "float32" else "") + f" -o runs/onload-q16/{log.stem}",
                         f"lowbit eval runs/onload-q16/{log.stem} --onload --ppl wikitext2,c4 --windows 8 --json"]}


def main() -> None:
    data = json.loads(OUT.read_text()) if OUT.exists() else {"protocol": PROTOCOL, "rows": {}}
    for log in map(Path, sys.argv[1:]):
        data["rows"][log.stem] = row(log)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data["rows"], indent=1))


if __name__ == "__main__":
    main()
