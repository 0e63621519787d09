"""Exports of SmolLM2-135M checkpoints, read back by the engines that serve them: WikiText-2 perplexity of the
first 8 windows of 2048 tokens from lowbit's own runtime model and from each consumer on the same token
windows, with size on disk and load time.

Checkpoints use the quick protocol's calibration (``--nsamples 16``, 2048 tokens, C4); perplexity is over the
first 8 WikiText-2 windows (Q16/8). Consumers: ``transformers`` + ``compressed-tensors`` (the
dequantize-on-load path for asymmetric grids, whose zero points transformers' default path cannot
shape), ``transformers`` → optimum → GPTQModel (its torch kernel; GPTQModel must be installed, see the README),
``transformers``' GGUF reader, and llama.cpp through ``llama-cpp-python`` (logits of every
position, scored here exactly as lowbit scores them: next-token NLL of tokens 2…2048 of each window).
Each row is written to the JSON as it lands; a rerun skips finished rows.

    OMP_NUM_THREADS=1 python bench/exports.py --out bench/results/exports.json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "exports-bench"
WINDOWS, SEQLEN = 8, 2048
# checkpoint -> (preset, overrides, formats)
CASES = {
    "gptq-q4_0": ("gptq-q4_0", [], ["gguf", "compressed-tensors"]),
    "gptq-w4g64": ("gptq-w4g128", ["weights.group_size=64", "weights.act_order=false"], ["compressed-tensors"]),
    "gptq-w4g128": ("gptq-w4g128", [], ["gptq"]),  # act-order, a smaller last group on the 576-wide layers
    "rtn-w4g128": ("rtn-w4g128", [], ["gguf"]),
    "quip-w4": ("quip-w4", [], ["dense"]),
}


def _run(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"lowbit {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1]}")


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _nll_torch(model, windows) -> float:
    import torch
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None], use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
    return total


def _nll_llama_cpp(gguf_file: Path, windows) -> tuple[float, float]:
    import llama_cpp
    import numpy as np
    import torch
    import torch.nn.functional as F

    start = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=SEQLEN, n_batch=512, logits_all=True, verbose=False, n_threads=1)
    load = time.perf_counter() - start
    total = 0.0
    for w in windows:
        llm.reset()
        llm.eval(w.tolist())
        logits = torch.from_numpy(np.array(llm.scores[: SEQLEN - 1], dtype=np.float32))
        total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
    llm.close()
    return total, load


def measure(case: str, engine: str, windows) -> dict:
    """One (checkpoint, reader) row: perplexity over ``windows``, load time, size of what was read."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import lowbit

    ckpt = RUNS / case
    start = time.perf_counter()
    if engine == "lowbit":
        model, _ = lowbit.load_model(ckpt)
        size = _size_mb(ckpt)
    elif engine == "llama.cpp":
        (gguf_file,) = (RUNS / f"{case}.gguf").glob("*.gguf")
        nll, load = _nll_llama_cpp(gguf_file, windows)
        return {"load_s": load, "size_mb": gguf_file.stat().st_size / 2**20, "nll": nll}
    elif engine == "transformers-gguf":
        (gguf_file,) = (RUNS / f"{case}.gguf").glob("*.gguf")
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        size = gguf_file.stat().st_size / 2**20
    elif engine == "transformers-ct":
        folder = RUNS / f"{case}.compressed-tensors"
        sym = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
        kwargs = {} if sym["weights"]["symmetric"] else {
            "quantization_config": CompressedTensorsConfig(dequantize=True)}
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        size = _size_mb(folder)
    elif engine == "transformers-gptq":  # optimum + GPTQModel's torch kernel
        from transformers import GPTQConfig

        folder = RUNS / f"{case}.gptq"
        bits = json.loads((folder / "quantize_config.json").read_text())["bits"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                                     quantization_config=GPTQConfig(bits=bits, backend="torch"))
        size = _size_mb(folder)
    else:  # transformers-dense
        folder = RUNS / f"{case}.dense"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        size = _size_mb(folder)
    load = time.perf_counter() - start
    return {"load_s": load, "size_mb": size, "nll": _nll_torch(model.eval(), windows)}


ENGINES = {"gguf": ["transformers-gguf", "llama.cpp"], "compressed-tensors": ["transformers-ct"],
           "gptq": ["transformers-gptq"], "dense": ["transformers-dense"]}


def _table(rows: list[dict]) -> str:
    lines = ["| checkpoint | read by | format | WikiText-2 ppl (8×2048) | vs lowbit | size MB | load s |",
             "|---|---|---|---|---|---|---|"]
    base = {r["case"]: r["ppl"] for r in rows if r["engine"] == "lowbit"}
    for r in rows:
        rel = f"{100 * (r['ppl'] / base[r['case']] - 1):+.2f} %" if r["case"] in base else "-"
        lines.append(f"| {r['case']} | {r['engine']} | {r['format']} | {r['ppl']:.3f} | {rel} | "
                     f"{r['size_mb']:.1f} | {r['load_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "exports.json")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    import torch

    import lowbit
    from lowbit.data.protocol import eval_windows

    torch.set_num_threads(1)
    done = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    have = {(r["case"], r["engine"]) for r in done}
    windows = None
    for case in args.cases:
        preset, sets, formats = CASES[case]
        ckpt = RUNS / case
        if not (ckpt / "lowbit_config.json").exists():
            _run("quantize", "smollm2-135m", "--recipe", preset, *[a for s in sets for a in ("--set", s)],
                 "--nsamples", "16", "--out", str(ckpt))
        for fmt in formats:
            target = RUNS / f"{case}.{fmt}"
            if not target.exists():
                _run("export", str(ckpt), str(target), "--format", fmt)
        for engine in ["lowbit"] + [e for f in formats for e in ENGINES[f]]:
            if (case, engine) in have:
                continue
            if windows is None:
                _, tok = lowbit.load_model(ckpt)
                windows = eval_windows("wikitext2", tok, SEQLEN, WINDOWS, "llama")
            fmt = "lowbit" if engine == "lowbit" else next(f for f in formats if engine in ENGINES[f])
            row = {"case": case, "engine": engine, "format": fmt, **measure(case, engine, windows)}
            row["ppl"] = math.exp(row["nll"] / (windows.shape[0] * (SEQLEN - 1)))
            done.append(row)
            args.out.write_text(json.dumps({"protocol": "Q16/8: --nsamples 16 calibration, first 8 WikiText-2 "
                                            "windows of 2048", "rows": done}, indent=1))
            print(_table(done).splitlines()[-1], flush=True)
    args.out.with_suffix(".md").write_text(_table(done) + "\n")
    print(_table(done))


if __name__ == "__main__":
    main()
