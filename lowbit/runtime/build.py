"""Which runtime module serves a quantized layer, built from codes (save) or from metadata (load)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.rounding import QuantizedWeight
from lowbit.runtime.qlinear import QuantLinear
from lowbit.runtime.quip import QuipLinear
from lowbit.transforms.incoherence import Incoherence


def packed_module(qw: QuantizedWeight, bias: torch.Tensor | None, group_size: int | None) -> nn.Module:
    if qw.transform is not None:
        return QuipLinear.from_quantized(qw, bias, group_size)
    return QuantLinear.from_quantized(qw, bias, group_size)


def layer_metadata(module: nn.Module, group_size: int | None) -> dict:
    """What ``lowbit_config.json`` records per layer to rebuild ``module`` before loading tensors."""
    inner = module.inner if isinstance(module, QuipLinear) else module
    info = {"bits": inner.bits, "group_size": group_size, "shape": [inner.out_features, inner.in_features],
            "act_order": inner.g_idx is not None, "float_zeros": inner.float_zeros}
    if isinstance(module, QuipLinear):
        info["incoherence"] = module.transform.metadata()
    return info


def empty_module(info: dict, n_groups: int, bias: bool) -> nn.Module:
    """A module of the right type and shapes, to be filled by ``load_state_dict``."""
    out_f, in_f = info["shape"]
    inc = info.get("incoherence")
    inner = QuantLinear(in_f, out_f, info["bits"], n_groups, bias and inc is None, info["act_order"],
                        info["group_size"], info.get("float_zeros", False))
    if inc is None:
        return inner
    return QuipLinear(inner, Incoherence.from_metadata(inc, torch.ones(in_f), out_f), bias)
