"""llm-compressor (vLLM project) peers: GPTQ, round-to-nearest, and its QuIP-style Hadamard
transform + GPTQ, on lowbit's model and calibration samples.

Its newest release (0.14.0.1) pins ``transformers<=5.17``, older than lowbit's, so it cannot share
lowbit's environment. It runs in its own: a Python with ``llmcompressor`` installed, found here if
it imports, else named by ``LOWBIT_LLMCOMPRESSOR_PYTHON``, e.g.::

    python -m venv --system-site-packages ~/venvs/llmc
    ~/venvs/llmc/bin/pip install llmcompressor==0.14.0.1 transformers==5.17.0
    export LOWBIT_LLMCOMPRESSOR_PYTHON=~/venvs/llmc/bin/python

The model and calibration ids are handed over as files; ``llmcompressor_script.py`` runs
``oneshot`` there and returns each decoder linear's effective weight, which is written back here
so that lowbit's evaluation scores the peer exactly as it scores its own rows.
"""

from __future__ import annotations

import importlib.util
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from lowbit.compare.config import WeightScheme
from lowbit.compare.peers import PeerUnavailable, decoder_linears
from lowbit.memory import peak_memory_mb

PYTHON_ENV = "LOWBIT_LLMCOMPRESSOR_PYTHON"
REQUIREMENT = "llmcompressor==0.14.0.1 transformers==5.17.0"


def _python() -> str:
    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    exe = os.environ.get(PYTHON_ENV, "").strip()
    if not exe:
        raise PeerUnavailable(f"llmcompressor is not importable here (it pins transformers<=5.17): install "
                              f"'{REQUIREMENT}' in a separate environment and set {PYTHON_ENV} to its python")
    probe = subprocess.run([exe, "-c", "import llmcompressor"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise PeerUnavailable(f"{PYTHON_ENV}={exe} cannot import llmcompressor: install '{REQUIREMENT}' there")
    return exe


@torch.no_grad()
def quantize(model: nn.Module, tok, calib, scheme: WeightScheme, run_dir: Path,
             variant: str = "llmcompressor-gptq") -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lowbit.models import find_blocks

    exe = _python()
    kind = variant.removeprefix("llmcompressor-")
    linears = decoder_linears(model)
    work = Path(run_dir) / "llmcompressor"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model.save_pretrained(work / "model")
    if tok is not None:  # oneshot wants a processor even for ready-made token ids
        tok.save_pretrained(work / "model")
    torch.save(calib.cpu(), work / "calib.pt")
    out = work / "weights.safetensors"
    prefix = find_blocks(model)[0] + "."  # "model.layers."
    cmd = [exe, str(Path(__file__).with_name("llmcompressor_script.py")), str(work / "model"), str(work / "calib.pt"),
           str(out), "--variant", kind, "--bits", str(scheme.bits), "--prefix", prefix]
    if scheme.group_size:
        cmd += ["--group-size", str(scheme.group_size)]
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:  # streamed into the row's run.log, as it comes
            print(line, end="", flush=True)
            if line.strip():
                lines.append(line.strip())
    shutil.rmtree(work / "model", ignore_errors=True)
    if proc.returncode != 0:
        # the exception, not its details
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        raise RuntimeError(f"llm-compressor failed: {((errors or lines or [f'exit {proc.returncode}'])[-1])[:240]}")
    weights = load_file(str(out))
    missing = sorted(set(linears) - set(weights))
    if missing:
        raise RuntimeError(f"llm-compressor returned no weight for {missing[0]} (+{len(missing) - 1} more)")
    for name, lin in linears.items():
        lin.weight.copy_(weights[name].to(lin.weight.dtype))
    with safe_open(str(out), "pt") as f:
        version = f.metadata().get("llmcompressor", "?")
    out.unlink()
    bits = scheme.mean_bits(linears.values(), zero_point=False)  # symmetric grid: a 16-bit scale, no zero point
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # llm-compressor's own process
    return {"peer_version": version, "effective_bits": bits, "peak_memory_mb": max(peak_memory_mb(), child_mb),
            **({"peer_python": exe} if exe != sys.executable else {})}
