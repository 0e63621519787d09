"""The block-sequential engine: the loop every method runs in, and nothing method-specific.

A run walks the model's blocks in order. Each block's turn gives it the calibration inputs that the
already-quantized blocks before it produce; the recipe's stages (``pipeline.stages``: activation plan,
rounding with a Hessian source, ...) do their part on the turn, and the engine then moves the inputs
through the finished block, hands its packed layers to a sink, and records it in the progress store so
that a killed run resumes at the first unfinished block. Adding a method means adding a stage.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit import faults
from lowbit.memory import peak_memory_mb
from lowbit.models.onload import DiskModel
from lowbit.pipeline.capture import capture_block_inputs, run_block
from lowbit.pipeline.report import LayerReport, QuantReport
from lowbit.pipeline.resume import ProgressStore
from lowbit.recipes import Recipe
from lowbit.rounding import QuantizedWeight


class BlockSink(Protocol):
    """Where each finished block's packed layers go (``KeptWeights``, or ``export.write.ShardWriter``)."""

    def has(self, b: int) -> bool: ...

    def write(self, b: int, block: nn.Module, weights: dict[str, QuantizedWeight], prefix: str) -> None: ...


class KeptWeights:
    """The sink of a model kept whole: every layer's codes in one dict, for packing at save time."""

    def __init__(self, into: dict[str, QuantizedWeight]):
        self.into = into

    def has(self, b: int) -> bool:
        return False

    def write(self, b: int, block: nn.Module, weights: dict[str, QuantizedWeight], prefix: str) -> None:
        self.into.update({prefix + n: qw for n, qw in weights.items()})


class Costs:
    """A resumed run reports the whole run's cost: the time earlier runs spent on the parts stored is
    added, and the time this run spends replaying those parts is not."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.earlier = 0.0
        self.replayed = 0.0

    def total(self) -> float:
        return time.perf_counter() - self.start - self.replayed + self.earlier


@dataclass
class Run:
    """What every stage of one quantization run reads: the model, its blocks and the shared state."""

    model: nn.Module
    recipe: Recipe
    calib: torch.Tensor | None
    blocks_path: str
    blocks: nn.ModuleList
    quantizable: list[dict[str, nn.Linear]]  # each block's layers to round (names inside the block)
    report: QuantReport
    sink: BlockSink
    store: ProgressStore | None = None
    onload: DiskModel | None = None
    show_progress: bool = True
    costs: Costs = field(default_factory=Costs)
    inputs: torch.Tensor | None = None  # the next block's calibration inputs, once captured
    block_kwargs: list[dict[str, Any]] | None = None
    done: frozenset[int] = frozenset()  # the blocks an earlier run stored, as this run starts

    def __post_init__(self) -> None:
        self.done = frozenset(self.store.done) if self.store is not None else frozenset()

    def todo(self) -> list[int]:
        return [b for b in range(len(self.blocks)) if b not in self.done]

    def prefix(self, b: int) -> str:
        return f"{self.blocks_path}.{b}."


@dataclass
class Turn:
    """One block's turn: what the stages read, and the packed layers they leave."""

    index: int
    block: nn.Module
    prefix: str
    layers: dict[str, nn.Linear]
    kwargs: dict[str, Any] | None
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)


class Stage(Protocol):
    """One part of a method. ``prepare`` runs once before any block (OAC's gradient pass); ``quantize``
    does the stage's work on a block; ``restore`` puts back what an earlier run stored for a block."""

    needs_inputs: bool  # whether it reads the blocks' calibration inputs

    def prepare(self, run: Run) -> None: ...

    def quantize(self, run: Run, turn: Turn) -> None: ...

    def restore(self, run: Run, turn: Turn, weights: dict[str, QuantizedWeight]) -> None: ...


def _capture(run: Run) -> None:
    """Block 0's calibration inputs and every block's keyword arguments (the embeddings onloaded for it)."""
    if not run.todo():  # every block stored (killed while saving, say): no calibration forward at all
        if run.store is not None and "capture_seconds" in run.store.costs:
            run.report.capture_seconds = run.store.costs["capture_seconds"]
            run.costs.earlier += run.report.capture_seconds
        return
    t0 = time.perf_counter()
    with run.onload.onloaded(None) if run.onload is not None else nullcontext():
        run.inputs, run.block_kwargs = capture_block_inputs(run.model, run.blocks, run.calib)
    run.report.capture_seconds = time.perf_counter() - t0
    if run.store is not None:
        run.store.save_costs(capture_seconds=run.report.capture_seconds)


def _restore(run: Run, turn: Turn, stages: list[Stage], onloaded: bool) -> None:
    """A block an earlier run stored: its layers and plan put back, its report and codes taken as stored."""
    turn.weights, layer_reports = run.store.load_block(turn.index)
    if onloaded:  # a block left weightless is not written to
        for stage in stages:
            stage.restore(run, turn, turn.weights)
    run.report.layers += [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in layer_reports]
    run.report.resumed_blocks += 1


def _block_done(run: Run, turn: Turn, seconds: float, replayed: bool) -> None:
    b = turn.index
    if replayed:  # its time is the run's that quantized it, not this replay's
        run.costs.replayed += seconds
        seconds = run.store.block_seconds.get(str(b), 0.0)
        run.costs.earlier += seconds
    elif run.store is not None:
        run.store.save_block(b, turn.weights, [r.__dict__ for r in run.report.layers if r.block == b], seconds,
                             peak_memory_mb())
        faults.reach(f"block:{b}")
    run.report.block_seconds.append(seconds)


def run_blocks(run: Run, stages: list[Stage]) -> None:
    """Every stage's ``prepare``, the calibration capture if a stage reads inputs, then the blocks in order."""
    for stage in stages:
        stage.prepare(run)
    done, todo = run.done, run.todo()
    last_todo = todo[-1] if todo else -1
    needs_inputs = any(s.needs_inputs for s in stages)
    if needs_inputs:
        _capture(run)
    needs_inputs = needs_inputs and bool(todo)
    bar = tqdm(range(len(run.blocks)), desc=f"quantize {run.recipe.name}", unit="block", disable=not run.show_progress)
    for b in bar:
        t0 = time.perf_counter()
        turn = Turn(b, run.blocks[b], run.prefix(b), run.quantizable[b],
                    run.block_kwargs[b] if run.block_kwargs else None)
        replayed = b in done
        # a stored block is read from disk only when its outputs are replayed or its shard is missing
        wanted = not replayed or (needs_inputs and b < last_todo) or not run.sink.has(b)
        with run.onload.onloaded(b) if run.onload is not None and wanted else nullcontext():
            if replayed:
                _restore(run, turn, stages, onloaded=run.onload is None or wanted)
            else:
                for stage in stages:
                    stage.quantize(run, turn)
            if needs_inputs and b < last_todo:
                run.inputs = run_block(turn.block, run.inputs, turn.kwargs)
            if not replayed or not run.sink.has(b):  # before the block counts as done
                run.sink.write(b, turn.block, turn.weights, turn.prefix)
        _block_done(run, turn, time.perf_counter() - t0, replayed)
        bar.set_postfix(peak_mb=f"{peak_memory_mb():.0f}")
    if run.store is not None:
        run.store.finish()
