"""The recipe: one section per concern (``schema``), the rules that span sections, and building one from a
mapping (a YAML / TOML file) with every unknown key refused."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from lowbit.errors import LowbitError
from lowbit.recipes.checks import check_str
from lowbit.recipes.methods import METHOD_TABLE
from lowbit.recipes.rotation import RotationSpec
from lowbit.recipes.schema import (
    ActivationSpec,
    CalibrationSpec,
    HessianSpec,
    LowRankSpec,
    PipelineSpec,
    SmoothingSpec,
    TransformSpec,
    WeightSpec,
)
from lowbit.recipes.tuning import TuningSpec


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    weights: WeightSpec = field(default_factory=WeightSpec)
    transform: TransformSpec = field(default_factory=TransformSpec)
    hessian: HessianSpec = field(default_factory=HessianSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)
    activations: ActivationSpec = field(default_factory=ActivationSpec)
    smoothing: SmoothingSpec = field(default_factory=SmoothingSpec)
    lowrank: LowRankSpec = field(default_factory=LowRankSpec)
    tuning: TuningSpec = field(default_factory=TuningSpec)
    rotation: RotationSpec = field(default_factory=RotationSpec)

    def validate(self) -> "Recipe":
        """Every section, then the settings that span sections; returns the recipe for chaining."""
        check_str(self.name, "name")
        check_str(self.description, "description")
        self.weights.validate()
        self.transform.validate()
        self.hessian.validate()
        self.calibration.validate()
        self.pipeline.validate()
        self.activations.validate()
        self.smoothing.validate()
        self.lowrank.validate()
        self.tuning.validate()
        self.rotation.validate()
        skip, seqlen = self.hessian.skip_first_tokens, self.calibration.seqlen
        if skip >= seqlen:
            raise LowbitError(f"hessian.skip_first_tokens must be less than calibration.seqlen ({seqlen}): "
                              f"it would drop every calibration token, got {skip}")
        if self.smoothing.outliers and not self.lowrank.enabled:
            raise LowbitError("smoothing.outliers leaves columns out of the quantized weight: it needs lowrank.rank "
                              "or lowrank.energy")
        if (self.smoothing.enabled or self.lowrank.enabled) and self.hessian.source == "output_adaptive":
            raise LowbitError("smoothing and lowrank need layer-wise calibration statistics "
                              "(hessian.source: layerwise)")
        if self.lowrank.enabled and self.weights.method == "none":
            raise LowbitError("lowrank reconstructs a quantization error: weights.method none has none")
        method = METHOD_TABLE[self.weights.method]
        if self.weights.method != "none" and not method.grid and (self.lowrank.enabled
                                                                  or self.transform.incoherence != "none"):
            raise LowbitError(f"weights.method {self.weights.method} takes no lowrank branch and no incoherence "
                              "transform")
        if self.activations.enabled and self.hessian.source == "output_adaptive":
            raise LowbitError("activation quantization needs layer-wise Hessians (hessian.source: layerwise)")
        if self.tuning.enabled and not method.grid:
            raise LowbitError(f"tuning moves the codes and scales of a grid: weights.method {self.weights.method} "
                              "has none (use rtn, gptq or ldlq)")
        if self.tuning.enabled and self.activations.enabled:
            raise LowbitError("tuning with quantized activations is not supported yet: set activations.bits 16 or "
                              "tuning.iters 0")
        return self

    @property
    def needs_calibration(self) -> bool:
        return (METHOD_TABLE[self.weights.method].hessian or self.activations.static or self.smoothing.enabled
                or self.lowrank.enabled or self.tuning.enabled)

    @property
    def needs_hessians(self) -> bool:
        """Rounding or the whitened low-rank branch use the layer Hessians."""
        return METHOD_TABLE[self.weights.method].hessian or (self.lowrank.enabled and self.lowrank.whiten)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["hessian"]["passes"] == 1:  # how the gradient pass is split changes no number: left out at its
            del d["hessian"]["passes"]   # default, so that recipes keep the identity (resume, cache) they had
        if d["hessian"]["experts"] == "routed":  # added later; only mixture-of-experts models read it
            del d["hessian"]["experts"]
        if d["tuning"] == dataclasses.asdict(TuningSpec()):  # added later: an untuned recipe keeps its identity
            del d["tuning"]
        if d["rotation"] == dataclasses.asdict(RotationSpec()):  # added later, as tuning
            del d["rotation"]
        return d

    def with_overrides(self, *assignments: str, **sections: Any) -> "Recipe":
        """A new, validated recipe: ``"weights.bits=3"`` assignments (as ``--set`` takes them) and/or whole
        sections (``calibration=CalibrationSpec(...)``). Recipes are frozen: this is how one changes."""
        from lowbit.recipes import apply_overrides

        changed = dataclasses.replace(self, **sections) if sections else self
        return apply_overrides(changed, list(assignments)) if assignments else changed.validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        return _build(cls, data, where).validate()


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise LowbitError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise LowbitError(f"unknown recipe key '{unknown[0]}' in {where} (known: {', '.join(known)})")
    kwargs = {}
    for key, value in data.items():
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{where}.{key}" if where != "recipe" else key)
        else:
            kwargs[key] = value
    return cls(**kwargs)
