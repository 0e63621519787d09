"""``--format compressed-tensors``: the ``pack-quantized`` layout that ``transformers`` (with the
``compressed-tensors`` package) and vLLM load.

Per quantized linear: ``weight_packed`` (each row's unsigned codes as an LSB-first stream of int32 words),
``weight_scale`` (rows × groups), ``weight_shape``, and for asymmetric grids ``weight_zero_point`` (the
unsigned zero points packed the same way along the output dimension). The consumer computes
``scale·(q − zero)`` exactly as lowbit's reference path does, so the weights are the same floats.
Groups must be equal runs of input columns (no act-order ``g_idx``, no smaller last group): that is what
compressed-tensors 0.19+ reads. Layouts checked against the package's own ``pack_to_int32``
(``docs/experiments/2026-12-07-export-formats.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.export.formats.source import Source, refusal, symmetric, uniform_layers
from lowbit.grids.packing import pack_rows_int32
from lowbit.runtime import QuantLinear

NAME = "compressed-tensors"
FORMAT = "pack-quantized"
CT_VERSION = "0.20.1"  # the version the layout was checked against (pyproject's `export` extra)


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors config group: what every layer in it shares."""

    bits: int
    symmetric: bool
    group_size: int | None

    def weights(self) -> dict:
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "dynamic": False,
                "strategy": "channel" if self.group_size is None else "group", "group_size": self.group_size}


def _nearest_group(src: Source, group_size: int) -> int:
    """The largest power-of-two group size ≤ ``group_size`` that divides every quantized layer's width."""
    width = math.gcd(*(m.in_features for m in src.layers.values()))
    g = 1 << (group_size.bit_length() - 1)
    while width % g:
        g //= 2
    return g


def check(src: Source) -> dict[str, Scheme]:
    """Each layer's scheme, or a one-line error naming what this format cannot hold and what can."""
    schemes = {}
    for name, m in uniform_layers(src, NAME).items():
        if m.g_idx is not None:
            raise refusal(NAME, "act-order group indices (g_idx)", [name],
                          "quantize with --set weights.act_order=false, or use --format dense")
        if m.group_size is not None and m.in_features % m.group_size:
            raise refusal(NAME, f"a smaller last group ({m.in_features} columns in groups of {m.group_size})", [name],
                          f"quantize with --set weights.group_size={_nearest_group(src, m.group_size)}, "
                          "or use --format dense")
        if not 2 <= m.bits <= 8:
            raise refusal(NAME, f"{m.bits}-bit codes", [name], "use --format dense")
        schemes[name] = Scheme(m.bits, symmetric(m), m.group_size)
    return schemes


def layer_tensors(m: QuantLinear, scheme: Scheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    qw = m.quantized()
    tensors = {
        "weight_packed": pack_rows_int32(qw.codes.to(torch.int64), m.bits),
        "weight_scale": qw.scale.to(dtype).contiguous(),  # lowbit's float16 scales: exact in a float32 model
        "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
    }
    if not scheme.symmetric:
        zero = qw.zero.round().to(torch.int64)
        tensors["weight_zero_point"] = pack_rows_int32(zero.t().contiguous(), m.bits).t().contiguous()
    if m.bias is not None:
        tensors["bias"] = m.bias.detach().to(dtype)
    return tensors


def quantization_config(src: Source, schemes: dict[str, Scheme]) -> dict:
    kinds = sorted(set(schemes.values()), key=lambda s: (s.bits, s.symmetric, s.group_size or 0))
    groups = {}
    for i, scheme in enumerate(kinds):
        names = [n for n, s in schemes.items() if s == scheme]
        targets = ["Linear"] if len(kinds) == 1 else names  # several schemes: each layer by its exact name
        groups[f"group_{i}"] = {"targets": targets, "format": FORMAT, "weights": scheme.weights(),
                                "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "version": CT_VERSION, "config_groups": groups, "ignore": sorted(src.plain_linears() - set(schemes)),
            "sparsity_config": {}, "transform_config": {}, "global_compression_ratio": None,
            "kv_cache_scheme": None}


def write(src: Source, out: Path) -> None:
    from lowbit.export.formats.hf_folder import write_hf_folder

    schemes = check(src)
    dtype = src.dtype
    tensors = src.float_tensors()
    for name, m in src.layers.items():
        for key, value in layer_tensors(m, schemes[name], dtype).items():
            tensors[f"{name}.{key}"] = value
    write_hf_folder(src, out, tensors, {"quantization_config": quantization_config(src, schemes)})
