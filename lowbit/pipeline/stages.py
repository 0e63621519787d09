"""The stages a recipe is made of, plugged into the block engine (``pipeline.engine``).

- ``ActivationPlan``: smoothing, channel reordering and static activation / KV quantizers, calibrated on
  the block's inputs before its weights are rounded (so the Hessians see what the layers will get).
- ``Rounding``: each layer's weights rounded by the recipe's algorithm, in execution-order groups,
  with Hessians from one of the sources of ``pipeline.sources`` (none, layer-wise, output-adaptive).
- ``Tuning``: the rounding, then the block's rounded layers tuned against its full-precision output.

``build_stages`` is the one place that reads which of them a recipe needs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import torch
from torch import nn

from lowbit.activations.calibrate import BlockActPlan, apply_plan, calibrate_block
from lowbit.methods.weights import round_weight
from lowbit.models.layout import block_layout
from lowbit.models.linearize import expert_linears
from lowbit.pipeline.capture import run_block, sequential_groups
from lowbit.pipeline.engine import Run, Stage, Turn
from lowbit.pipeline.report import LayerReport
from lowbit.pipeline.sources import (
    InputsWithoutHessians,
    LayerwiseHessians,
    NoHessians,
    OutputAdaptiveHessians,
)
from lowbit.pipeline.tuning import tune_block
from lowbit.recipes import Recipe
from lowbit.rounding import QuantizedWeight, proxy_loss
from lowbit.surgery.rotation import rotate_residual

log = logging.getLogger(__name__)


class Rotation:
    """QuaRot's residual-stream rotation, folded into the whole model before its first block is calibrated (so
    every later stage sees the rotated model; a resumed run rotates again, from the same seed)."""

    needs_inputs = False

    def __init__(self, recipe: Recipe):
        self.spec = recipe.rotation

    def prepare(self, run: Run) -> None:
        t0 = time.perf_counter()
        rotate_residual(run.model, self.spec.kind, self.spec.seed)
        log.info("residual stream rotated (%s, seed %d) in %.1f s", self.spec.kind, self.spec.seed,
                 time.perf_counter() - t0)

    def quantize(self, run: Run, turn: Turn) -> None:
        pass

    def restore(self, run: Run, turn: Turn, weights: dict[str, QuantizedWeight]) -> None:
        pass


class ActivationPlan:
    """Observe the block's activations and fold smoothing / reordering into it, before its rounding."""

    def __init__(self, recipe: Recipe, layouts: list):
        self.recipe, self.layouts = recipe, layouts
        self.needs_inputs = recipe.activations.static or recipe.smoothing.enabled  # dynamic ones observe nothing

    def prepare(self, run: Run) -> None:
        pass

    def quantize(self, run: Run, turn: Turn) -> None:
        t0 = time.perf_counter()
        plan = calibrate_block(turn.block, self.layouts[turn.index], run.inputs, turn.kwargs,
                               self.recipe.activations, run.model.config, self.recipe.smoothing)
        run.report.activation_seconds += time.perf_counter() - t0
        run.report.activation_quantizers += len(plan.quantizers)
        if run.store is not None:
            run.store.save_activation_plan(turn.index, *plan.state())

    def restore(self, run: Run, turn: Turn, weights: dict[str, QuantizedWeight]) -> None:
        plan = BlockActPlan.from_state(*run.store.load_activation_plan(turn.index))
        apply_plan(turn.block, self.layouts[turn.index], plan, run.model.config)
        run.report.activation_quantizers += len(plan.quantizers)


