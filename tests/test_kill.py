"""SIGKILL at each phase of a run (as a power cut or the OOM killer would) leaves the previous state or
a resumable one, and finishing the run gives files byte-identical to a run that was never killed.

The kill comes at a named point (``LOWBIT_KILL_AT``, see ``lowbit.faults``) rather than after a timer,
so every test hits its phase exactly. Runs use the tiny model of ``hostile_setup``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# what must be byte-identical: everything but report.json (it records wall times)
TIMED = {"report.json"}
QUANTIZE = ("--recipe", "gptq-w4g128", "--nsamples", "4", "--seqlen", "64", "--set", "weights.group_size=32")


def _cli(*args: str, kill_at: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOWBIT_KILL_AT", None)
    if kill_at is not None:
        env["LOWBIT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in TIMED
            and not p.relative_to(folder).parts[0].startswith(".")}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from hostile_setup import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("kill") / "model", layers=3)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    """The run that was never interrupted."""
    out = tmp_path_factory.mktemp("ref") / "ckpt"
    r = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--eval", "wikitext2", "--windows", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("point", ["calibration", "block:0", "block:1", "save:tensors", "save:swap"])
def test_killed_quantize_resumes_to_the_same_bytes(point, model, reference, tmp_path):
    out = tmp_path / "ckpt"
    killed = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--eval", "wikitext2", "--windows", "2",
                  kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "lowbit_config.json").exists()  # nothing that looks finished
    if point.startswith("block"):
        manifest = json.loads((out / ".progress" / "manifest.json").read_text())
        assert manifest["done"] == list(range(int(point.split(":")[1]) + 1))  # the finished blocks were kept
    resumed = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--eval", "wikitext2", "--windows", "2",
                   "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _files(out) == _files(reference)
    assert not list(tmp_path.glob(".ckpt.new-*")) and not list(tmp_path.glob(".ckpt.old-*"))


@pytest.mark.parametrize("point", ["save:tensors", "save:swap"])
def test_killed_overwrite_keeps_the_previous_checkpoint(point, model, reference, tmp_path):
    out = tmp_path / "ckpt"
    assert _cli("quantize", str(model), "--recipe", "rtn-w4", "--out", str(out)).returncode == 0
    previous = _files(out)
    killed = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--overwrite", kill_at=point)
    assert killed.returncode == -signal.SIGKILL
    if point == "save:swap":  # killed between the renames: the old folder is set aside, and found again
        assert not out.exists()
        shown = _cli("eval", str(out), "--windows", "1")
        assert "the previous checkpoint is in" in shown.stderr
        assert _cli("inspect", str(next(tmp_path.glob(".ckpt.old-*")))).returncode == 0
        # the next run on the folder puts the previous checkpoint back before anything else
        refused = _cli("quantize", str(model), *QUANTIZE, "--out", str(out))
        assert "holds a lowbit checkpoint: pass --overwrite" in refused.stderr
    assert _files(out) == previous  # as it was, old eval results and all
    assert _cli("inspect", str(out)).returncode == 0
    finished = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--overwrite", "--resume")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert _files(out) == {k: v for k, v in _files(reference).items() if k != "eval.json"}


def test_killed_evaluation_resumes_to_the_same_numbers(reference, tmp_path):
    args = ("eval", str(reference), "--ppl", "wikitext2", "--windows", "3", "--json", "--log", str(tmp_path / "log"))
    assert _cli(*args, kill_at="eval:window:2").returncode == -signal.SIGKILL
    assert len(json.loads(next((tmp_path / "log").glob("*.json")).read_text())["values"]) == 2
    resumed = _cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    fresh = _cli("eval", str(reference), "--ppl", "wikitext2", "--windows", "3", "--json", "--no-log")
    assert json.loads(resumed.stdout)["perplexity"] == json.loads(fresh.stdout)["perplexity"]


def test_two_runs_on_one_out_only_one_proceeds(model, tmp_path):
    out = tmp_path / "ckpt"
    args = [sys.executable, "-m", "lowbit.cli", "quantize", str(model), *QUANTIZE, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert f"--out {out} is in use by pid" in loser and "lowbit quantize" in loser
    assert (out / "lowbit_config.json").exists()
