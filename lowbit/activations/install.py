"""Attaching quantizers to a model, and describing them for a checkpoint.

A quantizer is a child module named after where it acts, so its calibrated tables are saved
with the model's ``state_dict``: ``act_in`` (a pre-hook on the module's input), ``act_out`` (a
hook on its output), ``k_quant``/``v_quant`` (on an attention module, run by the attention
interface). Hooks are not saved; :func:`restore` re-creates them from the checkpoint metadata.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.activations.attention import use_lowbit_attention
from lowbit.activations.quantizer import ActQuantizer
from lowbit.surgery.reorder import ReorderedNorm

KINDS = ("act_in", "act_out", "k_quant", "v_quant")


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.act_in(args[0]),) + tuple(args[1:])


def _quantize_output(module: nn.Module, _args: tuple, output):
    return module.act_out(output)


def attach(module: nn.Module, kind: str, quantizer: ActQuantizer, config=None) -> None:
    """Install ``quantizer`` on ``module`` (replacing one of the same kind)."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantizer kind {kind!r}")
    had = isinstance(getattr(module, kind, None), ActQuantizer)
    module.add_module(kind, quantizer)
    if kind == "act_in" and not had:
        module.register_forward_pre_hook(_quantize_input)
    elif kind == "act_out" and not had:
        module.register_forward_hook(_quantize_output)
    elif kind in ("k_quant", "v_quant"):
        use_lowbit_attention(config if config is not None else module.config)


def activation_metadata(model: nn.Module) -> dict:
    """What a checkpoint records to rebuild the activation quantizers and reordered norms."""
    quantizers = {}
    for path, module in model.named_modules():
        for kind in KINDS:
            q = module._modules.get(kind)
            if isinstance(q, ActQuantizer):
                quantizers[f"{path}.{kind}"] = q.metadata()
    norms = {n: int(m.perm.numel()) for n, m in model.named_modules() if isinstance(m, ReorderedNorm)}
    return {"quantizers": quantizers, "reordered_norms": norms} if quantizers or norms else {}


def restore(model: nn.Module, meta: dict) -> None:
    """Empty quantizers and reordered norms of the right shapes, for ``load_state_dict`` to fill."""
    for path, size in meta.get("reordered_norms", {}).items():
        model.set_submodule(path, ReorderedNorm(model.get_submodule(path), torch.arange(size)))
    for full, info in meta.get("quantizers", {}).items():
        path, _, kind = full.rpartition(".")
        attach(model.get_submodule(path), kind, ActQuantizer.from_metadata(info), model.config)
