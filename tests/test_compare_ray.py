"""``lowbit compare --executor ray``: every row a Ray task on a local cluster of two workers, with the same
numbers as rows run as local processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.compare import CompareConfig, run_compare
from lowbit.compare.runner import RayExecutor

TIMED = {"wall_seconds", "rows_at_once", "seconds", "quant_seconds", "peak_memory_mb", "eval_seconds"}


def _measured(row: dict) -> dict:
    """A row less what depends on the machine and the moment (times, memory, the threads it was given, and the
    checkpoint folder's size, whose report.json records times)."""
    return {k: v for k, v in row.items()
            if k not in TIMED and "seconds" not in k and "memory" not in k and k not in ("checkpoint_mb", "threads")}


def test_ray_rows_equal_local_process_rows(tmp_path: Path):
    ray = pytest.importorskip("ray")
    from hostile_setup import write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    cfg = CompareConfig(model=str(model), recipes=["rtn-w4", "gptq-w4"], peers=[], nsamples=4, calib_seqlen=64,
                        windows=2, eval_seqlen=64, overrides=["weights.group_size=32"], datasets=["wikitext2"])
    local = run_compare(cfg, tmp_path / "local", show_progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local cluster: two rows at once
    try:
        remote = run_compare(cfg, tmp_path / "ray", show_progress=False, executor=RayExecutor(cpus=1))
    finally:
        ray.shutdown()
    assert [r["status"] for r in remote] == ["ok"] * 3  # the full model's row and the two recipes
    assert [_measured(r) for r in remote] == [_measured(r) for r in local]
    assert (tmp_path / "ray" / "report.md").is_file()


def test_executor_flags_are_checked_in_one_line(tmp_path: Path):
    import subprocess
    import sys

    for extra, message in ((["--executor", "dask"], "--executor must be local or ray"),
                           (["--executor", "ray", "--row-cpus", "0"], "--row-cpus must be a positive integer"),
                           (["--executor", "ray", "--row-memory", "lots"], "--row-memory must be a size"),
                           (["--executor", "ray", "--ray-address", "127.0.0.1:1"], "no Ray cluster answers at")):
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", "compare", "smollm2-135m", "--recipes", "rtn-w4",
                            "--report", str(tmp_path / "r"), *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-600:]
        assert not (tmp_path / "r").exists()
