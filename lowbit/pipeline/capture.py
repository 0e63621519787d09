"""Capturing what block 0 receives, and running one block over all calibration samples.

Blocks take more than hidden states (masks, rotary embeddings, and for Gemma-3 a different mask
and RoPE per layer type), so the keyword arguments every block receives are recorded once, from
one full forward pass, and replayed with each block's new hidden states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class _StopForward(Exception):
    pass


def _hidden_from(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Return block-0 hidden states ``(n, seq, hidden)`` and each block's extra kwargs.

    The blocks themselves are not run (their forward is replaced while capturing by one that records
    what it receives), so they may be weightless, waiting to be onloaded (``models.onload``): only
    what comes before block 0 (embeddings) needs its weights.
    """
    device = next(p.device for p in model.parameters() if not p.is_meta)
    block_kwargs: list[dict[str, Any]] = [{} for _ in blocks]
    captured: list[torch.Tensor] = []
    first = True  # every block's kwargs from the first sample; block 0's input from each

    def recorder(i: int):
        def forward(*args, **kwargs):
            if i == 0:
                captured.append(_hidden_from(args, kwargs).detach())
            block_kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if not first or i == len(blocks) - 1:
                raise _StopForward
            return _hidden_from(args, kwargs)  # what the next block receives does not matter: it only records

        return forward

    with blocks_replaced(blocks, recorder):
        for i in range(calib.shape[0]):
            try:
                model(calib[i : i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
            first = False
    return torch.cat(captured, dim=0), block_kwargs


@contextmanager
def blocks_replaced(blocks: nn.ModuleList, forward: Callable[[int], Callable]) -> Iterator[None]:
    """Block ``i`` computes ``forward(i)`` instead of its own forward while the context lasts."""
    for i, b in enumerate(blocks):
        b.forward = forward(i)
    try:
        yield
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)


@torch.no_grad()
def logits_after_blocks(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` given ``last``, the last block's output: the blocks (weightless, maybe)
    pass it through, and the model's own code applies what follows them (final norm, head, soft-capping)."""

    def forward(i: int):
        return lambda *args, **kwargs: last if i == 0 else _hidden_from(args, kwargs)

    with blocks_replaced(blocks, forward):
        return model(ids, use_cache=False).logits


def block_output(out: Any) -> torch.Tensor:
    """A decoder block's hidden states: some families return them alone, others first in a tuple."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """Forward every sample (one at a time) through ``block``; returns stacked outputs."""
    outs = torch.empty_like(inputs)
    for i in range(inputs.shape[0]):
        out = block(inputs[i : i + 1], **kwargs)
        outs[i : i + 1] = block_output(out)
    return outs


@torch.no_grad()
def feed_block_until(block: nn.Module, inputs: torch.Tensor, kwargs: dict[str, Any], last: nn.Module | None) -> None:
    """Forward every sample through ``block`` only until ``last`` has received its input (``None``: all of it).

    Statistics hooks see everything up to that layer; the rest of the block is not computed
    (for q/k/v that skips the whole block, for o_proj the MLP).
    """

    def stop(_module, _args):
        raise _StopForward

    # registered last: runs after statistics hooks
    handle = last.register_forward_pre_hook(stop) if last is not None else None
    try:
        for i in range(inputs.shape[0]):
            try:
                block(inputs[i : i + 1], **kwargs)
            except _StopForward:
                pass
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def sequential_groups(
    block: nn.Module, linears: dict[str, nn.Linear], sample: torch.Tensor, kwargs: dict[str, Any]
) -> list[list[str]]:
    """Linears in execution order, grouped when they read the same input tensor (q/k/v, gate/up)."""
    # keep the input tensors alive: comparing ids of freed tensors would let a new tensor at a
    # reused address pass for the same input (that made grouping, and results, nondeterministic)
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
        for name, m in linears.items()
    ]
    try:
        block(sample, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    seen: set[str] = set()
    for name, tensor in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    missing = [n for n in linears if n not in seen]
    return groups + ([missing] if missing else [])
