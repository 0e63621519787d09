"""Folding RPTQ's channel permutations into the model, so no reorder op runs between layers.

* norm outputs (R1, R4): the norm's weight (and bias) are permuted and the norm writes its output
  in cluster order (:class:`ReorderedNorm`; the statistics of a norm do not depend on channel
  order, so in a fused kernel this is only a different write address); the consuming linears'
  input columns are permuted the same way.
* the attention output (R3): V's output rows are permuted inside each K/V head, which permutes the
  attention output of every query head reading it, and ``o``'s input columns follow.
* the MLP's inner activation (R5): gate/up (fc1) rows and bias, and down (fc2) columns.
* q/k (R2, only without RoPE): q and k rows permuted identically inside each head, so every
  ``q·k`` score is unchanged and the K cache is stored in cluster order.

New channel ``i`` is old channel ``perm[i]`` everywhere. Before quantization the reordered model
computes exactly the same function (tested on every supported architecture).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.layout import BlockLayout


class ReorderedNorm(nn.Module):
    """A norm whose output comes out permuted: ``norm'(x[..., perm])`` with permuted weights."""

    def __init__(self, norm: nn.Module, perm: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("perm", perm.clone().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.index_select(-1, self.perm))


def _rows(layer: nn.Module, perm: torch.Tensor) -> None:
    layer.weight.data = layer.weight.data[perm].contiguous()
    if getattr(layer, "bias", None) is not None:
        layer.bias.data = layer.bias.data[perm].contiguous()


def _cols(layer: nn.Module, perm: torch.Tensor) -> None:
    layer.weight.data = layer.weight.data[:, perm].contiguous()


def _permute_norm(block: nn.Module, name: str, perm: torch.Tensor) -> None:
    norm = block.get_submodule(name)
    if isinstance(norm, ReorderedNorm):  # compose: already-permuted output, permuted again
        norm.perm.copy_(norm.perm[perm])
        inner = norm.norm
    else:
        inner = norm
        block.set_submodule(name, ReorderedNorm(norm, perm.to(norm.weight.device)))
    _rows(inner, perm.to(inner.weight.device))


def expand_kv_perm(perm_kv: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """A permutation inside each K/V head, repeated for every query head that reads that head."""
    d = layout.head_dim
    local = perm_kv.view(layout.kv_heads, d) - torch.arange(layout.kv_heads).unsqueeze(1) * d
    return torch.cat([local[h // layout.group] + h * d for h in range(layout.heads)])


def fold_permutations(block: nn.Module, layout: BlockLayout, perms: dict[str, torch.Tensor]) -> None:
    """Apply the permutations named ``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_mid``, ``qk``."""
    get = block.get_submodule
    if "attn_in" in perms:
        p = perms["attn_in"]
        _permute_norm(block, layout.attn_norm, p)
        for name in (layout.q, layout.k, layout.v):
            _cols(get(name), p.to(get(name).weight.device))
    if "attn_out" in perms:  # permutation over the K/V heads' channels
        p = perms["attn_out"].to(get(layout.v).weight.device)
        _rows(get(layout.v), p)
        _cols(get(layout.o), expand_kv_perm(p.cpu(), layout).to(p.device))
    if "qk" in perms:
        if layout.rope:
            raise ValueError("q/k channels cannot be permuted under RoPE")
        _rows(get(layout.q), perms["qk"])
        _rows(get(layout.k), perms["qk"])
    if "mlp_in" in perms:
        p = perms["mlp_in"]
        _permute_norm(block, layout.mlp_norm, p)
        for name in layout.mlp_in:
            _cols(get(name), p.to(get(name).weight.device))
    if "mlp_mid" in perms:
        p = perms["mlp_mid"]
        for name in layout.mlp_in:
            _rows(get(name), p.to(get(name).weight.device))
        for name in layout.down:
            _cols(get(name), p.to(get(name).weight.device))


def reordered_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ReorderedNorm)]
