"""Rebuild a ``transformers`` model from a lowbit checkpoint, with :class:`QuantLinear` layers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.activations.install import restore
from lowbit.errors import LowbitError
from lowbit.export.hf_config import base_config
from lowbit.format import LayerSpec, groups_key
from lowbit.models.linearize import linearize
from lowbit.models.onload import DiskModel, read_tensors
from lowbit.models.resolve import CHECKPOINT_MARKER, INDEX, tensor_files, tensor_shape
from lowbit.models.source import set_source, source_of
from lowbit.runtime import empty_module

FORMAT_VERSIONS = (1, 2, 3, 4)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _read_meta(path: Path) -> dict:
    """The checkpoint's own config, checked before anything it names is used."""
    try:
        meta = json.loads((path / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise LowbitError(f"{path / CHECKPOINT_MARKER} is damaged (not JSON): quantize again") from None
    if not isinstance(meta, dict):
        raise LowbitError(f"{path / CHECKPOINT_MARKER} is damaged (not a JSON object): quantize again")
    if meta.get("format_version") not in FORMAT_VERSIONS:
        raise LowbitError(f"{path}: unsupported lowbit checkpoint version {meta.get('format_version')!r} "
                          f"(this lowbit reads versions {', '.join(map(str, FORMAT_VERSIONS))})")
    for key in ("layers", "aliases"):
        if not isinstance(meta.get(key), dict):
            raise LowbitError(f"{path / CHECKPOINT_MARKER} is damaged (no '{key}' table): quantize again")
    if meta.get("dtype", "float32") not in DTYPES:
        raise LowbitError(f"{path / CHECKPOINT_MARKER}: unknown dtype {meta.get('dtype')!r} "
                          f"(one of {', '.join(DTYPES)})")
    return meta


def checkpoint_meta(model: nn.Module) -> dict:
    """The ``lowbit_config.json`` of the checkpoint ``model`` was loaded from (its ``name_or_path``), or ``{}`` for a
    model that did not come from one (or whose folder is gone or damaged)."""
    source = source_of(model)
    if not source or not (Path(source) / CHECKPOINT_MARKER).is_file():
        return {}
    try:
        return _read_meta(Path(source))
    except (LowbitError, OSError):
        return {}


def _read_config(path: Path):
    try:
        return base_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LowbitError(f"{path}/config.json cannot be read "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if (path / INDEX).is_file():  # written block by block (``save_streamed``)
            return {k: v for f in sorted(set(tensor_files(path).values())) for k, v in load_file(str(f)).items()}
        return load_file(str(path / "model.safetensors"))
    except FileNotFoundError:
        raise LowbitError(f"{path} has no model.safetensors: the checkpoint is incomplete, quantize again") from None
    except Exception as exc:  # safetensors' own error type: header or data cut short or overwritten
        raise LowbitError(f"{path / 'model.safetensors'} is damaged or truncated ({str(exc).splitlines()[0]}): "
                          "quantize again") from None


def load_quantized(path: str | Path, dtype: torch.dtype | None = None
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    path = Path(path)
    meta = _read_meta(path)
    dtype = dtype or DTYPES[meta.get("dtype", "float32")]
    config = _read_config(path)
    # a skeleton whose weights take no memory (meta device; buffers such as RoPE tables are real): the
    # checkpoint's tensors become its weights below, so loading never holds a float copy of the model
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linearize(model)  # the layers as quantizing saw and saved them (Conv1D, fused experts -> nn.Linear)
    tensors = _read_tensors(path)
    try:
        _fill(model, meta, tensors, dtype)
    except (KeyError, AttributeError, RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise LowbitError(f"{path}: the checkpoint's tensors do not match its config ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}): quantize again") from None
    model.eval()
    set_source(model, str(path))  # the checkpoint; its lowbit_config.json names the base model and recipe
    return model, checkpoint_tokenizer(path, meta, config)


def checkpoint_tokenizer(path: Path, meta: dict, config=None) -> PreTrainedTokenizerBase | None:
    """The checkpoint's own tokenizer, else its base model's if that can be found."""
    if (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(path, config=config or _read_config(path))  # not lowbit_hf.py
    return _base_tokenizer(meta.get("base_model"))


def _fill(model: PreTrainedModel, meta: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Packed layers in place of the linears they replace, then every tensor of the file."""
    for name, info in meta["layers"].items():
        _put_empty(model, name, LayerSpec.from_json(info, _groups(name, info, lambda k: tensors[k].shape)))
    restore(model, meta.get("activations", {}))
    packed = tuple(f"{name}." for name in meta["layers"])
    convert = {k for k, v in tensors.items() if _takes_model_dtype(k, v, packed) and v.dtype != dtype}
    for key, value in tensors.items():
        # converting reads the file's pages, which stay resident while any tensor maps the file: then copy the
        # rest too, so that the mapping goes (SmolLM2 rtn-q4_0 in bfloat16: 830 -> 720 MB resident after loading)
        tensors[key] = value.to(dtype) if key in convert else value.clone() if convert else value
    result = model.load_state_dict(tensors, strict=False, assign=True)  # the tensors themselves: no copy
    missing = set(result.missing_keys) - set(meta["aliases"])
    if missing or result.unexpected_keys:
        raise KeyError(f"missing {sorted(missing)[:3]}, unexpected {result.unexpected_keys[:3]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in meta["aliases"].items():  # restore shared storage (tied embeddings)
        if alias in params and target in params and params[alias] is not params[target]:
            module_name, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(module_name), attr, params[target])
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise KeyError(f"no tensor for {left[:3]}")


def _groups(name: str, info: dict, shape_of) -> int | None:
    """A layer's groups: recorded since format 4, read from its scales' shape (``shape_of(key)``) before."""
    return info["groups"] if "groups" in info else int(shape_of(groups_key(name, info))[1])


def _put_empty(module: nn.Module, name: str, spec: LayerSpec) -> nn.Module:
    """An empty packed layer, as ``spec`` declares it, in place of the linear ``name``; returns that linear."""
    old = module.get_submodule(name)
    module.set_submodule(name, empty_module(spec, old.bias is not None))
    return old


def _takes_model_dtype(key: str, value: torch.Tensor, packed: tuple[str, ...]) -> bool:
    """Float tensors take the model's dtype; a packed layer's (``packed``: their prefixes) keep their own."""
    return value.is_floating_point() and not key.startswith(packed)


class DiskCheckpoint(DiskModel):
    """A lowbit checkpoint read block by block: a block's packed layers are built when it is onloaded and
    its float linears' skeletons put back when it is given back, so one block of packed tensors is held."""

    refuse_linearized = False  # the checkpoint's names are the linearized model's

    def __init__(self, path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        self.meta = _read_meta(Path(path))
        self.held: dict[str, nn.Module] = {}
        super().__init__(path, dtype or DTYPES[self.meta.get("dtype", "float32")], device)

    def config(self):
        return _read_config(self.folder)

    def prepare(self) -> None:
        restore(self.model, self.meta.get("activations", {}))

    def expected(self, name: str) -> bool:
        return name.rpartition(".")[0] not in self.meta["layers"] and name not in self.meta["aliases"]

    def onload(self, module: nn.Module, prefix: str) -> None:
        if not prefix:  # outside the blocks: float tensors, read as a float model's
            return super().onload(module, prefix)
        for name, info in self.meta["layers"].items():
            if name.startswith(prefix):
                spec = LayerSpec.from_json(info, _groups(name, info, lambda k: tensor_shape(self.files, k)))
                self.held[name] = _put_empty(module, name.removeprefix(prefix), spec)
        keys = [k for k in self.files if k.startswith(prefix)]
        packed = tuple(n.removeprefix(prefix) + "." for n in self.meta["layers"] if n.startswith(prefix))
        tensors = {}
        for key, value in read_tensors(self.files, keys).items():
            local = key.removeprefix(prefix)
            tensors[local] = value.to(self.device, self.dtype if _takes_model_dtype(local, value, packed) else None)
        result = module.load_state_dict(tensors, strict=False, assign=True)
        if result.missing_keys or result.unexpected_keys:
            raise LowbitError(f"{self.folder}: block {prefix} does not match its config (missing "
                              f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}): quantize again")

    def offload(self, module: nn.Module, prefix: str) -> None:
        for name in [n for n in self.held if n.startswith(prefix)] if prefix else []:
            module.set_submodule(name.removeprefix(prefix), self.held.pop(name))
        super().offload(module, prefix)


def _base_tokenizer(base: str | None) -> PreTrainedTokenizerBase | None:
    """A checkpoint saved without a tokenizer borrows its base model's, if that can be found."""
    from lowbit.models.aliases import ALIASES
    from lowbit.models.resolve import cache_dir

    if base in ALIASES and (cache_dir() / "models" / base / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cache_dir() / "models" / base)
    if base and Path(base).is_dir() and (Path(base) / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(base)
    return None
