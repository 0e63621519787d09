"""``run_compare``: every row under one calibration set and one protocol, each cached by its key.

A row runs in its own process (``lowbit.compare.worker``) and leaves ``runs/<row>/result.json``;
a rerun reuses every row whose key (recipe or peer + protocol + lowbit version) is unchanged; the
row that was running resumes from its last finished block or evaluation window, and a change of
the evaluation alone (windows, datasets, KL) re-evaluates a recipe's stored blocks without
quantizing them again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lowbit.atomic import atomic_write_text
from lowbit.compare.config import CompareConfig
from lowbit.compare.jobs import Job, plan_jobs
from lowbit.errors import LowbitError
from lowbit.models.resolve import resolve

log = logging.getLogger("lowbit.compare")


def _cached(run_dir: Path, key: str) -> dict | None:
    f = run_dir / "result.json"
    if not f.exists():
        return None
    row = json.loads(f.read_text())
    return row if row.get("key") == key and row.get("status") == "ok" else None


def _reusable(files: list[Path]) -> dict[str, dict]:
    """Rows of earlier reports' ``results.json`` by cache key: a report's archived rows can seed a new
    report directory (its run directories gone), and only rows whose key still matches are taken."""
    rows: dict[str, dict] = {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise LowbitError(f"--reuse {f}: not a readable results.json ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise LowbitError(f"--reuse {f}: not a lowbit compare results.json (no 'rows' list)")
        rows.update({r["key"]: r for r in data["rows"] if r.get("key") and r.get("status") == "ok"})
    return rows


def _calibration(cfg: CompareConfig, report_dir: Path) -> Path:
    """The one calibration set every row uses, built once and kept while the protocol holds."""
    from lowbit.api import load_model
    from lowbit.data import calibration

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


def _resumable(run_dir: Path, key: str, quant_key: str) -> bool:
    """Keep what an earlier run of this row left that still holds: its quantized blocks while the
    recipe and calibration are unchanged, its evaluated windows while the whole key is."""
    job_file = run_dir / "job.json"
    old = json.loads(job_file.read_text()) if job_file.exists() else {}
    if old.get("quant_key") != quant_key:
        shutil.rmtree(run_dir / "progress", ignore_errors=True)
    if old.get("key") != key:
        shutil.rmtree(run_dir / "eval", ignore_errors=True)
    return any((run_dir / sub).exists() for sub in ("progress", "eval"))


def _worker_env(jobs_at_once: int, threads: int | None = None) -> dict:
    """Rows side by side share the cores: unless the user chose, each gets its share of threads (a Ray task:
    the CPUs it declared)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif jobs_at_once > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs_at_once))
    return env


def _run(job: Job, cfg: CompareConfig, calib: Path | None, run_dir: Path, jobs_at_once: int = 1,
         threads: int | None = None) -> dict:
    from dataclasses import asdict

    key, quant_key = job.key(cfg.protocol()), job.key(cfg.quantization_protocol())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    resume = _resumable(run_dir, key, quant_key)
    if resume:
        log.info("%s: continuing from an earlier run of this row (its finished blocks and windows are kept)", job.name)
    job_file = run_dir / "job.json"
    job_file.write_text(json.dumps({"kind": job.kind, "name": job.name, "spec": job.spec, "key": key,
                                    "quant_key": quant_key, "resume": resume, "config": asdict(cfg),
                                    "calibration": str(calib) if calib else None,
                                    # every output-adaptive row of the report runs OAC's gradient pass once
                                    "hessian_cache": str(run_dir.parent.parent / "hessians")}, indent=1))
    t0 = time.perf_counter()
    with open(run_dir / "run.log", "w") as logf:
        proc = subprocess.run([sys.executable, "-m", "lowbit.compare.worker", str(job_file)], stdout=logf,
                              stderr=subprocess.STDOUT, env=_worker_env(jobs_at_once, threads))
    result = run_dir / "result.json"
    if proc.returncode == 0 and result.exists():  # "ok", or "unavailable: why" for a peer that cannot run
        row = json.loads(result.read_text())
        row["wall_seconds"] = time.perf_counter() - t0
        row["rows_at_once"] = jobs_at_once  # --jobs: its times were taken with up to that many rows at once
        atomic_write_text(result, json.dumps(row, indent=1))
        return row
    if proc.returncode in (-2, 130):
        raise KeyboardInterrupt
    tail = [line for line in (run_dir / "run.log").read_text().splitlines() if line.strip()][-1:]
    return {"name": job.name, "kind": job.kind, "status": f"failed: {tail[0] if tail else proc.returncode}"[:300]}


