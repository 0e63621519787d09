"""Model surgery that makes every weight lowbit quantizes an ``nn.Linear``, with the same outputs.

Two kinds of layer hold matrices outside ``nn.Linear``:

- GPT-2's ``Conv1D`` is a linear layer stored transposed (``x @ W + b``): it becomes the
  ``nn.Linear`` it is.
- Mixture-of-experts blocks keep all experts in two 3-D tensors (``gate_up_proj``
  ``(E, 2·I, H)`` and ``down_proj`` ``(E, H, I)``, Mixtral, Qwen-MoE, …). They become
  :class:`LinearExperts`, one ``gate_up_proj``/``down_proj`` pair of ``nn.Linear`` per expert,
  computing the same routing. Each expert's linears then see only the tokens routed to it, so
  the layer-wise Hessian of an expert is that of its own tokens; an expert that calibration
  leaves (nearly) unvisited is found by its token count.

Quantizing and loading both call :func:`linearize`, so a checkpoint's tensor names are the
linearized model's. A fused-expert module whose forward the conversion does not reproduce
(another activation, biases, a different routing) is left alone: its tensors stay in float and
the pipeline names them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)


class _Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)


class LinearExperts(nn.ModuleList):
    """The experts of a mixture-of-experts block as ``nn.Linear`` layers (``experts.3.down_proj``); same call
    and result as ``transformers``' fused-expert modules: ``forward(hidden (T, H), top_k_index (T, k),
    top_k_weights (T, k))``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(_Expert(hidden, intermediate, dtype, torch.device(device)) for _ in range(num_experts))
        self.num_experts = num_experts
        self.__dict__["act_fn"] = act_fn  # parameter-free; kept out of the list of experts
        self.every_token = False  # calibration: each expert computes every token (only routed ones are summed)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> LinearExperts:
        gate_up, down = fused.gate_up_proj, fused.down_proj
        n, two_i, h = gate_up.shape
        module = cls(n, h, two_i // 2, fused.act_fn, gate_up.dtype, gate_up.device)
        with torch.no_grad():
            for e, expert in enumerate(module):
                expert.gate_up_proj.weight.copy_(gate_up[e])
                expert.down_proj.weight.copy_(down[e])
        return module

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if token_idx.numel() == 0 and not self.every_token:  # not called: its linears see only routed tokens
                continue
            # every_token (calibration): its linears see every token; the sum still takes the routed ones
            gate, up = expert.gate_up_proj(hidden_states if self.every_token else hidden_states[token_idx]).chunk(2, -1)
            y = expert.down_proj(self.act_fn(gate) * up)
            y = (y[token_idx] if self.every_token else y) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


@contextmanager
def experts_see_every_token(block: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While open, every expert of ``block`` computes every token (for Hessians from all tokens); the
    block's output does not change."""
    experts = [m for m in block.modules() if isinstance(m, LinearExperts)] if enabled else []
    for m in experts:
        m.every_token = True
    try:
        yield
    finally:
        for m in experts:
            m.every_token = False


def _is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return (set(params) == {"gate_up_proj", "down_proj"} and params["gate_up_proj"].dim() == 3
            and params["down_proj"].dim() == 3 and isinstance(getattr(module, "act_fn", None), nn.Module)
            and params["gate_up_proj"].shape[0] == params["down_proj"].shape[0]
            and params["gate_up_proj"].shape[1] == 2 * params["down_proj"].shape[2])


@torch.no_grad()
def _same_outputs(fused: nn.Module, linear: LinearExperts, tokens: int = 16, k: int = 2) -> bool:
    """Whether ``linear`` computes what ``fused`` does, on random tokens and routes (a generator of
    its own, so the model's random state is untouched)."""
    if fused.gate_up_proj.is_meta:  # a skeleton being loaded: check the same code on random weights of its shapes
        probe = copy.deepcopy(fused).to_empty(device="cpu")
        gen = torch.Generator().manual_seed(1)
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.1)
        return _same_outputs(probe, LinearExperts.from_fused(probe), tokens, k)
    g = torch.Generator().manual_seed(0)
    n, _, h = fused.gate_up_proj.shape
    dtype, device = fused.gate_up_proj.dtype, fused.gate_up_proj.device
    x = torch.randn(tokens, h, generator=g).to(device, dtype)
    k = min(k, n)
    index = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)]).to(device)
    weights = torch.rand(tokens, k, generator=g).to(device, dtype)
    try:
        want = fused(x, index, weights)
    except RuntimeError:
        if dtype == torch.float64:  # transformers' grouped-matmul experts take no float64: check in float32
            return _same_outputs(copy.deepcopy(fused).float(), copy.deepcopy(linear).float(), tokens, k)
        return False
    except (TypeError, ValueError, IndexError):  # an expert module with another call: not ours to convert
        return False
    got = linear(x, index, weights)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 2e-2
    return want.shape == got.shape and torch.allclose(want, got, rtol=tol,
                                                      atol=tol * float(want.abs().max().clamp_min(1)))


def _linear_from_conv1d(conv: Conv1D) -> nn.Linear:
    w = conv.weight  # (in, out): Conv1D computes x @ W + b
    linear = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def linearize(model: nn.Module) -> list[str]:
    """Replace ``Conv1D`` layers and fused-expert modules of ``model`` in place; returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            model.set_submodule(name, _linear_from_conv1d(module))
            replaced.append(name)
        elif _is_fused_experts(module):
            linear = LinearExperts.from_fused(module)
            if _same_outputs(module, linear):
                model.set_submodule(name, linear)
                replaced.append(name)
            else:
                log.warning("%s (%s) keeps its experts in 3-D tensors lowbit cannot split exactly; they stay in float",
                            name, type(module).__name__)
    return replaced


def expert_linears(block: nn.Module) -> set[str]:
    """Names (inside ``block``) of the linears that belong to one expert of a mixture of experts."""
    return {f"{path}.{e}.{p}" for path, m in block.named_modules() if isinstance(m, LinearExperts)
            for e in range(m.num_experts) for p in ("gate_up_proj", "down_proj")}


def router_names(block: nn.Module) -> set[str]:
    """Modules (inside ``block``) that route tokens to experts: kept in float, as every PTQ method keeps them
    (a rounded router sends tokens to other experts). The siblings of a :class:`LinearExperts` named
    ``gate``/``router``/``shared_expert_gate``."""
    names = set()
    for path, m in block.named_modules():
        if isinstance(getattr(m, "experts", None), LinearExperts):
            names |= {f"{path}.{child}" if path else child for child in ("gate", "router", "shared_expert_gate")
                      if child in m._modules}
    return names
