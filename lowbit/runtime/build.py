"""Which runtime module serves a quantized layer, built from codes (save) or from metadata (load), and
which back-end computes it."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.format import LayerSpec
from lowbit.format.codec import encode, spec_of
from lowbit.rounding import QuantizedWeight
from lowbit.rounding.binary import BinaryWeight
from lowbit.runtime.binary import BinaryLinear
from lowbit.runtime.kernels import kernel_for
from lowbit.runtime.lowrank import LowRankLinear
from lowbit.runtime.qlinear import QuantLinear
from lowbit.runtime.quip import QuipLinear


def empty_module(spec: LayerSpec, bias: bool) -> nn.Module:
    """The runtime module for ``spec``, its buffers the declared tensors (zeros, to be filled by
    ``load_state_dict``): a grid layer, inside a QuIP layer, inside a low-rank branch, as the spec has them."""
    if spec.binary:
        return BinaryLinear(spec, bias)
    module = QuantLinear(spec, bias and spec.incoherence is None)
    if spec.incoherence is not None:
        module = QuipLinear(module, spec, bias)
    if spec.lowrank_rank:
        module = LowRankLinear(module, spec)
    return module


def packed_module(qw: QuantizedWeight | BinaryWeight, bias: torch.Tensor | None) -> nn.Module:
    """The runtime module that serves ``qw`` (and ``bias``), holding the tensors its spec encodes."""
    spec = spec_of(qw)
    module = empty_module(spec, bias is not None)
    result = module.load_state_dict(encode(spec, qw), strict=False, assign=True)
    assert not result.unexpected_keys and set(result.missing_keys) <= {spec.bias_key}, result  # spec vs modules
    if bias is not None:
        module.get_parameter(spec.bias_key).data = bias.detach().clone()
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
