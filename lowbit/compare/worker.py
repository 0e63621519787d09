"""One row of a comparison, in its own process (so that its peak memory is its own).

``python -m lowbit.compare.worker JOB.json`` quantizes (a recipe or a peer), saves the checkpoint,
evaluates, and writes ``result.json`` next to ``JOB.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from lowbit.atomic import atomic_write_text
from lowbit.compare.config import CompareConfig, WeightScheme
from lowbit.data.sources import source_label
from lowbit.errors import ResumeMismatch


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _quantize_recipe(model, tok, spec: dict, calib, run_dir: Path, resume: bool, hessian_cache: str | None) -> dict:
    from lowbit.api import quantize
    from lowbit.export import save
    from lowbit.recipes import Recipe

    rec = Recipe.from_dict(spec)
    # per-block progress goes to the row's run.log; finished blocks to progress/, kept for a rerun
    try:
        result = quantize(model, rec, calib, progress_dir=run_dir / "progress", resume=resume, show_progress=True,
                          hessian_cache=hessian_cache)
    except ResumeMismatch as exc:  # the stored blocks are another run's (e.g. the data changed): start afresh
        logging.getLogger(__name__).warning("%s; quantizing from the start", exc)
        result = quantize(model, rec, calib, progress_dir=run_dir / "progress", resume=False, show_progress=True,
                          hessian_cache=hessian_cache)
    report = result.report
    if report.resumed_blocks < len(report.block_seconds):  # a model quantized now: no earlier window is its
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
    ckpt = save(result, run_dir / "checkpoint", tok)
    a = rec.activations
    return {
        "w_bits": rec.weights.bits if rec.weights.method != "none" else 16,
        "group_size": rec.weights.group_size,
        "a_bits": a.bits if a.enabled else 16,
        "kv_bits": a.kv_bits if a.enabled else 16,
        "effective_bits": result.effective_bits or 16.0,
        "quant_seconds": report.total_seconds,
        "peak_memory_mb": report.peak_memory_mb,
        "checkpoint_mb": _dir_mb(ckpt),
        "layers": [{"name": r.name, "block": r.block, "rel_output_error": r.rel_output_error,
                    "rel_weight_error": r.rel_weight_error} for r in report.layers],
        "block_seconds": report.block_seconds,
        **({"hessian_pass": report.hessian_pass} if report.hessian_pass else {}),  # OAC's gradient pass: s, peak MB
        **({"resumed_blocks": report.resumed_blocks} if report.resumed_blocks else {}),
    }


def _quantize_peer(model, tok, spec: dict, calib, run_dir: Path) -> dict:
    from lowbit.compare.peers import decoder_linears, run_peer
    from lowbit.memory import peak_memory_mb

    scheme = WeightScheme.parse(spec["scheme"])
    linears = list(decoder_linears(model).values())  # before a peer swaps them
    bits = scheme.mean_bits(linears)
    t0 = time.perf_counter()
    extra = run_peer(spec["peer"], model, tok, calib, scheme, run_dir)
    if not extra.pop("reused_tuning", False):  # a peer quantized anew: no earlier window holds
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
    seconds = time.perf_counter() - t0 + extra.pop("earlier_seconds", 0.0)  # a resumed peer: its earlier part too
    # a peer that knows its exact storage (no zeros, ragged groups) says so; else float16 scale + zero per group
    return {"w_bits": scheme.bits, "group_size": scheme.group_size, "a_bits": 16, "kv_bits": 16,
            "effective_bits": extra.pop("effective_bits", bits), "quant_seconds": seconds,
            "peak_memory_mb": peak_memory_mb(), **extra}


def run_job(job: dict, run_dir: Path) -> dict:
    from lowbit.api import load_model
    from lowbit.eval import kl_divergence, perplexity

    cfg = CompareConfig(**job["config"])
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = load_model(cfg.model)
    model.to(dev)
    calib = torch.load(job["calibration"]) if job.get("calibration") else None
    row: dict = {"name": job["name"], "kind": job["kind"], "status": "ok", "threads": torch.get_num_threads()}
    if job["kind"] == "recipe":
        row.update(_quantize_recipe(model, tok, job["spec"], calib, run_dir, job.get("resume", False),
                                    job.get("hessian_cache")))
    elif job["kind"] == "peer":
        row.update(_quantize_peer(model, tok, job["spec"], calib, run_dir))
    else:
        row.update(w_bits=16, a_bits=16, kv_bits=16, effective_bits=16.0)
    t0 = time.perf_counter()
    logs = run_dir / "eval"  # finished windows, kept for a rerun of this row (the runner clears them otherwise)
    row["perplexity"] = {d: perplexity(model, tok, d, seqlen=cfg.eval_seqlen, windows=cfg.windows,
                                       log=logs / f"{source_label(d)}.nll.json").ppl for d in cfg.datasets}
    if cfg.kl and job["kind"] != "fp":
        ref, _ = load_model(cfg.model)
        ref.to(dev)
        d = cfg.datasets[0]
        row["kl"] = kl_divergence(model, ref, tok, d, seqlen=cfg.eval_seqlen, windows=cfg.kl_window_count(),
                                  log=logs / f"{source_label(d)}.kl.json")
        row["kl_dataset"] = d
    row["eval_seconds"] = time.perf_counter() - t0
    return row


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text())
    from lowbit.compare.peers import PeerUnavailable

    try:
        row = run_job(job, job_path.parent)
    except PeerUnavailable as exc:
        row = {"name": job["name"], "kind": job["kind"], "status": f"unavailable: {exc}"}
    row["key"] = job["key"]
    atomic_write_text(job_path.parent / "result.json", json.dumps(row, indent=1))  # a result is whole or absent
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
