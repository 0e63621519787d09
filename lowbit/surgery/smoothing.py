"""SmoothQuant's per-channel migration ``X·W ᵀ = (X·diag(s)⁻¹)·(W·diag(s))ᵀ``, folded into the model.

``1/s`` goes into what produces the channel — a norm's weight (and bias) for the attention- and
MLP-norm outputs, V's rows for the attention output (one scale per K/V channel, shared by the
query heads that read it), up-projection rows for the down-projection input (``act(gate)·up`` is
linear in ``up``) — and ``s`` into the consuming weights' columns. Before quantization the
smoothed model computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models.layout import BlockLayout
from lowbit.surgery.reorder import ReorderedNorm

MIN_SCALE = 1e-5


def smoothing_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_:,j|^(1−α)``; channels that never fire keep ``s = 1``."""
    x = x_absmax.double().clamp_min(MIN_SCALE)
    w = w_absmax.double().clamp_min(MIN_SCALE)
    s = (x.pow(alpha) / w.pow(1 - alpha)).clamp_min(MIN_SCALE)
    return torch.where(x_absmax > 0, s, torch.ones_like(s)).float()


def consumers(layout: BlockLayout, site: str) -> tuple[str, ...]:
    return {"attn_in": (layout.q, layout.k, layout.v), "attn_out": (layout.o,), "mlp_in": layout.mlp_in,
            "mlp_mid": layout.down}[site]


def column_absmax(block: nn.Module, layout: BlockLayout, site: str) -> torch.Tensor:
    """``max |W_:,j|`` over every weight that reads channel ``j`` of ``site``."""
    return torch.stack([block.get_submodule(n).weight.detach().abs().amax(0).float().cpu()
                        for n in consumers(layout, site)]).amax(0)


def kv_shared(values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Attention-output channels ``(heads·d)`` -> one value per K/V channel (max over its query heads)."""
    return values.view(layout.kv_heads, layout.group, layout.head_dim).amax(1).reshape(-1)


def expand_kv(values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """One value per K/V channel -> every query head's copy."""
    return values.view(layout.kv_heads, 1, layout.head_dim).expand(-1, layout.group, -1).reshape(-1)


def _scale_norm(norm: nn.Module, inv: torch.Tensor) -> None:
    inner = norm.norm if isinstance(norm, ReorderedNorm) else norm  # scales are in output order either way
    offset = 1.0 if type(inner).__name__.startswith("Gemma") else 0.0  # Gemma norms scale by (1 + w)
    w = inner.weight.data
    inner.weight.data = ((offset + w.float()) * inv.to(w.device) - offset).to(w.dtype)
    if getattr(inner, "bias", None) is not None:
        inner.bias.data = inner.bias.data * inv.to(inner.bias.device, inner.bias.dtype)


def _scale_rows(layer: nn.Module, inv: torch.Tensor) -> None:
    layer.weight.data = layer.weight.data * inv.to(layer.weight.device, layer.weight.dtype)[:, None]
    if layer.bias is not None:
        layer.bias.data = layer.bias.data * inv.to(layer.bias.device, layer.bias.dtype)


def _scale_cols(layer: nn.Module, s: torch.Tensor) -> None:
    layer.weight.data = layer.weight.data * s.to(layer.weight.device, layer.weight.dtype)[None, :]


def fold_smoothing(block: nn.Module, layout: BlockLayout, scales: dict[str, torch.Tensor]) -> None:
    """Fold per-site scales (``attn_out``: one per K/V channel) into the block."""
    get = block.get_submodule
    for site, s in scales.items():
        inv = 1.0 / s
        if site in ("attn_in", "mlp_in"):
            _scale_norm(get(layout.attn_norm if site == "attn_in" else layout.mlp_norm), inv)
        elif site == "attn_out":
            _scale_rows(get(layout.v), inv)
            s = expand_kv(s, layout)
        elif site == "mlp_mid":
            _scale_rows(get(layout.mlp_in[-1]), inv)  # up (fc1 for OPT): the factor the output is linear in
        for name in consumers(layout, site):
            _scale_cols(get(name), s)
