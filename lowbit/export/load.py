"""Rebuild a ``transformers`` model from a lowbit checkpoint, with :class:`QuantLinear` layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.activations.install import restore
from lowbit.errors import LowbitError
from lowbit.models.resolve import CHECKPOINT_MARKER
from lowbit.runtime import empty_module
from lowbit.runtime.build import scales_key


def load_quantized(path: str | Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    path = Path(path)
    meta = json.loads((path / CHECKPOINT_MARKER).read_text())
    if meta.get("format_version") != 1:
        raise LowbitError(f"{path}: unsupported lowbit checkpoint version {meta.get('format_version')}")
    dtype = dtype or getattr(torch, meta.get("dtype", "float32"))
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = load_file(str(path / "model.safetensors"))
    for name, info in meta["layers"].items():
        old = model.get_submodule(name)
        scales = tensors[scales_key(name, info)]
        model.set_submodule(name, empty_module(info, scales.shape[1], old.bias is not None))
    restore(model, meta.get("activations", {}))
    result = model.load_state_dict(tensors, strict=False)
    missing = set(result.missing_keys) - set(meta["aliases"])
    if missing or result.unexpected_keys:
        raise LowbitError(f"{path}: checkpoint does not match its config (missing {sorted(missing)[:3]}, "
                          f"unexpected {result.unexpected_keys[:3]})")
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in meta["aliases"].items():  # restore shared storage (tied embeddings)
        if alias in params and target in params and params[alias] is not params[target]:
            module_name, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(module_name), attr, params[target])
    model.eval()
    model.lowbit_source = meta.get("base_model")
    model.lowbit_recipe = meta.get("recipe", {})
    model.lowbit_checkpoint = str(path)
    if (path / "tokenizer_config.json").exists():
        return model, AutoTokenizer.from_pretrained(path)
    return model, _base_tokenizer(meta.get("base_model"))


def _base_tokenizer(base: str | None) -> PreTrainedTokenizerBase | None:
    """A checkpoint saved without a tokenizer borrows its base model's, if that can be found."""
    from lowbit.models.aliases import ALIASES
    from lowbit.models.loading import cache_dir

    if base in ALIASES and (cache_dir() / "models" / base / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cache_dir() / "models" / base)
    if base and Path(base).is_dir() and (Path(base) / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(base)
    return None