class Rounding:
    """Round the block's layers group by group (execution order when true-sequential), each group's
    Hessians taken after the groups before it were rounded."""

    def __init__(self, recipe: Recipe, source: NoHessians | LayerwiseHessians | OutputAdaptiveHessians):
        self.recipe, self.source = recipe, source
        self.needs_inputs = source.needs_inputs

    def prepare(self, run: Run) -> None:
        self.source.prepare(run)

    def quantize(self, run: Run, turn: Turn) -> None:
        experts = expert_linears(turn.block) & set(turn.layers)
        for group in self._groups(run, turn, experts):
            layers = {n: turn.layers[n] for n in group}
            hessians, tokens = self.source.hessians(run, turn, layers, experts)
            for n, layer in layers.items():
                qw, layer_report = round_layer(turn.prefix + n, turn.index, layer, hessians.get(n), self.recipe,
                                               tokens.get(n), expert=n in experts)
                run.report.layers.append(layer_report)
                turn.weights[n] = qw

    def _groups(self, run: Run, turn: Turn, experts: set[str]) -> list[list[str]]:
        if not self.needs_inputs:
            return [list(turn.layers)]
        groups = expert_groups(sequential_groups(turn.block, turn.layers, run.inputs[:1], turn.kwargs), experts)
        return groups if self.recipe.pipeline.true_sequential else [[n for g in groups for n in g]]

    def restore(self, run: Run, turn: Turn, weights: dict[str, QuantizedWeight]) -> None:
        for n, qw in weights.items():
            apply_weight(turn.layers[n], qw)


class Tuning:
    """Rounding, then the block's rounded layers tuned against its full-precision output (``pipeline.tuning``).
    It wraps the rounding stage: the target is the block's output before any layer is rounded."""

    needs_inputs = True

    def __init__(self, recipe: Recipe, rounding: Rounding):
        self.spec, self.rounding = recipe.tuning, rounding

    def prepare(self, run: Run) -> None:
        self.rounding.prepare(run)
        if run.store is not None:  # the records of blocks an earlier run tuned
            run.report.tuning = [r for r in run.store.costs.get("tuning", []) if r["block"] in run.done]

    def quantize(self, run: Run, turn: Turn) -> None:
        targets = run_block(turn.block, run.inputs, turn.kwargs)  # every layer still in float
        floats = {n: layer.weight.detach().clone() for n, layer in turn.layers.items()}
        self.rounding.quantize(run, turn)
        t0 = time.perf_counter()
        tuned, record = tune_block(turn.block, turn.layers, turn.weights, run.inputs, turn.kwargs, targets, self.spec,
                                   seed=self.spec.seed + turn.index, floats=floats)
        for n, qw in tuned.items():
            apply_weight(turn.layers[n], qw)
            turn.weights[n] = qw
        run.report.tuning.append({"block": turn.index, **record, "seconds": time.perf_counter() - t0})
        log.info("block %d tuned: output error %.4g -> %.4g%s (%.0f s)", turn.index, record["before"], record["after"],
                 "" if record["kept"] else ", the rounding's kept", run.report.tuning[-1]["seconds"])
        if run.store is not None:
            run.store.save_costs(tuning=run.report.tuning)

    def restore(self, run: Run, turn: Turn, weights: dict[str, QuantizedWeight]) -> None:
        self.rounding.restore(run, turn, weights)


def build_stages(model: nn.Module, blocks: nn.ModuleList, recipe: Recipe,
                 hessian_cache: str | Path | None = None) -> list[Stage]:
    """The stages ``recipe`` is made of, in the order they work on a block."""
    stages: list[Stage] = [Rotation(recipe)] if recipe.rotation.enabled else []
    if recipe.activations.enabled or recipe.smoothing.enabled:
        stages.append(ActivationPlan(recipe, [block_layout(block, model.config) for block in blocks]))
    if recipe.weights.method != "none":
        if not recipe.needs_calibration:
            source = NoHessians()
        elif recipe.hessian.source == "output_adaptive":
            source = OutputAdaptiveHessians(recipe, hessian_cache)
        elif recipe.needs_hessians:
            source = LayerwiseHessians(recipe)
        else:  # calibrated for its activations (or an unwhitened low-rank branch): Hessians unused
            source = InputsWithoutHessians()
        rounding = Rounding(recipe, source)
        stages.append(Tuning(recipe, rounding) if recipe.tuning.enabled else rounding)
    return stages


