"""llm-compressor (vLLM project) peers. Its newest release (0.14.0.1) pins ``transformers<=5.17``,
so it cannot be installed beside lowbit's ``transformers`` 5.18+; the row says so rather than
downgrading the project's own stack."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lowbit.compare.config import WeightScheme
from lowbit.compare.peers import PeerUnavailable


def quantize(model: nn.Module, tok, calib, scheme: WeightScheme, run_dir: Path, variant: str = "") -> dict:
    import importlib.metadata as md

    import transformers

    try:
        version = md.version("llmcompressor")
    except md.PackageNotFoundError:
        raise PeerUnavailable("not installed: llmcompressor 0.14.0.1 requires transformers<=5.17.0, "
                              f"this environment has {transformers.__version__}") from None
    raise PeerUnavailable(f"llmcompressor {version} is installed, but lowbit has no adapter tested against it yet")
