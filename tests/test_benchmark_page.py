"""The benchmark page is what the committed results give, and no committed file names a machine's folders."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# a home, scratch or work folder of some machine; runs/ and ../ (relative to the repository) are fine
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|root|check|Users)/[\w.+-]+")


def test_benchmarks_md_is_generated_from_the_results():
    done = subprocess.run([sys.executable, "bench/page.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_committed_text_file_holds_a_machine_path():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        binary = path.suffix in (".png", ".pt", ".safetensors", ".gguf")
        if binary or not path.is_file() or name.startswith("lowbit/data/"):  # data: real text, its own paths
            continue
        text = path.read_text(errors="replace")
        found += [f"{name}: {m.group(0)}" for m in MACHINE_PATH.finditer(text)]
    assert not found, found[:20]
