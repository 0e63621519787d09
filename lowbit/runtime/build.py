"""Which runtime module serves a quantized layer, built from codes (save) or from metadata (load), and
which back-end computes it."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lowbit.rounding import QuantizedWeight
from lowbit.rounding.binary import BinaryWeight
from lowbit.runtime.binary import BinaryLinear
from lowbit.runtime.kernels import kernel_for
from lowbit.runtime.lowrank import LowRankLinear
from lowbit.runtime.qlinear import QuantLinear
from lowbit.runtime.quip import QuipLinear
from lowbit.transforms.incoherence import Incoherence


def packed_module(qw: QuantizedWeight | BinaryWeight, bias: torch.Tensor | None, group_size: int | None) -> nn.Module:
    if isinstance(qw, BinaryWeight):
        return BinaryLinear.from_binary(qw, bias)
    base = dataclasses.replace(qw, lowrank=None)
    module = (QuipLinear if qw.transform is not None else QuantLinear).from_quantized(base, bias, group_size)
    return LowRankLinear.wrap(module, qw.lowrank) if qw.lowrank is not None else module


def _core(module: nn.Module) -> QuantLinear:
    while not isinstance(module, QuantLinear):
        module = module.inner
    return module


def layer_metadata(module: nn.Module, group_size: int | None) -> dict:
    """What ``lowbit_config.json`` records per layer to rebuild ``module`` before loading tensors."""
    if isinstance(module, BinaryLinear):
        return {"bits": 1, "binary": True, "shape": [module.out_features, module.in_features],
                "n_salient": module.n_salient, "blocksize": module.blocksize}
    inner = _core(module)
    info = {"bits": inner.bits, "group_size": group_size, "shape": [inner.out_features, inner.in_features],
            "act_order": inner.g_idx is not None, "float_zeros": inner.float_zeros}
    if inner.n_outliers:
        info["outliers"] = inner.n_outliers
    if inner.stats_bits:
        info["stats_bits"] = inner.stats_bits
    quip = module.inner if isinstance(module, LowRankLinear) else module
    if isinstance(quip, QuipLinear):
        info["incoherence"] = quip.transform.metadata()
    if isinstance(module, LowRankLinear):
        info["lowrank_rank"] = module.a.shape[1]
    return info


def scales_key(name: str, info: dict) -> str:
    """Where a layer's ``scales`` tensor sits in the checkpoint (it gives the number of groups;
    for a binary layer, ``alphas`` gives the number of blocks)."""
    if info.get("binary"):
        return f"{name}.alphas"
    depth = ("incoherence" in info) + ("lowrank_rank" in info)
    return f"{name}." + "inner." * depth + ("scale_lo" if info.get("stats_bits") else "scales")


def empty_module(info: dict, n_groups: int, bias: bool) -> nn.Module:
    """A module of the right type and shapes, to be filled by ``load_state_dict``."""
    out_f, in_f = info["shape"]
    if info.get("binary"):
        return BinaryLinear(in_f, out_f, info["n_salient"], n_groups, info["blocksize"], bias)
    inc = info.get("incoherence")
    module = QuantLinear(in_f, out_f, info["bits"], n_groups, bias and inc is None, info["act_order"],
                         info["group_size"], info.get("float_zeros", False), info.get("outliers", 0),
                         info.get("stats_bits"))
    if inc is not None:
        module = QuipLinear(module, Incoherence.from_metadata(inc, torch.ones(in_f), out_f), bias)
    if info.get("lowrank_rank"):
        module = LowRankLinear(module, info["lowrank_rank"])
    return module


def packed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The packed layers of a loaded model, in model order: the outermost module of each (a QuIP or low-rank
    wrapper speaks for the layer inside it)."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuipLinear, LowRankLinear, BinaryLinear)) and \
                not any(name.startswith(f"{outer}.") for outer in layers):
            layers[name] = module
    return layers


def layer_bias(module: nn.Module) -> torch.Tensor | None:
    """A linear's bias, or a packed layer's, wherever its wrappers keep it (a low-rank branch wraps the layer
    that holds it)."""
    while getattr(module, "bias", None) is None and hasattr(module, "inner"):
        module = module.inner
    return getattr(module, "bias", None)


def use_kernels(model: nn.Module, enable: bool = True) -> dict[str, str]:
    """Give every packed layer of ``model`` its CPU back-end (``enable=False``: the reference path again);
    returns each layer's back-end name."""
    chosen = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.kernel = kernel_for(m.quantized(), m.group_size) if enable else None
            chosen[name] = m.kernel.name if m.kernel is not None else "reference"
    return chosen
