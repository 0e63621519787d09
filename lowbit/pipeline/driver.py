"""Sequential quantization: block k+1 is calibrated on the outputs of the already-quantized block k.

Memory stays at one block's work plus the calibration activations ``(n, seq, hidden)``.
The quantized codes of every layer are kept on ``model.lowbit_quant`` for packing at save time;
the model's own weights are replaced by their dequantized values (fake quantization), which is
exactly what the packed runtime computes.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import faults
from lowbit.activations.calibrate import BlockActPlan, apply_plan, calibrate_block, check_layout
from lowbit.errors import LowbitError
from lowbit.hessians import HessianAccumulator
from lowbit.hessians.cache import HessianCache
from lowbit.hessians.output_adaptive import output_adaptive_hessians
from lowbit.memory import peak_memory_mb
from lowbit.models import block_linears, find_blocks
from lowbit.models.adapters import weights_left_in_float
from lowbit.models.layout import block_layout
from lowbit.models.linearize import expert_linears, experts_see_every_token, linearize, router_names
from lowbit.models.onload import DiskModel
from lowbit.pipeline.capture import capture_block_inputs, feed_block_until, run_block, sequential_groups
from lowbit.pipeline.report import LayerReport, QuantReport
from lowbit.pipeline.resume import ProgressStore, fingerprint
from lowbit.recipes import Recipe
from lowbit.rounding import QuantizedWeight, proxy_loss
from lowbit.rounding.dispatch import round_weight

log = logging.getLogger(__name__)


def _apply(layer: nn.Linear, qw: QuantizedWeight) -> None:
    layer.weight.data = qw.weight().to(layer.weight.dtype).to(layer.weight.device)


def _layer_report(name: str, block: int, w: torch.Tensor, qw: QuantizedWeight, h: torch.Tensor | None,
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


def _round_layer(name: str, block: int, layer: nn.Linear, h: torch.Tensor | None, recipe: Recipe,
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
    _apply(layer, qw)
    report = _layer_report(name, block, w, qw, h, spec.method, time.perf_counter() - t0, tokens)
    return qw.cpu(), report  # codes for packing live on the host, not the GPU


def _collect_hessians(block: nn.Module, layers: dict[str, nn.Linear], inputs: torch.Tensor, kwargs: dict,
                      skip_first_tokens: int, whole_block: bool) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
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


def _expert_groups(groups: list[list[str]], experts: set[str]) -> list[list[str]]:
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


def _quantizable(block: nn.Module, prefix: str, skip: list[re.Pattern]) -> dict[str, nn.Linear]:
    """The block's linears less the recipe's skip patterns and mixture-of-experts routers (kept in float)."""
    routers = router_names(block)
    return {n: m for n, m in block_linears(block).items()
            if n not in routers and not any(p.search(prefix + n) for p in skip)}


class BlockSink(Protocol):
    """Where each finished block goes when the model is not kept whole (``export.write.ShardWriter``)."""

    def has(self, b: int) -> bool: ...

    def write(self, b: int, block: nn.Module, weights: dict[str, QuantizedWeight], prefix: str) -> None: ...


def quantize_model(
    model: nn.Module,
    recipe: Recipe,
    calib: torch.Tensor | None,
    *,
    progress_dir: str | Path | None = None,
    resume: bool = False,
    show_progress: bool = True,
    hessian_cache: str | Path | None = None,
    onload: DiskModel | None = None,
    sink: BlockSink | None = None,
) -> QuantReport:
    """Quantize ``model`` in place following ``recipe``; returns the per-layer report.

    GPT-2's ``Conv1D`` layers and fused mixture-of-experts tensors are first replaced, in place, by the
    ``nn.Linear`` layers they compute with (``models.linearize``): the same outputs, new module names.

    ``hessian_cache``: a directory where output-adaptive Hessians are kept and looked up, so that
    recipes on the same model and calibration set run OAC's gradient pass once (``HessianCache``).

    ``onload``: ``model`` is that skeleton, weightless; each block is read from disk when its turn comes
    and given back after, once ``sink`` has its packed layers (nothing is kept on ``model.lowbit_quant``).
    """
    recipe.validate()
    if onload is not None and (sink is None or progress_dir is None):
        raise ValueError("onloading needs a sink for the finished blocks and a progress directory")
    if onload is not None and recipe.needs_calibration and recipe.hessian.source == "output_adaptive":
        raise LowbitError("output-adaptive Hessians (OAC) need the whole model's gradients: quantize without "
                          "--onload")
    t_start = time.perf_counter()
    report = QuantReport(recipe=recipe.name)
    if replaced := linearize(model):  # Conv1D and fused experts as nn.Linear: what every stage below reads
        log.info("as nn.Linear layers: %s", ", ".join(replaced))
    blocks_path, blocks = find_blocks(model)
    spec = recipe.weights
    skip = [re.compile(p) for p in recipe.pipeline.skip]
    if spec.method != "none" and not any(_quantizable(blk, f"{blocks_path}.{b}.", skip) for b, blk in enumerate(blocks)):
        raise LowbitError(f"pipeline.skip {recipe.pipeline.skip} matches every linear layer: nothing to quantize")
    if spec.method != "none":
        routers = router_names(blocks[0])
        left = [n for n in weights_left_in_float(blocks[0]) if n.rpartition(".")[0] not in routers]
        if left:
            log.warning("these weights of every block are not nn.Linear layers and stay in float (lowbit quantizes "
                        "only nn.Linear weights): %s", ", ".join(left))
        if routers:
            log.info("mixture-of-experts routers stay in float: %s", ", ".join(sorted(routers)))
    model.lowbit_quant = getattr(model, "lowbit_quant", {})
    model.lowbit_recipe = recipe.to_dict()
    act = recipe.activations
    per_block_plan = act.enabled or recipe.smoothing.enabled  # activation quantizers and/or smoothing
    layouts = [block_layout(block, model.config) for block in blocks] if per_block_plan else []
    for layout in layouts:  # before any work: a recipe some block of this family cannot take
        check_layout(layout, act, recipe.smoothing, type(model).__name__)

    if recipe.needs_calibration and calib is None:
        raise ValueError(f"recipe {recipe.name} needs calibration data")
    # layer-wise Hessians need each block's (quantized) inputs; output-adaptive ones are computed
    # once, up front, from the full-precision model's gradients — no block inputs at all
    output_adaptive = recipe.needs_calibration and recipe.hessian.source == "output_adaptive"
    needs_inputs = recipe.needs_calibration and not output_adaptive
    store = None
    if progress_dir is not None:
        source = str(getattr(model, "lowbit_source", type(model).__name__))
        store = ProgressStore(Path(progress_dir), fingerprint(source, recipe.to_dict(), calib if calib is not None else torch.zeros(0)), resume)

    inputs = block_kwargs = None
    done = set(store.done) if store is not None else set()
    precomputed: dict[str, torch.Tensor] = {}
    replay_seconds = earlier_seconds = 0.0  # a resumed run reports the whole run's cost, not this part's
    if output_adaptive and len(done) < len(blocks):  # before any block is rounded: gradients of the full model
        every = {b: _quantizable(blocks[b], f"{blocks_path}.{b}.", skip) for b in range(len(blocks))}
        targets = {f"{blocks_path}.{b}.{n}": m for b, ls in every.items() for n, m in ls.items()}
        rounded = [f"{blocks_path}.{b}.{n}" for b in done for n in every[b]]  # their Hessians are not needed
        t0 = time.perf_counter()
        cache = HessianCache(hessian_cache) if hessian_cache is not None else None
        claim = cache.claim(cache.key(model, targets, calib)) if cache is not None else nullcontext()
        with claim as cached:  # a cache keeps every layer's Hessian, for the next recipe that asks
            state = cached if cache is not None else (store.hessian_state if store else None)
            precomputed, report.hessian_pass = output_adaptive_hessians(
                model, targets, calib, show_progress=show_progress, state=state,
                passes=recipe.hessian.passes, skip=() if cache is not None else rounded)
        if cache is not None:  # "reused": every sequence of every pass was read, none computed here
            hp = report.hessian_pass
            hp.update(cache=str(cached), reused=hp.get("resumed_at", 0) == calib.shape[0] * hp.get("passes", 1))
        # an interrupted pass's part (a pass read whole reports its maker's time: never below zero)
        earlier_seconds += max(0.0, report.hessian_pass["seconds"] - (time.perf_counter() - t0))
        if store is not None:
            store.save_costs(hessian_pass=report.hessian_pass)
    elif output_adaptive and store is not None and "hessian_pass" in store.costs:  # every block stored
        report.hessian_pass = dict(store.costs["hessian_pass"])
        earlier_seconds += report.hessian_pass["seconds"]
    # inputs are replayed only up to the last block still to round: a run resumed after every
    # block was stored (say, killed while evaluating) loads its weights without a calibration forward
    todo = [b for b in range(len(blocks)) if b not in done]
    last_todo = todo[-1] if todo else -1
    needs_inputs = needs_inputs and bool(todo)
    if needs_inputs:
        t0 = time.perf_counter()
        with onload.onloaded(None) if onload is not None else nullcontext():  # the embeddings
            inputs, block_kwargs = capture_block_inputs(model, blocks, calib)
        report.capture_seconds = time.perf_counter() - t0
        if store is not None:
            store.save_costs(capture_seconds=report.capture_seconds)
    elif store is not None and not todo and "capture_seconds" in store.costs:  # every block stored: not replayed
        report.capture_seconds = store.costs["capture_seconds"]
        earlier_seconds += report.capture_seconds

    bar = tqdm(range(len(blocks)), desc=f"quantize {recipe.name}", unit="block", disable=not show_progress)
    for b in bar:
        t_block = time.perf_counter()
        block = blocks[b]
        prefix = f"{blocks_path}.{b}."
        layers = _quantizable(block, prefix, skip)
        # a finished block is read from disk only when its outputs are replayed or its shard is missing
        wanted = b not in done or (needs_inputs and b < last_todo) or (sink is not None and not sink.has(b))
        with onload.onloaded(b) if onload is not None and wanted else nullcontext():
            if b in done:
                weights, layer_reports = store.load_block(b)
                if onload is None or wanted:  # a block left weightless is not written to
                    if per_block_plan:
                        plan = BlockActPlan.from_state(*store.load_activation_plan(b))
                        apply_plan(block, layouts[b], plan, model.config)
                        report.activation_quantizers += len(plan.quantizers)
                    for n, qw in weights.items():
                        _apply(layers[n], qw)
                if onload is None:
                    model.lowbit_quant.update({prefix + n: qw for n, qw in weights.items()})
                report.layers += [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in layer_reports]
                report.resumed_blocks += 1
                replayed = True
            else:
                replayed = False
                weights = {}
                if per_block_plan:  # before the Hessians: GPTQ sees the (smoothed, quantized) inputs it will get
                    t0 = time.perf_counter()
                    plan = calibrate_block(block, layouts[b], inputs, block_kwargs[b] if block_kwargs else None,
                                           act, model.config, recipe.smoothing)
                    report.activation_seconds += time.perf_counter() - t0
                    report.activation_quantizers += len(plan.quantizers)
                    if store is not None:
                        store.save_activation_plan(b, *plan.state())
                groups = [list(layers)] if spec.method != "none" else []
                experts = expert_linears(block) & set(layers)
                if needs_inputs and groups:  # execution order; one pass per group when true-sequential
                    groups = _expert_groups(sequential_groups(block, layers, inputs[:1], block_kwargs[b]), experts)
                    if not recipe.pipeline.true_sequential:
                        groups = [[n for g in groups for n in g]]
                for group in groups:
                    group_layers = {n: layers[n] for n in group}
                    tokens: dict[str, int] = {}
                    if output_adaptive:
                        # on the CPU when the pass was split (hessian.passes): one layer's at a time on the device
                        hessians = {n: precomputed.pop(prefix + n).to(layers[n].weight.device) for n in group}
                    elif needs_inputs and recipe.needs_hessians:
                        with experts_see_every_token(block, recipe.hessian.experts == "all"):
                            hessians, tokens = _collect_hessians(block, group_layers, inputs, block_kwargs[b],
                                                                 recipe.hessian.skip_first_tokens,
                                                                 whole_block=bool(experts & set(group)))
                    else:
                        hessians = {}
                    for n, layer in group_layers.items():
                        qw, layer_report = _round_layer(prefix + n, b, layer, hessians.get(n), recipe,
                                                        tokens.get(n), expert=n in experts)
                        report.layers.append(layer_report)
                        weights[n] = qw
                        if onload is None:
                            model.lowbit_quant[prefix + n] = qw
            if needs_inputs and b < last_todo:
                inputs = run_block(block, inputs, block_kwargs[b])
            if sink is not None and (not replayed or not sink.has(b)):  # before the block counts as done
                sink.write(b, block, weights, prefix)
        seconds = time.perf_counter() - t_block
        if replayed:  # its time is the run's that quantized it, not this replay's
            replay_seconds += seconds
            seconds = store.block_seconds.get(str(b), 0.0)
            earlier_seconds += seconds
        elif store is not None:
            store.save_block(b, weights, [r.__dict__ for r in report.layers if r.block == b], seconds, peak_memory_mb())
            faults.reach(f"block:{b}")
        report.block_seconds.append(seconds)
        bar.set_postfix(peak_mb=f"{peak_memory_mb():.0f}")
    if store is not None:
        store.finish()
    report.total_seconds = time.perf_counter() - t_start - replay_seconds + earlier_seconds
    report.peak_memory_mb = max(peak_memory_mb(), store.peak_memory_mb if store is not None else 0.0,
                                report.hessian_pass.get("peak_memory_mb", 0.0))  # an earlier run's pass too
    return report
