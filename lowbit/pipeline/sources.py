"""Where a rounding's Hessians come from: none (RTN), each group's inputs (``LayerwiseHessians``), or the
output loss's gradients, computed once before any block (``OutputAdaptiveHessians``: OAC)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from lowbit.hessians import HessianAccumulator
from lowbit.hessians.cache import HessianCache
from lowbit.hessians.output_adaptive import output_adaptive_hessians
from lowbit.models.linearize import experts_see_every_token
from lowbit.pipeline.capture import feed_block_until
from lowbit.pipeline.engine import Run, Turn
from lowbit.recipes import Recipe

Hessians = tuple[dict[str, torch.Tensor], dict[str, int]]  # each layer's Hessian, and the tokens it saw


class NoHessians:
    """RTN and friends: the weights alone."""

    needs_inputs = False

    def prepare(self, run: Run) -> None:
        pass

    def hessians(self, run: Run, turn: Turn, group: dict[str, nn.Linear], experts: set[str]) -> Hessians:
        return {}, {}


class LayerwiseHessians:
    """``H = XᵀX`` of each layer's inputs, collected from the block's (quantized) calibration inputs."""

    needs_inputs = True

    def __init__(self, recipe: Recipe):
        self.spec = recipe.hessian

    def prepare(self, run: Run) -> None:
        pass

    def hessians(self, run: Run, turn: Turn, group: dict[str, nn.Linear], experts: set[str]) -> Hessians:
        with experts_see_every_token(turn.block, self.spec.experts == "all"):
            return collect_hessians(turn.block, group, run.inputs, turn.kwargs, self.spec.skip_first_tokens,
                                    whole_block=bool(experts & set(group)))


class OutputAdaptiveHessians:
    """OAC's ``H̄`` from the full-precision model's output-loss gradients, for every layer, before any block
    is rounded; kept in a shared cache when one is given, so that recipes on one model run the pass once."""

    needs_inputs = False

    def __init__(self, recipe: Recipe, cache: str | Path | None):
        self.passes, self.cache = recipe.hessian.passes, cache
        self.precomputed: dict[str, torch.Tensor] = {}

    def prepare(self, run: Run) -> None:
        store, report, done = run.store, run.report, run.done
        if len(done) == len(run.blocks):  # every block stored: the pass is not needed, its cost is
            if store is not None and "hessian_pass" in store.costs:
                report.hessian_pass = dict(store.costs["hessian_pass"])
                run.costs.earlier += report.hessian_pass["seconds"]
            return
        targets = {run.prefix(b) + n: m for b, ls in enumerate(run.quantizable) for n, m in ls.items()}
        rounded = [run.prefix(b) + n for b in done for n in run.quantizable[b]]  # their Hessians are not needed
        t0 = time.perf_counter()
        cache = HessianCache(self.cache) if self.cache is not None else None
        claim = cache.claim(cache.key(run.model, targets, run.calib)) if cache is not None else nullcontext()
        with claim as cached:  # a cache keeps every layer's Hessian, for the next recipe that asks
            state = cached if cache is not None else (store.hessian_state if store else None)
            self.precomputed, report.hessian_pass = output_adaptive_hessians(
                run.model, targets, run.calib, show_progress=run.show_progress, state=state,
                passes=self.passes, skip=() if cache is not None else rounded)
        if cache is not None:  # "reused": every sequence of every pass was read, none computed here
            hp = report.hessian_pass
            hp.update(cache=str(cached), reused=hp.get("resumed_at", 0) == run.calib.shape[0] * hp.get("passes", 1))
        # an interrupted pass's part (a pass read whole reports its maker's time: never below zero)
        run.costs.earlier += max(0.0, report.hessian_pass["seconds"] - (time.perf_counter() - t0))
        if store is not None:
            store.save_costs(hessian_pass=report.hessian_pass)

    def hessians(self, run: Run, turn: Turn, group: dict[str, nn.Linear], experts: set[str]) -> Hessians:
        # on the CPU when the pass was split (hessian.passes): one layer's at a time on the device
        return {n: self.precomputed.pop(turn.prefix + n).to(m.weight.device) for n, m in group.items()}, {}


class InputsWithoutHessians(NoHessians):
    """A calibrated recipe whose rounding uses no Hessian still rounds in execution-order groups."""

    needs_inputs = True


def collect_hessians(block: nn.Module, layers: dict[str, nn.Linear], inputs: torch.Tensor, kwargs: dict,
                     skip_first_tokens: int, whole_block: bool) -> Hessians:
    """Each layer's Hessian and the number of tokens it saw (an expert sees only those routed to it).

    ``whole_block``: run every sample through the whole block instead of stopping at the group's last
    layer (experts: which one a sample calls last depends on its routing)."""
    accs = {n: HessianAccumulator(m.in_features, skip_first_tokens, device=m.weight.device) for n, m in layers.items()}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: accs[n].add(args[0].detach()))
               for n, m in layers.items()]
    try:
        feed_block_until(block, inputs, kwargs, last=None if whole_block else list(layers.values())[-1])
    finally:
        for h in handles:
            h.remove()
    return {n: a.hessian() for n, a in accs.items()}, {n: a.count for n, a in accs.items()}
