"""A Hugging Face model folder (``config.json``, ``model.safetensors``, tokenizer) from an export's tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.atomic import as_umask_allows, save_tensors
from lowbit.export.formats.source import Source
from lowbit.export.write import narrowest


def write_hf_folder(src: Source, out: Path, tensors: dict[str, torch.Tensor], extra_config: dict) -> None:
    """The model's float tensors (not the quantized layers': a consumer computes with their scales in the
    dtype they are stored in) go in the narrowest dtype that holds them exactly; the consumer casts them to
    the config's dtype on loading, to the same floats."""
    packed = tuple(f"{name}." for name in src.layers)
    tensors = {k: v if k.startswith(packed) else narrowest(v) for k, v in tensors.items()}
    save_tensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    as_umask_allows(out / "model.safetensors")
    config = src.model.config.to_dict()
    config["dtype"] = str(src.dtype).removeprefix("torch.")
    config.update(extra_config)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(out)
