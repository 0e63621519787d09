"""Models larger than memory: a weightless skeleton whose blocks are read from disk one at a time.

The skeleton is built on the meta device (its weights take no memory; buffers such as RoPE tables
are real). :class:`DiskModel` reads a module's tensors from the folder's safetensors files when
the module is needed (:meth:`DiskModel.onloaded`) and gives them back after, so that a pass over
the model holds one block's weights plus what lies outside the blocks (embeddings, final norm,
head), in the files' own dtype unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lowbit.errors import LowbitError
from lowbit.memory import map_large_allocations
from lowbit.models.adapters import find_blocks
from lowbit.models.linearize import linearize
from lowbit.models.resolve import tensor_files

RUNTIME_BYTES = 600 * 2**20  # resident once torch and transformers are imported, before any weight


def read_tensors(files: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors, each file opened once (only those tensors' bytes are read)."""
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for path, names in by_file.items():
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in names})
    return out


def _slots(module: nn.Module) -> dict[int, tuple[nn.Parameter, list[str]]]:
    """Each distinct parameter of ``module`` and every name it goes by (a tied head shares the embedding)."""
    slots: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        slots.setdefault(id(p), (p, []))[1].append(name)
    return slots


def _set(module: nn.Module, names: list[str], value: nn.Parameter) -> None:
    for name in names:
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, attr, value)


class DiskModel:
    """A model folder's skeleton and its tensors on disk; blocks are onloaded one at a time."""

    refuse_linearized = True  # a float model's files name Conv1D / fused-expert tensors, not nn.Linear ones

    def __init__(self, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        map_large_allocations()  # freed blocks go back to the system, not to a heap that only grows
        self.folder = Path(folder)
        self.files = tensor_files(self.folder)
        with safe_open(str(next(iter(self.files.values()))), "pt") as f:
            first = f.get_slice(next(iter(f.keys()))).get_dtype()
        stored = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(first, torch.float32)
        self.dtype = dtype or stored  # the files' own dtype unless told otherwise
        self.device = torch.device(device)
        with init_empty_weights(include_buffers=False):
            self.model: PreTrainedModel = AutoModelForCausalLM.from_config(self.config(), dtype=self.dtype)
        self.model.tie_weights()  # a tied head is the embedding (the files hold it once)
        self.model.eval()
        if (replaced := linearize(self.model)) and self.refuse_linearized:
            raise LowbitError(f"onloading block by block needs the quantized weights to be nn.Linear layers; "
                              f"{', '.join(replaced[:3])} are not (GPT-2 Conv1D, fused experts): run "
                              "without --onload")
        self.blocks_path, self.blocks = find_blocks(self.model)
        self.prepare()
        missing = [names[0] for _, names in _slots(self.model).values()
                   if not any(n in self.files or not self.expected(n) for n in names)]
        if missing:
            raise LowbitError(f"{self.folder}: the files' tensor names are not the model's ({missing[0]} is not "
                              "in them): run without --onload")

    def config(self):
        return AutoConfig.from_pretrained(self.folder)

    def prepare(self) -> None:
        """What the skeleton needs before its tensors are read (a checkpoint: its activation quantizers)."""

    def expected(self, name: str) -> bool:
        """Whether the files hold the parameter ``name`` as it is (a checkpoint packs its quantized layers)."""
        return True

    def block_prefix(self, b: int) -> str:
        return f"{self.blocks_path}.{b}."

    def onload(self, module: nn.Module, prefix: str) -> None:
        """Give every meta parameter of ``module`` (named ``prefix`` + its name) its tensor from disk."""
        slots = [(p, names) for p, names in _slots(module).values() if p.is_meta]
        keys = [next(prefix + n for n in names if prefix + n in self.files) for _, names in slots]
        tensors = read_tensors(self.files, keys)
        for (p, names), key in zip(slots, keys):
            value = tensors.pop(key).to(self.device, self.dtype if p.is_floating_point() else None)
            _set(module, names, nn.Parameter(value, requires_grad=False))

    def offload(self, module: nn.Module, prefix: str) -> None:
        """Give the memory of ``module``'s parameters back: each becomes a meta tensor of its shape again."""
        for p, names in _slots(module).values():
            if not p.is_meta:
                _set(module, names, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))

    def outside(self) -> nn.Module:
        """The model less its blocks: what onloading the embeddings, final norm and head reads."""
        return _Outside(self.model, self.blocks_path)

    @contextmanager
    def onloaded(self, b: int | None) -> Iterator[nn.Module]:
        """Block ``b`` (``None``: everything outside the blocks) with its weights, given back on leaving."""
        module = self.blocks[b] if b is not None else self.outside()
        self.onload(module, self.block_prefix(b) if b is not None else "")
        try:
            yield module
        finally:
            self.offload(module, self.block_prefix(b) if b is not None else "")

    def block_bytes(self) -> int:
        """The weights of the largest block, in the dtype they are onloaded in."""
        return max(sum(p.numel() for p in blk.parameters()) for blk in self.blocks) * self.dtype.itemsize

    def outside_bytes(self) -> int:
        return sum(p.numel() for _, p in self.outside().named_parameters()) * self.dtype.itemsize

    def memory_need(self, nsamples: int, seqlen: int) -> dict[str, int]:
        """What quantizing one block holds at once, in bytes, by part (an estimate from the shapes)."""
        linears = [m for m in self.blocks[0].modules() if isinstance(m, nn.Linear)]
        largest = max((m.weight.numel() for m in linears), default=0)
        widest = max((m.in_features for m in linears), default=0)
        hidden = self.model.config.get_text_config().hidden_size
        return {
            "block weights": self.block_bytes(),
            "one layer's rounding in float32": 3 * 4 * largest,  # weight, its copy, the update
            "one Hessian in float64": 2 * 8 * widest * widest,  # the sum and its factorisation
            # a block's inputs and outputs
            "calibration activations": 2 * nsamples * seqlen * hidden * self.dtype.itemsize,
            "embeddings and head": self.outside_bytes(),  # held while block 0's inputs are captured
            "torch and transformers": RUNTIME_BYTES,
        }


def peak_need(parts: dict[str, int]) -> int:
    """The most held at once: the embeddings are given back before the first block is read."""
    block = parts["block weights"] + parts["one layer's rounding in float32"] + parts["one Hessian in float64"]
    return parts["torch and transformers"] + parts["calibration activations"] + max(block, parts["embeddings and head"])


class _Outside(nn.Module):
    """A view of a model's parameters outside its blocks, under their own names (for onloading)."""

    def __init__(self, model: nn.Module, blocks_path: str):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: named_parameters below is the whole point
        self.__dict__["skip"] = blocks_path + "."

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self.model.named_parameters(remove_duplicate=remove_duplicate):
            if not name.startswith(self.skip):
                yield prefix + name, p

    def get_submodule(self, target: str) -> nn.Module:
        return self.model.get_submodule(target)