@dataclass(frozen=True)
class RayExecutor:
    """Each row a Ray task with the resources it declares, on an existing cluster (``address``) or a local one.

    The task runs the row's worker process on whichever machine Ray picks: the report directory must be on
    a file system every node sees (its cache, calibration set and Hessian cache are files there).
    """

    address: str | None = None  # None: RAY_ADDRESS if set, else a new local cluster
    cpus: int = 1  # per row: Ray's num_cpus, and the row's OMP_NUM_THREADS
    gpus: float = 0.0  # per row: Ray's num_gpus
    memory: int | None = None  # per row, bytes: Ray's memory resource (scheduling only)

    def check(self) -> None:
        """A ``host:port`` that nothing answers is refused in one line (Ray itself would retry for minutes)."""
        host, sep, port = (self.address or "").rpartition(":")
        if not sep or not port.isdigit() or "://" in host:
            return  # "auto", ray://…, or no address: Ray's own resolution
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise LowbitError(f"no Ray cluster answers at {self.address} ({exc.strerror or type(exc).__name__}): "
                              "start one (ray start --head) or leave --ray-address out for a local one") from None

    def runner(self):
        try:
            import ray
        except ImportError:
            raise LowbitError("--executor ray needs Ray: pip install 'lowbit[ray]'") from None
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=False)
        options = {"num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": 0}
        if self.memory:
            options["memory"] = self.memory
        task = ray.remote(**options)(_run)

        def run(job: Job, cfg: CompareConfig, calib: Path | None, run_dir: Path, jobs_at_once: int) -> dict:
            return ray.get(task.remote(job, cfg, calib, run_dir, jobs_at_once, self.cpus))

        return run


def run_compare(cfg: CompareConfig, report_dir: str | Path, show_progress: bool = True,
                jobs_at_once: int = 1, reuse: list[Path] | None = None, executor: RayExecutor | None = None
                ) -> list[dict]:
    """Run (or reuse) every row, then write ``report.md``, ``report.html`` and the plots.

    ``jobs_at_once``: rows run side by side (one process each, sharing the cores' threads); on one
    GPU, 1. ``reuse``: earlier reports' ``results.json``; a row whose key matches one of theirs is
    taken from there (and cached in this report directory) instead of running again. ``executor``: rows
    as Ray tasks (every row at once, as many running as the cluster's resources allow).
    """
    from lowbit.compare.report import write_report

    cfg.validate()
    jobs = plan_jobs(cfg)  # bad recipes, peers or --reuse files fail here, before the report folder is made
    earlier = _reusable(list(reuse or []))
    resolve(cfg.model)  # a mistyped model fails here, in well under a second, not in every row's process
    report_dir = Path(report_dir).resolve() if executor is not None else Path(report_dir)  # as every node names it
    report_dir.mkdir(parents=True, exist_ok=True)
    run_row = executor.runner() if executor is not None else _run
    handler = logging.FileHandler(report_dir / "compare.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        protocol = cfg.protocol()
        todo, cached = [], {}
        for job in jobs:
            run_dir, key = report_dir / "runs" / job.slug, job.key(protocol)
            row = _cached(run_dir, key)
            if row is not None:
                log.info("%s: reusing the cached result in %s (recipe and protocol unchanged)", job.name, run_dir)
            elif key in earlier:
                row = earlier[key]
                log.info("%s: reusing its row of an earlier report (same key %s)", job.name, key)
                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / "result.json", json.dumps(row, indent=1))
            if row is None:
                todo.append(job)
            else:
                cached[job.name] = {**row, "name": job.name}  # a label is not part of what was measured
        # built (loading the model) only for rows that will run: a report seeded whole from cache needs none
        calib = _calibration(cfg, report_dir) if any(j.needs_calibration for j in todo) else None
        bar = tqdm(total=len(jobs), initial=len(cached), desc="compare", unit="row", disable=not show_progress)

        def run_one(job: Job) -> dict:
            run_dir = report_dir / "runs" / job.slug
            log.info("%s: running; progress in %s", job.name, run_dir / "run.log")
            row = run_row(job, cfg, calib, run_dir, jobs_at_once)
            log.info("%s: %s", job.name, row["status"])
            bar.update()
            return row

        at_once = max(1, len(todo) if executor is not None else jobs_at_once)  # Ray schedules its own tasks
        with ThreadPoolExecutor(max_workers=at_once) as pool:  # each row is its own process
            done = dict(zip([j.name for j in todo], pool.map(run_one, todo)))
        bar.close()
        rows = [cached.get(j.name) or done[j.name] for j in jobs]
        (report_dir / "results.json").write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))
        write_report(rows, cfg, report_dir)
        return rows
    except KeyboardInterrupt:
        log.warning("interrupted: finished rows are cached in %s; rerun the same command to continue", report_dir)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
