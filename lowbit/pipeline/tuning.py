"""Block-output tuning: after a block's layers are rounded, move their codes (one step at most) and group scales
so that the block's output on the calibration inputs comes closer to what the full-precision block gives.

The inputs are those of the already-quantized blocks before it (as for the rounding); the target is the
full-precision block's output on those same inputs. Signed-gradient descent (AutoRound's update) on the
offsets and factors of ``rounding.tuning.Tunable``; the batches are drawn from a seeded generator, so a run
is deterministic. The whole calibration set's error is measured before, and ten times along the way: the
state with the lowest is kept, the rounding's own when none was lower, so a tuned block is never worse than
its rounding on the calibration set (AutoRound keeps its best step too, judged on single batches).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lowbit.pipeline.capture import block_output
from lowbit.recipes import TuningSpec
from lowbit.rounding import QuantizedWeight
from lowbit.rounding.tuning import Tunable

log = logging.getLogger(__name__)
CHECKS = 10  # times per block the whole calibration set's error is measured (the best state is kept)


def prefix_kwargs(value: Any, seq: int, tokens: int) -> Any:
    """A block's keyword arguments for the first ``tokens`` positions: every tensor dimension of the
    sequence's length cut (masks, rotary tables, position ids), the rest as it was."""
    if isinstance(value, torch.Tensor):
        for dim, size in enumerate(value.shape):
            if size == seq:
                value = value.narrow(dim, 0, tokens)
        return value
    if isinstance(value, dict):
        return {k: prefix_kwargs(v, seq, tokens) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(prefix_kwargs(v, seq, tokens) for v in value)
    return value


@contextmanager
def _frozen(block: nn.Module) -> Iterator[None]:
    """The block's own parameters take no gradient while its rounded layers are tuned."""
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _prefix(block: nn.Module, inputs: torch.Tensor, kwargs: dict, tokens: int | None) -> tuple[int | None, dict]:
    """``tokens`` and the kwargs cut to them, once one sample shows that the cut block computes the prefix of
    the whole one (a family whose kwargs cannot be cut that way is tuned on whole samples, and says so)."""
    seq = inputs.shape[1]
    if tokens is None or tokens >= seq:
        return None, kwargs
    cut = prefix_kwargs(kwargs, seq, tokens)
    with torch.no_grad():
        whole = block_output(block(inputs[:1], **kwargs))[:, :tokens]
        try:
            part = block_output(block(inputs[:1, :tokens], **cut))
        except (RuntimeError, ValueError, IndexError):
            part = None
    if part is None or not torch.allclose(part, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max())):
        log.warning("tuning.tokens: this block's inputs cannot be cut to their first %d tokens; tuning on whole "
                    "samples", tokens)
        return None, kwargs
    return tokens, cut


def tune_block(block: nn.Module, layers: dict[str, nn.Linear], weights: dict[str, QuantizedWeight],
               inputs: torch.Tensor, kwargs: dict, targets: torch.Tensor, spec: TuningSpec, seed: int,
               floats: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, QuantizedWeight], dict]:
    """Tuned weights for ``layers`` (names inside ``block``; ``floats``: their weights before rounding), and a
    record: the calibration set's mean squared output error before and after, the steps, whether it was kept."""
    tokens, kw = _prefix(block, inputs, kwargs, spec.tokens)
    x, y = inputs[:, :tokens], targets[:, :tokens]  # [:, :None] is everything
    dtypes = {n: layers[n].weight.dtype for n in weights}
    floats = floats or {}
    tunables = {n: Tunable.start(qw, spec.scales, layers[n].weight.device, floats.get(n))
                for n, qw in weights.items()}

    def params() -> dict[str, torch.Tensor]:
        return {f"{n}.weight": t.weight().to(dtypes[n]) for n, t in tunables.items()}

    def error(rows: list[int]) -> torch.Tensor:
        p = params()
        return sum(block_output(functional_call(block, p, (x[i : i + 1],), kw)).float().sub(y[i : i + 1].float())
                   .pow(2).mean() for i in rows) / len(rows)

    everything = list(range(x.shape[0]))
    generator = torch.Generator().manual_seed(seed)
    every = max(1, spec.iters // CHECKS)
    with _frozen(block):
        with torch.no_grad():
            before = float(error(everything))
        best, best_state, checks = before, None, []
        for it in range(1, spec.iters + 1):
            rows = torch.randperm(x.shape[0], generator=generator)[: spec.batch_size].tolist()
            with torch.enable_grad():
                error(rows).backward()
            for t in tunables.values():
                t.sign_step(spec.lr, spec.scale_range)
            if it % every == 0 or it == spec.iters:  # the whole set's error now and then: the best state is kept
                with torch.no_grad():
                    checks.append(float(error(everything)))
                if checks[-1] < best:
                    best, best_state = checks[-1], {n: t.state() for n, t in tunables.items()}
    record = {"before": before, "after": best, "kept": best_state is not None, "iters": spec.iters,
              "tokens": tokens or x.shape[1], "checks": checks}
    if best_state is None:
        return weights, record
    for n, t in tunables.items():
        t.load(best_state[n])
    return {n: t.result() for n, t in tunables.items()}, record
