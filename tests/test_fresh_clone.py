"""The README's main command on a fresh copy of the repository, offline, with no data folder anywhere:
the embedded text makes it complete, and the full model's perplexity is the one BENCHMARKS states."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _readme_main_command() -> list[str]:
    """The ``lowbit quantize …`` step of the first command in README.md, as words."""
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    step = next(s.strip() for s in first_block.split("&&") if s.strip().startswith("lowbit quantize"))
    return step.split()[1:]


def _readme_expected_full_model() -> str:
    """The full model's perplexity in the expected output printed under the main command."""
    readme = (REPO / "README.md").read_text()
    return re.search(r"^full precision\s+([0-9.]+)\s*$", readme, re.M).group(1)


def _offline(cmd: list[str]) -> list[str]:
    """In a network namespace of its own where that is allowed (root, Linux): no network at all."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n", *cmd]
    return cmd  # elsewhere the proxies below point every request at a closed port


def _fresh_copy(dest: Path) -> Path:
    """The files git would clone (tracked and new, not ignored), copied as they are in the work tree."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_readme_main_command_offline_without_data_folder(tmp_path):
    clone = _fresh_copy(tmp_path / "clone" / "lowbit")  # tmp_path/clone has no shared/ beside the copy
    args = _readme_main_command()
    assert args[:2] == ["quantize", "smollm2-135m"] and "--eval" in args, args
    args[args.index("--nsamples") + 1] = "2"  # the full model's numbers do not depend on calibration
    args[args.index("--out") + 1] = str(tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k not in ("LOWBIT_DATA", "PYTHONPATH")}
    env.update(PYTHONPATH=str(clone), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               ALL_PROXY="http://127.0.0.1:9", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    r = subprocess.run(_offline([sys.executable, "-m", "lowbit.cli", *args]), cwd=clone, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Retrying" not in r.stderr and "huggingface.co" not in r.stderr, r.stderr[-3000:]
    printed = re.search(r"^full precision\s+([0-9.]+)\s*$", r.stdout, re.M).group(1)
    assert printed == _readme_expected_full_model(), r.stdout
    assert f"Full precision: WikiText-2 {printed}" in (REPO / "BENCHMARKS.md").read_text()  # the page's first lines
