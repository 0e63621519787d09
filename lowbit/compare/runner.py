"""``run_compare``: every row under one calibration set and one protocol, each cached by its key.

A row runs in its own process (``lowbit.compare.worker``) and leaves ``runs/<row>/result.json``;
a rerun reuses every row whose key (recipe or peer + protocol + lowbit version) is unchanged, so
an interrupted comparison loses at most the row that was running.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit.compare.config import CompareConfig
from lowbit.compare.jobs import Job, plan_jobs

log = logging.getLogger("lowbit.compare")


def _cached(run_dir: Path, key: str) -> dict | None:
    f = run_dir / "result.json"
    if not f.exists():
        return None
    row = json.loads(f.read_text())
    return row if row.get("key") == key and row.get("status") == "ok" else None


def _calibration(cfg: CompareConfig, report_dir: Path) -> Path:
    """The one calibration set every row uses, built once and kept while the protocol holds."""
    from lowbit.data import calibration
    from lowbit.models import load_model

    path = report_dir / "calibration.pt"
    meta = report_dir / "calibration.json"
    want = {"model": cfg.model, **cfg.calibration()}
    if path.exists() and meta.exists() and json.loads(meta.read_text()) == want:
        return path
    model, tok = load_model(cfg.model)
    c = cfg.calibration()
    ids = calibration(c["dataset"], tok, c["nsamples"], c["seqlen"], c["seed"], model_type=model.config.model_type)
    torch.save(ids, path)
    meta.write_text(json.dumps(want))
    return path


def _run(job: Job, key: str, cfg: CompareConfig, calib: Path | None, run_dir: Path) -> dict:
    from dataclasses import asdict

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    job_file = run_dir / "job.json"
    job_file.write_text(json.dumps({"kind": job.kind, "name": job.name, "spec": job.spec, "key": key,
                                    "config": asdict(cfg), "calibration": str(calib) if calib else None}, indent=1))
    t0 = time.perf_counter()
    with open(run_dir / "run.log", "w") as logf:
        proc = subprocess.run([sys.executable, "-m", "lowbit.compare.worker", str(job_file)], stdout=logf,
                              stderr=subprocess.STDOUT)
    result = run_dir / "result.json"
    if proc.returncode == 0 and result.exists():  # "ok", or "unavailable: why" for a peer that cannot run
        row = json.loads(result.read_text())
        row["wall_seconds"] = time.perf_counter() - t0
        result.write_text(json.dumps(row, indent=1))
        return row
    if proc.returncode in (-2, 130):
        raise KeyboardInterrupt
    tail = [line for line in (run_dir / "run.log").read_text().splitlines() if line.strip()][-1:]
    return {"name": job.name, "kind": job.kind, "status": f"failed: {tail[0] if tail else proc.returncode}"[:300]}


def run_compare(cfg: CompareConfig, report_dir: str | Path, show_progress: bool = True) -> list[dict]:
    """Run (or reuse) every row, then write ``report.md``, ``report.html`` and the plots."""
    from lowbit.compare.report import write_report

    cfg.validate()
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(report_dir / "compare.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        jobs = plan_jobs(cfg)
        protocol = cfg.protocol()
        calib = _calibration(cfg, report_dir) if any(j.needs_calibration for j in jobs) else None
        rows = []
        bar = tqdm(jobs, desc="compare", unit="row", disable=not show_progress)
        for job in bar:
            bar.set_postfix_str(job.name)
            key = job.key(protocol)
            run_dir = report_dir / "runs" / job.slug
            row = _cached(run_dir, key)
            if row is not None:
                log.info("%s: reusing the cached result in %s (recipe and protocol unchanged)", job.name, run_dir)
            else:
                log.info("%s: running; progress in %s", job.name, run_dir / "run.log")
                row = _run(job, key, cfg, calib, run_dir)
                log.info("%s: %s", job.name, row["status"])
            rows.append(row)
        (report_dir / "results.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
        write_report(rows, cfg, report_dir)
        return rows
    except KeyboardInterrupt:
        log.warning("interrupted: finished rows are cached in %s; rerun the same command to continue", report_dir)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
