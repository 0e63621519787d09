"""Where a model came from, kept where transformers keeps it: ``config.name_or_path`` (an alias, a folder, a
GGUF file, a hub id or a lowbit checkpoint), not an attribute of lowbit's own on the model."""

from __future__ import annotations

from torch import nn


def source_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


def set_source(model: nn.Module, source: str) -> None:
    model.config.name_or_path = source  # what save_pretrained writes
    model.name_or_path = source  # transformers' copy on the model (set once, when it is built)
