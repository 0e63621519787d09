"""A saved lowbit checkpoint as every exporter reads it: the packed model, its tokenizer, its layers,
and the plain Hugging Face model it came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from lowbit.activations.install import KINDS
from lowbit.errors import LowbitError
from lowbit.models.resolve import CHECKPOINT_MARKER
from lowbit.runtime import QuantLinear
from lowbit.runtime.build import packed_layers


@dataclass(frozen=True)
class Source:
    path: Path
    model: PreTrainedModel  # lowbit's packed model (reference path)
    tokenizer: PreTrainedTokenizerBase | None
    meta: dict  # lowbit_config.json
    layers: dict[str, nn.Module]  # the packed layers, in model order (outermost wrapper of each)

    @property
    def recipe_name(self) -> str:
        return str(self.meta.get("recipe", {}).get("name", "?"))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def plain_linears(self) -> set[str]:
        """``nn.Linear`` names of the model as ``transformers`` builds it (before lowbit linearized GPT-2's
        ``Conv1D`` or fused experts): a format can only name layers the consumer will build."""
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(self.model.config)
        return {n for n, m in plain.named_modules() if isinstance(m, nn.Linear)}

    def linearized(self) -> list[str]:
        """Packed layers that are no ``nn.Linear`` in the consumer's model (GPT-2 ``Conv1D``, fused experts)."""
        plain = self.plain_linears()
        return [n for n in self.layers if n not in plain]

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not part of a packed layer or an activation quantizer, shared storage written
        once (a tied head is the embedding: the consumer ties it again from the config)."""
        skip = tuple(f"{name}." for name in self.layers)
        seen: set[tuple] = set()
        tensors = {}
        for key, value in self.model.state_dict().items():
            if key.startswith(skip) or any(f".{kind}." in f".{key}" for kind in KINDS):
                continue
            ident = (value.data_ptr(), value.shape, value.dtype)
            if ident in seen:
                continue
            seen.add(ident)
            tensors[key] = value.detach().cpu().contiguous()
        return tensors


def open_checkpoint(path: str | Path) -> Source:
    from lowbit.export.load import load_quantized

    path = Path(path)
    if not (path / CHECKPOINT_MARKER).is_file():
        raise LowbitError(f"{path} is not a lowbit checkpoint (no {CHECKPOINT_MARKER})")
    model, tokenizer = load_quantized(path)
    meta = json.loads((path / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    return Source(path, model, tokenizer, meta, packed_layers(model))


LINEARIZED = "layers that transformers does not build as nn.Linear (GPT-2 Conv1D, fused experts)"


def symmetric(m: QuantLinear) -> bool:
    """Whether every zero point is the grid's middle, ``2^(bits−1)`` (the symmetric grid formats name)."""
    return bool(torch.all(m.zero_points() == 2 ** (m.bits - 1)))


def refusal(fmt: str, what: str, names: list[str], advice: str) -> LowbitError:
    """One line: which format, what it cannot hold, where, and what to do instead."""
    where = f"{names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
    return LowbitError(f"--format {fmt} cannot express {what} ({where}): {advice}")


def uniform_layers(src: Source, fmt: str) -> dict[str, QuantLinear]:
    """The checks every serving format shares: weight-only, plain ``nn.Linear`` layers in the consumer's
    model, each a uniform grid of codes with one scale and integer zero per row and group — or a one-line
    error naming what is in the way and what would export."""
    activations = src.meta.get("activations") or {}
    if activations:
        raise refusal(fmt, "lowbit's calibrated activation quantizers or reordered channels",
                      sorted(activations.get("quantizers") or activations.get("reordered_norms")),
                      "export a weight-only recipe, or --format dense (float activations)")
    odd = src.linearized()
    if odd:
        raise refusal(fmt, LINEARIZED, odd, "use --format dense")
    other = [n for n, m in src.layers.items() if type(m) is not QuantLinear]
    if other:
        kinds = sorted({type(src.layers[n]).__name__ for n in other})
        raise refusal(fmt, f"{'/'.join(kinds)} layers (incoherence transforms, low-rank branches or binary weights)",
                      other, "use --format dense, or a plain uniform-grid recipe (rtn-*, gptq-*)")
    for name, m in src.layers.items():
        if m.n_outliers or m.stats_bits or m.float_zeros:
            what = ("sparse outliers" if m.n_outliers else "quantized scales" if m.stats_bits
                    else "non-integer zero points")
            raise refusal(fmt, what, [name], "use --format dense")
    return dict(src.layers)