def apply_weight(layer: nn.Linear, qw: QuantizedWeight) -> None:
    """The layer computes with its quantized weights from now on (fake quantization)."""
    layer.weight.data = qw.weight().to(layer.weight.dtype).to(layer.weight.device)


def layer_report(name: str, block: int, w: torch.Tensor, qw: QuantizedWeight, h: torch.Tensor | None,
                 method: str, seconds: float, tokens: int | None) -> LayerReport:
    """Errors summed in float64 over slices of rows: a 7B model's largest layer in float64 whole would take
    three copies of 360 MB beside it."""
    dq = qw.weight()
    loss = ref = d2 = w2 = 0.0
    step = max(1, (1 << 22) // max(w.shape[1], 1))  # rows per slice: 4M elements
    for r in range(0, w.shape[0], step):
        w64 = w[r : r + step].to(torch.float64)
        delta = dq[r : r + step].to(torch.float64) - w64
        if h is not None:
            loss += proxy_loss(delta, h)
            ref += proxy_loss(w64, h)
        d2 += float(delta.pow(2).sum())
        w2 += float(w64.pow(2).sum())
    rel = loss / max(ref, 1e-30) if h is not None else None
    return LayerReport(name, block, tuple(w.shape), qw.bits, method, loss if h is not None else None, rel,
                       d2 / max(w2, 1e-30), seconds, tokens)


def round_layer(name: str, block: int, layer: nn.Linear, h: torch.Tensor | None, recipe: Recipe,
                tokens: int | None = None, expert: bool = False) -> tuple[QuantizedWeight, LayerReport]:
    """Round one layer in place (fake-quant weights) and return its codes (on the host) and report.

    A layer whose Hessian is empty, or an expert that fewer calibration tokens reached than it has
    inputs (its Hessian is singular: GPTQ would fit those few tokens), is rounded with RTN on its
    own weights, and says so."""
    t0 = time.perf_counter()
    spec, lowrank = recipe.weights, recipe.lowrank
    w = layer.weight.data.clone()
    empty = h is not None and (tokens == 0 or not torch.any(h))
    starved = expert and tokens is not None and tokens < layer.in_features
    if h is not None and (empty or starved):
        why = ("saw no calibration input" if empty
               else f"was reached by {tokens} calibration tokens, fewer than its {layer.in_features} inputs")
        log.warning("%s %s; rounding it with RTN on its own weights", name, why)
        h, spec = None, dataclasses.replace(spec, method="rtn")
        lowrank = dataclasses.replace(lowrank, whiten=False)
    qw = round_weight(w, h, spec, name=name, transform=recipe.transform, lowrank=lowrank,
                      outliers=recipe.smoothing.outliers)
    apply_weight(layer, qw)
    report = layer_report(name, block, w, qw, h, spec.method, time.perf_counter() - t0, tokens)
    return qw.cpu(), report  # codes for packing live on the host, not the GPU


def expert_groups(groups: list[list[str]], experts: set[str]) -> list[list[str]]:
    """Every expert's ``gate_up_proj`` in one group and every ``down_proj`` in the next, where the first
    expert was called: an expert's inputs depend only on the block's input and its own ``gate_up_proj``,
    and which experts one sample calls (hence the order seen) depends on its routing."""
    if not experts:
        return groups
    ups = sorted((n for n in experts if n.endswith("gate_up_proj")), key=_natural)
    downs = sorted((n for n in experts if n.endswith("down_proj")), key=_natural)
    out: list[list[str]] = []
    for group in groups:
        rest = [n for n in group if n not in experts]
        if len(rest) < len(group) and ups:
            out += [g for g in (rest, ups, downs) if g]
            ups = downs = []
        elif rest:
            out.append(rest)
    return out


def _natural(name: str) -> list:
    """``experts.10`` after ``experts.9``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
