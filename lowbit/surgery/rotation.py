"""QuaRot's rotation of the residual stream, folded into the weights: the model computes the same function.

With the residual stream written as row vectors ``x`` and a seeded orthogonal ``Q`` (hidden × hidden), the
rotated model carries ``x' = x·Q`` between blocks:

* every RMSNorm's scale ``γ`` is first folded into the linears that read its output (``W ← W·diag(γ)``,
  ``γ ← 1``): an RMSNorm without a scale commutes with ``Q`` (``‖x·Q‖ = ‖x‖``);
* the embeddings write rotated rows (``E ← E·Q``), and so does every linear that writes into the stream —
  attention's output projection and the MLP's down projection (``W ← Qᵀ·W``, bias ``b ← b·Q``);
* every linear that reads the stream — q/k/v, gate/up, the head — undoes it on its input (``W ← W·Q``).

A tied head is untied (the head takes the final norm's scale, the embedding does not). Outliers of the stream
are spread over all its channels, so the stream's readers see inputs that quantize to few bits (QuaRot,
Ashkboos et al. 2024). What cannot be folded — the down projection's input, inside the MLP — is not rotated
here. Families: RMSNorm decoder blocks with pre-norms only (Llama, Mistral, Qwen2/3, Phi-3); LayerNorm
(OPT, GPT-2), Gemma's ``1 + γ`` norms around its sub-layers and mixture-of-experts routers are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models import find_blocks
from lowbit.models.layout import BlockLayout, block_layout
from lowbit.models.linearize import router_names
from lowbit.transforms.orthogonal import make_orthogonal


def rotation_matrix(kind: str, hidden: int, seed: int) -> torch.Tensor:
    """The dense ``Q`` (float64): a randomized Hadamard (Kronecker-extended where ``hidden`` is not a power of
    two, as QuIP's) or a Kronecker of random orthogonals."""
    return make_orthogonal(kind, hidden, seed).matrix(torch.float64)


def _norm_of(model: nn.Module) -> nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise LowbitError(f"{type(model).__name__}: no final norm found to fold (rotation needs RMSNorm models)")
    return norm


def _check_norm(norm: nn.Module, where: str) -> None:
    """An RMSNorm whose scale is its ``weight`` (``x / rms(x) · γ``, no bias): then, with ``γ = 1``, it
    commutes with any orthogonal ``Q``. Checked on numbers, not on class names."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or getattr(norm, "bias", None) is not None or weight.dim() != 1:
        raise LowbitError(f"rotation needs RMSNorm blocks: {where} ({type(norm).__name__}) is not one")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, weight.numel(), generator=g).to(weight.dtype)
    gamma = torch.rand(weight.numel(), generator=g).to(weight.dtype) + 0.5
    with torch.no_grad():
        saved = weight.detach().clone()
        weight.copy_(torch.ones_like(weight))
        unit = norm(x)
        weight.copy_(gamma)
        scaled = norm(x)
        weight.copy_(saved)
    if not torch.allclose(scaled, unit * gamma, rtol=1e-3, atol=1e-3):
        raise LowbitError(f"rotation needs RMSNorm blocks that scale by their weight: {where} "
                          f"({type(norm).__name__}) does not (Gemma's 1 + γ, a LayerNorm)")


def _layouts(model: nn.Module, blocks: nn.ModuleList) -> list[BlockLayout]:
    layouts = []
    for i, block in enumerate(blocks):
        if router_names(block) or any(n.endswith("experts") for n, _ in block.named_modules()):
            raise LowbitError("rotation of mixture-of-experts blocks is not supported (their routers read the stream)")
        try:
            layout = block_layout(block, model.config)
        except LowbitError:
            raise LowbitError(f"rotation needs RMSNorm decoder blocks (Llama, Mistral, Qwen2/3, Phi-3): "
                              f"{type(block).__name__} is not one") from None
        names = dict(block.named_modules())
        if any(n in names for n in ("post_attention_layernorm", "post_feedforward_layernorm")) and \
                layout.mlp_norm != "post_attention_layernorm":
            raise LowbitError(f"rotation needs pre-norm blocks only: block {i} normalises its sub-layers' outputs "
                              "(Gemma-style)")
        for norm in (layout.attn_norm, layout.mlp_norm):
            _check_norm(block.get_submodule(norm), f"block {i}'s {norm}")
        layouts.append(layout)
    return layouts


def _fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
    gamma = norm.weight.detach().to(torch.float64)
    for lin in readers:
        lin.weight.data = (lin.weight.detach().to(torch.float64) * gamma).to(lin.weight.dtype)
    norm.weight.data = torch.ones_like(norm.weight)


def _read(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (lin.weight.detach().to(torch.float64) @ q).to(lin.weight.dtype)


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (q.T @ lin.weight.detach().to(torch.float64)).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.detach().to(torch.float64) @ q).to(lin.bias.dtype)


def _untie_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
        if text is not None and text is not model.config:
            text.tie_word_embeddings = False
    return head


@torch.no_grad()
def rotate_residual(model: nn.Module, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """Fold every RMSNorm's scale into its readers, then rotate the residual stream by ``Q`` (returned);
    in place. The rotated model computes the same function (to float rounding)."""
    _, blocks = find_blocks(model)
    layouts = _layouts(model, blocks)
    final = _norm_of(model)
    _check_norm(final, "the final norm")
    head = _untie_head(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    q = rotation_matrix(kind, hidden, seed)
    for block, layout in zip(blocks, layouts):
        attn_in = [block.get_submodule(n) for n in dict.fromkeys((layout.q, layout.k, layout.v))]
        mlp_in = [block.get_submodule(n) for n in layout.mlp_in]
        _fold(block.get_submodule(layout.attn_norm), attn_in)
        _fold(block.get_submodule(layout.mlp_norm), mlp_in)
        for lin in (*attn_in, *mlp_in):
            _read(lin, q)
        for name in (layout.o, *layout.down):
            _write(block.get_submodule(name), q)
    _fold(final, [head])
    _read(head, q)
    emb = model.get_input_embeddings()
    emb.weight.data = (emb.weight.detach().to(torch.float64) @ q).to(emb.weight.dtype)
    return q
