"""Prefill and decode speed and memory of SmolLM2-135M: float32, bfloat16 and packed checkpoints, with the
reference path (float32, dequantize on every call) and with the CPU kernel back-ends (bfloat16 activations,
lowbit.runtime.kernels: a layer uses its kernel for at most 256 rows, so prefill of 512 tokens takes the
reference path and decoding the kernel).

Each measurement is its own process (so resident memory is that model's alone), one thread; the
configurations are interleaved round by round, so drift on the machine hits all of them alike, and
the median over rounds is reported. Per process: load time, resident memory after loading (freed heap
handed back first), peak
resident memory, prefill of the first 512 WikiText-2 test tokens (tokens/s), then 64 greedy decode
steps on that cache (tokens/s).

Checkpoints are made first if missing (under ``runs/runtime-bench/``) with a small calibration
(``--nsamples 4 --seqlen 512``): speed and memory do not depend on it, quality is not measured here.

    OMP_NUM_THREADS=1 python bench/runtime.py --rounds 3 --out bench/results/runtime.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
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
RUNS = REPO / "runs" / "runtime-bench"
# checkpoint name -> preset and overrides
RECIPES = {"rtn-w4g128": ("rtn-w4g128", []), "gptq-w4g64": ("gptq-w4g128", ["weights.group_size=64"]),
           "quip-w4": ("quip-w4", []), "rtn-w3g128": ("rtn-w3g128", []),
           "rtn-q4_0": ("rtn-w4", ["weights.symmetric=true", "weights.group_size=32"])}
# llama.cpp anchors (llama-cpp-python, extra `llama`): lowbit's rtn-q4_0 exported to GGUF Q4_0, and the
# source model's own GGUF file (Q4_1 linears, Q8_0 embedding)
LLAMA_CPP = {"llama.cpp:rtn-q4_0": "export", "llama.cpp:source-q4_1": "source"}
PREFILL, DECODE = 512, 64


def configs() -> list[str]:
    """``float32``, ``bfloat16``, and per recipe ``RECIPE:reference`` (float32, dequantize per call) and
    ``RECIPE:kernels`` (bfloat16 activations, CPU kernels where a layer takes one)."""
    configs = ["float32", "bfloat16"] + [f"{r}:{b}" for r in RECIPES for b in ("reference", "kernels")]
    return configs + (list(LLAMA_CPP) if importlib.util.find_spec("llama_cpp") else [])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _gguf_file(config: str) -> Path:
    if LLAMA_CPP[config] == "source":
        from lowbit.models.aliases import ALIASES

        return ALIASES["smollm2-135m"].gguf_path()
    return next((RUNS / "rtn-q4_0-gguf").glob("*.gguf"))


def measure_llama_cpp(config: str) -> dict:
    """The same prefill and greedy decode in llama.cpp, one thread."""
    import llama_cpp
    import numpy as np

    import lowbit
    from lowbit.data import eval_windows

    t0 = time.perf_counter()
    # logits of every position, as the transformers rows compute them in prefill
    llm = llama_cpp.Llama(str(_gguf_file(config)), n_ctx=PREFILL + DECODE + 16, n_batch=PREFILL, n_threads=1,
                          n_threads_batch=1, logits_all=True, verbose=False)
    load_s = time.perf_counter() - t0
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_loaded = _rss_mb()
    _, tok = lowbit.load_model(RUNS / "rtn-q4_0")  # the same tokens as every other row
    ids = eval_windows("wikitext2", tok, seqlen=PREFILL, windows=1)[0].tolist()
    llm.eval(ids[:16])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(DECODE):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    decode_s = time.perf_counter() - t0
    llm.close()
    return {"config": config, "load_s": load_s, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prefill_tok_s": PREFILL / prefill_s, "decode_tok_s": DECODE / decode_s, "backends": {}}


def measure(config: str) -> dict:
    """One configuration, in this process."""
    if config in LLAMA_CPP:
        return measure_llama_cpp(config)
    import torch

    import lowbit
    from lowbit.data import eval_windows
    from lowbit.runtime.build import use_kernels

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if config in ("float32", "bfloat16"):
        model, tok = lowbit.load_model("smollm2-135m", dtype=getattr(torch, config))
        backends = {}
    else:
        recipe, backend = config.split(":")  # kernels: bfloat16 activations (the CPU kernels' fast inputs)
        model, tok = lowbit.load_model(RUNS / recipe, dtype=torch.bfloat16 if backend == "kernels" else None)
        backends = use_kernels(model, enable=backend == "kernels")
    load_s = time.perf_counter() - t0
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: the resident size of what is alive
    rss_loaded = _rss_mb()
    ids = eval_windows("wikitext2", tok, seqlen=PREFILL, windows=1)[:1]
    with torch.no_grad():
        model(ids[:, :16], use_cache=False)  # warm-up: first-call allocations and kernel set-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(DECODE):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    counts: dict[str, int] = {}
    for b in backends.values():
        counts[b] = counts.get(b, 0) + 1
    return {"config": config, "load_s": load_s, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prefill_tok_s": PREFILL / prefill_s, "decode_tok_s": DECODE / decode_s, "backends": counts}


def _ensure_checkpoints() -> None:
    for name, (preset, sets) in RECIPES.items():
        if not (RUNS / name / "lowbit_config.json").exists():
            subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "smollm2-135m", "--recipe", preset,
                            *[a for s in sets for a in ("--set", s)], "--out", str(RUNS / name),
                            "--nsamples", "4", "--seqlen", "512"], cwd=REPO, check=True)
    if not (RUNS / "rtn-q4_0-gguf").exists():
        subprocess.run([sys.executable, "-m", "lowbit.cli", "export", str(RUNS / "rtn-q4_0"),
                        str(RUNS / "rtn-q4_0-gguf"), "--format", "gguf"], cwd=REPO, check=True)


def _table(rows: list[dict]) -> str:
    base = {k: next(r for r in rows if r["config"] == "bfloat16")[k] for k in ("prefill_tok_s", "decode_tok_s")}
    f32_rss = next(r for r in rows if r["config"] == "float32")["rss_after_load_mb"]
    header = ("| model | back-end (layers) | load s | RSS after load MB (× float32) | peak RSS MB | prefill tok/s "
              "(× bf16) | decode tok/s (× bf16) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        model, _, backend = r["config"].partition(":")
        layers = ", ".join(f"{k} {v}" for k, v in sorted(r["backends"].items())) or (
            "GGUF" if model == "llama.cpp" else "float")
        lines.append(f"| {model} | {backend or '-'} ({layers}) | {r['load_s']:.1f} | {r['rss_after_load_mb']:.0f} "
                     f"({r['rss_after_load_mb'] / f32_rss:.2f}) | {r['peak_rss_mb']:.0f} | {r['prefill_tok_s']:.0f} "
                     f"({r['prefill_tok_s'] / base['prefill_tok_s']:.2f}) | {r['decode_tok_s']:.1f} "
                     f"({r['decode_tok_s'] / base['decode_tok_s']:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="JSON file; the table goes beside it as .md")
    p.add_argument("--configs", nargs="*", default=None, help="only these configurations (default: all)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: measure one configuration
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    _ensure_checkpoints()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    chosen = [c for c in configs() if args.configs is None or c in args.configs]
    runs: dict[str, list[dict]] = {c: [] for c in chosen}
    for i in range(args.rounds):
        for config in chosen:  # interleaved: each round runs every configuration once
            r = subprocess.run([sys.executable, __file__, "--one", config], cwd=REPO, env=env, capture_output=True,
                               text=True, check=True)
            runs[config].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"round {i + 1}/{args.rounds} {config}: decode {runs[config][-1]['decode_tok_s']:.1f} tok/s",
                  file=sys.stderr)
    rows = []
    for config, rs in runs.items():
        row = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        rows.append({"config": config, **row, "backends": rs[0]["backends"], "rounds": len(rs)})
    table = _table(rows)
    print(table)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=False).stdout.strip()
        meta = {"commit": commit, "machine": platform.machine(), "python": platform.python_version(), "threads": 1,
                "prefill_tokens": PREFILL, "decode_tokens": DECODE, "rounds": args.rounds}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
        args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
