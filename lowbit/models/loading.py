"""``load_model``: one call for a built-in alias, a local directory, a lowbit checkpoint or a hub id.

GGUF aliases are dequantized once through ``transformers`` and cached as float safetensors
(``$LOWBIT_CACHE`` or ``~/.cache/lowbit``), so later loads take seconds instead of ~25 s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.errors import LowbitError
from lowbit.models.aliases import ALIASES, GGUFAlias
from lowbit.models.resolve import CHECKPOINT_MARKER, ModelRef, cache_dir, resolve
from lowbit.models.source import set_source

__all__ = ["CHECKPOINT_MARKER", "cache_dir", "load_model"]

log = logging.getLogger(__name__)


def load_model(
    name_or_path: str | os.PathLike | ModelRef, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return a float model's ``(model, tokenizer)`` in eval mode; ``config.name_or_path`` records where it came
    from (``models.source``). ``dtype`` defaults to float32. A :class:`ModelRef` from
    :func:`~lowbit.models.resolve.resolve` is not resolved again. A lowbit checkpoint is ``lowbit.load_model``'s
    (``api.load_model``), a layer above this one.
    """
    ref = name_or_path if isinstance(name_or_path, ModelRef) else resolve(str(name_or_path))
    if ref.kind == "checkpoint":
        raise LowbitError(f"{ref.path} is a lowbit checkpoint: load it with lowbit.load_model")
    dtype = dtype or torch.float32
    if ref.kind == "alias":
        model, tok = _load_local(_cached_alias(ALIASES[ref.name]), dtype)
        set_source(model, ref.name)
        return model, tok
    if ref.kind == "local":
        model, tok = _load_local(ref.path, dtype)
        set_source(model, str(ref.path.resolve()))
        return model, tok
    if ref.kind == "gguf":
        model, tok = _load_local(_cached_gguf(ref.path), dtype)
        set_source(model, str(ref.path.resolve()))
        return model, tok
    return _load_hub(ref.name, dtype)


def _check_causal_lm(config, name: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise LowbitError(f"model '{name}' ({config.model_type}) is not a causal language model")


def _load_local(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LowbitError(f"cannot read a model config in '{path}': {exc}") from None
    _check_causal_lm(config, str(path))
    tok = load_tokenizer(path)  # before the weights: a folder without one is the commoner mistake, and quicker found
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), tok


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LowbitError(f"'{path}' has no tokenizer that loads ({str(exc).splitlines()[0][:160]}): save the "
                          "model's tokenizer into it (tokenizer.save_pretrained)") from None


def model_folder(ref: ModelRef) -> tuple[Path, str]:
    """The folder of safetensors files a model is read from block by block, and the name it goes by."""
    if ref.kind == "alias":
        return _cached_alias(ALIASES[ref.name]), ref.name
    if ref.kind == "local":
        return ref.path, str(ref.path.resolve())
    if ref.kind == "gguf":
        return _cached_gguf(ref.path), str(ref.path.resolve())
    if ref.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            config = AutoConfig.from_pretrained(ref.name)
        except (OSError, ValueError) as exc:
            raise LowbitError(f"unknown model '{ref.name}': not a local directory or a reachable Hugging Face id "
                              f"({type(exc).__name__})") from None
        _check_causal_lm(config, ref.name)
        return (Path(snapshot_download(ref.name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])),
                ref.name)
    raise LowbitError(f"'{ref.name}' is a lowbit checkpoint: it is quantized already")


def _load_hub(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    known = ", ".join(sorted(ALIASES))
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise LowbitError(
            f"unknown model '{name}': not a built-in alias ({known}), a local directory, "
            f"or a reachable Hugging Face id ({type(exc).__name__})"
        ) from None
    _check_causal_lm(config, name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(name)
    set_source(model, name)
    return model, tok


def _cached_alias(alias: GGUFAlias) -> Path:
    target = cache_dir() / "models" / alias.name
    if (target / "config.json").exists():
        return target
    return _dequantize_gguf(alias.gguf_path(), target)


def _cached_gguf(gguf: Path) -> Path:
    """A GGUF file given by path, dequantized once, cached under the hash of its bytes."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    target = cache_dir() / "models" / f"gguf-{digest.hexdigest()[:16]}"
    if (target / "config.json").exists():
        return target
    _check_gguf_architecture(gguf)
    return _dequantize_gguf(gguf, target)


def _check_gguf_architecture(gguf: Path) -> None:
    """Refuse, in one line and before the slow load, an architecture transformers' GGUF reader lacks."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(str(gguf)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError) as exc:
        raise LowbitError(f"{gguf} is not a readable GGUF model file ({type(exc).__name__})") from None
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("moe", "_moe") not in GGUF_SUPPORTED_ARCHITECTURES:
        raise LowbitError(f"{gguf}: GGUF architecture '{arch}' is not supported by transformers' GGUF loader "
                          f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")


def _dequantize_gguf(gguf: Path, target: Path) -> Path:
    log.info("dequantizing %s once (cached at %s)", gguf, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ValueError as exc:  # transformers' own refusal of an architecture
        raise LowbitError(f"{gguf}: {str(exc).splitlines()[0]}") from None
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model while it carries the GGUF quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a concurrent or interrupted run never sees half a cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target
