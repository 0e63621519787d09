"""A recipe is data: which Hessian, which rounding on which grid, which calibration.

Sections map one-to-one to the YAML/TOML files a user reads and writes; unknown keys and
out-of-range values are rejected with a one-line message before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Any

from lowbit.data.sources import DATASETS, SAMPLING
from lowbit.errors import LowbitError

METHODS = ("none", "rtn", "gptq", "ldlq", "billm")  # none: weights stay in float (activation-only ablations)
GRIDS = ("minmax", "rms")
INCOHERENCE = ("none", "hadamard", "kron")
HESSIAN_SOURCES = ("layerwise", "output_adaptive")
ACT_GRANULARITY = ("tensor", "token", "cluster")
ACT_SITES = SMOOTHING_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")  # the linear inputs
FLOAT_BITS = 16  # activations (or the KV cache) left in floating point


def _positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LowbitError(f"{what} must be a positive integer, got {value!r}")


@dataclass
class WeightSpec:
    """How weights are rounded; ``group_size: null`` means one scale per output channel.

    ``clip_search``: pick each row's (group's) range by GPTQ's shrink search instead of min-max.
    ``grid: rms``: QuIP's one scale per matrix, ``±rms_mult·RMS(W)`` (no groups, no clip search).
    ``greedy_passes``: QuIP's coordinate-descent passes after rounding (LDLQ-RG = act_order + passes).
    ``outlier_fraction``: SpQR-style share of weights kept in float16 (GPTQ only), picked by the
    Hessian-weighted rounding error, so OAC's Hessian picks them by the output loss.
    ``stats_bits``: SpQR's quantized group scales (codes per 16 rows; null = float16 scales).
    """

    method: str = "gptq"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False
    clip_search: bool = False
    act_order: bool = False
    damp: float = 0.01
    blocksize: int = 128
    grid: str = "minmax"
    rms_mult: float = 2.4
    greedy_passes: int = 0
    outlier_fraction: float = 0.0
    stats_bits: int | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise LowbitError(f"weights.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "billm":
            if (self.bits != 1 or self.group_size is not None or self.act_order or self.clip_search
                    or self.grid != "minmax" or self.greedy_passes):
                raise LowbitError("weights.method billm binarizes: set bits: 1, group_size: null, act_order: false, "
                                  "clip_search: false, greedy_passes: 0")
        elif isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"weights.bits must be an integer from 2 to 8 (1 with method billm), got {self.bits!r}")
        if self.group_size is not None:
            _positive_int(self.group_size, "weights.group_size")
        _positive_int(self.blocksize, "weights.blocksize")
        for flag in ("symmetric", "clip_search", "act_order"):
            if not isinstance(getattr(self, flag), bool):
                raise LowbitError(f"weights.{flag} must be true or false, got {getattr(self, flag)!r}")
        if not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise LowbitError(f"weights.damp must be a number in [0, 1), got {self.damp!r}")
        if self.grid not in GRIDS:
            raise LowbitError(f"weights.grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if self.grid == "rms":
            if self.group_size is not None or self.clip_search:
                raise LowbitError("weights.grid: rms has one scale per matrix: set group_size: null and clip_search: false")
            if isinstance(self.rms_mult, bool) or not isinstance(self.rms_mult, (int, float)) or self.rms_mult <= 0:
                raise LowbitError(f"weights.rms_mult must be a positive number, got {self.rms_mult!r}")
        if isinstance(self.greedy_passes, bool) or not isinstance(self.greedy_passes, int) or self.greedy_passes < 0:
            raise LowbitError(f"weights.greedy_passes must be a non-negative integer, got {self.greedy_passes!r}")
        if self.greedy_passes and self.method in ("rtn", "none"):
            raise LowbitError("weights.greedy_passes needs a Hessian: use method gptq or ldlq, not rtn")
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 0.5:
            raise LowbitError(f"weights.outlier_fraction must be a number in [0, 0.5), got {f!r}")
        if f and (self.method != "gptq" or self.greedy_passes or self.grid != "minmax"):
            raise LowbitError("weights.outlier_fraction needs method gptq on the minmax grid, without greedy passes")
        sb = self.stats_bits
        if sb is not None:
            if isinstance(sb, bool) or not isinstance(sb, int) or not 2 <= sb <= 8:
                raise LowbitError(f"weights.stats_bits must be an integer from 2 to 8 or null, got {sb!r}")
            if self.method not in ("gptq", "rtn") or self.group_size is None or self.grid != "minmax":
                raise LowbitError("weights.stats_bits quantizes group scales: it needs method gptq or rtn, a group_size "
                                  "and the minmax grid")


@dataclass
class TransformSpec:
    """Rewrites of each layer before rounding. ``incoherence``: QuIP's two-sided random orthogonal
    transform (``kron``: the paper's Kronecker of small random orthogonals with a permutation;
    ``hadamard``: randomized Hadamard), with the diagonal rescaling ``rescale``; ``seed`` makes
    the per-layer transforms (stored as seeds) reproducible."""

    incoherence: str = "none"
    rescale: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.incoherence not in INCOHERENCE:
            raise LowbitError(f"transform.incoherence must be one of {', '.join(INCOHERENCE)}, got {self.incoherence!r}")
        if not isinstance(self.rescale, bool):
            raise LowbitError(f"transform.rescale must be true or false, got {self.rescale!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise LowbitError(f"transform.seed must be a non-negative integer, got {self.seed!r}")


@dataclass
class HessianSpec:
    """Where curvature comes from: ``layerwise`` (``2·XᵀX/n`` of each layer's calibration inputs)
    or ``output_adaptive`` (OAC: Fisher of the output cross-entropy's gradients, one gradient pass
    on the full-precision model up front). ``skip_first_tokens`` (layer-wise only) drops
    attention-sink positions. ``passes`` (output-adaptive only) splits the gradient pass into that
    many, each summing a share of the layers, when one pass's sums would not fit the device: a
    7B Llama's are 28 GB in float32."""

    source: str = "layerwise"
    skip_first_tokens: int = 0
    passes: int = 1

    def validate(self) -> None:
        if self.source not in HESSIAN_SOURCES:
            raise LowbitError(f"hessian.source must be one of {', '.join(HESSIAN_SOURCES)}, got {self.source!r}")
        if isinstance(self.skip_first_tokens, bool) or not isinstance(self.skip_first_tokens, int) or self.skip_first_tokens < 0:
            raise LowbitError(f"hessian.skip_first_tokens must be a non-negative integer, got {self.skip_first_tokens!r}")
        if self.skip_first_tokens and self.source != "layerwise":
            raise LowbitError("hessian.skip_first_tokens applies to the layer-wise Hessian only, "
                              f"not to hessian.source {self.source!r}")
        _positive_int(self.passes, "hessian.passes")
        if self.passes > 1 and self.source != "output_adaptive":
            raise LowbitError("hessian.passes applies to the output-adaptive Hessian only, "
                              f"not to hessian.source {self.source!r}")


@dataclass
class ActivationSpec:
    """Activation and KV-cache quantization (``bits``/``kv_bits`` 16: left in float).

    ``granularity``: ``tensor`` — one static range per tensor, calibrated; ``token`` — one range
    per token, computed at run time; ``cluster`` — RPTQ: channels clustered by KMeans on their
    calibrated (max, min), one static range per cluster (``clusters_norm`` for the norm outputs,
    ``clusters_mlp`` for the down-projection input, ``clusters_head`` per head for the attention
    output and K/V). ``reorder`` folds the cluster permutations into the weights so that each
    cluster is a contiguous slice (q/k are not permuted under RoPE). ``sites``: which linear
    inputs ``bits`` applies to (attention-norm output, attention output, MLP-norm output,
    down-projection input); the K/V cache follows ``kv_bits``.
    """

    bits: int = FLOAT_BITS
    kv_bits: int = FLOAT_BITS
    granularity: str = "cluster"
    symmetric: bool = False
    reorder: bool = True
    clusters_norm: int = 32
    clusters_mlp: int = 32
    clusters_head: int = 4
    seed: int = 0
    sites: list[str] = field(default_factory=lambda: list(ACT_SITES))

    @property
    def enabled(self) -> bool:
        return (self.bits < FLOAT_BITS and bool(self.sites)) or self.kv_bits < FLOAT_BITS

    @property
    def static(self) -> bool:
        return self.enabled and self.granularity != "token"

    def validate(self) -> None:
        for key in ("bits", "kv_bits"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not (2 <= v <= 8 or v == FLOAT_BITS):
                raise LowbitError(f"activations.{key} must be an integer from 2 to 8, or 16 for float, got {v!r}")
        if self.granularity not in ACT_GRANULARITY:
            raise LowbitError(f"activations.granularity must be one of {', '.join(ACT_GRANULARITY)}, got {self.granularity!r}")
        for flag in ("symmetric", "reorder"):
            if not isinstance(getattr(self, flag), bool):
                raise LowbitError(f"activations.{flag} must be true or false, got {getattr(self, flag)!r}")
        for key in ("clusters_norm", "clusters_mlp", "clusters_head"):
            _positive_int(getattr(self, key), f"activations.{key}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise LowbitError(f"activations.seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.sites, list) or any(x not in ACT_SITES for x in self.sites):
            raise LowbitError(f"activations.sites must be a list of {', '.join(ACT_SITES)}, got {self.sites!r}")


@dataclass
class SmoothingSpec:
    """SmoothQuant's migration of activation range into the weights, per input channel
    ``s_j = max|X_j|^α / max|W_:,j|^(1−α)`` folded into the producing norm / linear
    (``alpha: null``: off) at ``sites`` (SmoothQuant's: the two norm outputs; ``attn_out`` and
    ``mlp_mid`` fold into V and up-projection rows), and ASER's outlier extraction: the ``outliers`` input columns of each
    layer with the largest (smoothed) weight magnitude are left out of the quantized weight, so
    the quantization error the low-rank branch reconstructs holds them whole."""

    alpha: float | None = None
    outliers: int = 0
    sites: list[str] = field(default_factory=lambda: ["attn_in", "mlp_in"])

    @property
    def enabled(self) -> bool:
        return self.alpha is not None

    def validate(self) -> None:
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not 0 <= self.alpha <= 1):
            raise LowbitError(f"smoothing.alpha must be a number in [0, 1] or null, got {self.alpha!r}")
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, int) or self.outliers < 0:
            raise LowbitError(f"smoothing.outliers must be a non-negative integer, got {self.outliers!r}")
        if not isinstance(self.sites, list) or not self.sites or any(x not in SMOOTHING_SITES for x in self.sites):
            raise LowbitError(f"smoothing.sites must be a non-empty list of {', '.join(SMOOTHING_SITES)}, got {self.sites!r}")


@dataclass
class LowRankSpec:
    """Low-rank error reconstruction after rounding (ASER): ``E = W − Q(W)`` ≈ ``A·B``, served as
    ``y = Q(W)·x + A·(B·x)`` with A and B in float16. ``whiten``: truncate the SVD of ``E·S``
    (``S`` the Cholesky factor of the calibration Gram ``XᵀX``, damped by ``damp``), optimal for the
    output error; ``false``: plain SVD of ``E`` (LoRC). Rank: ``rank`` fixed, or the smallest rank
    keeping ``energy`` of the (whitened) error energy; ``budget`` caps the extra parameters at
    that fraction of the layer's."""

    rank: int = 0
    energy: float | None = None
    budget: float | None = None
    whiten: bool = True
    damp: float = 0.01

    @property
    def enabled(self) -> bool:
        return self.rank > 0 or self.energy is not None

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise LowbitError(f"lowrank.rank must be a non-negative integer, got {self.rank!r}")
        for key in ("energy", "budget"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
                raise LowbitError(f"lowrank.{key} must be a number in (0, 1] or null, got {v!r}")
        if self.rank and self.energy is not None:
            raise LowbitError("lowrank: give either rank or energy, not both")
        if not isinstance(self.whiten, bool):
            raise LowbitError(f"lowrank.whiten must be true or false, got {self.whiten!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise LowbitError(f"lowrank.damp must be a number in [0, 1), got {self.damp!r}")


@dataclass
class CalibrationSpec:
    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sampling: str = "documents"

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise LowbitError(f"calibration.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        _positive_int(self.nsamples, "calibration.nsamples")
        _positive_int(self.seqlen, "calibration.seqlen")
        if self.sampling not in SAMPLING:
            raise LowbitError(f"calibration.sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")


@dataclass
class PipelineSpec:
    """``true_sequential``: quantize q/k/v, then o, then gate/up, then down, each on inputs that
    already went through the quantized layers before it (GPTQ's ``--true-sequential``)."""

    true_sequential: bool = True
    skip: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not isinstance(self.true_sequential, bool):
            raise LowbitError(f"pipeline.true_sequential must be true or false, got {self.true_sequential!r}")
        if not isinstance(self.skip, list) or not all(isinstance(p, str) for p in self.skip):
            raise LowbitError(f"pipeline.skip must be a list of regular expressions, got {self.skip!r}")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise LowbitError(f"pipeline.skip pattern {pattern!r} is not a valid regular expression: {exc}") from None


@dataclass
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

    def validate(self) -> "Recipe":
        self.weights.validate()
        self.transform.validate()
        self.hessian.validate()
        self.calibration.validate()
        self.pipeline.validate()
        self.activations.validate()
        self.smoothing.validate()
        self.lowrank.validate()
        if self.smoothing.outliers and not self.lowrank.enabled:
            raise LowbitError("smoothing.outliers leaves columns out of the quantized weight: it needs lowrank.rank or lowrank.energy")
        if (self.smoothing.enabled or self.lowrank.enabled) and self.hessian.source == "output_adaptive":
            raise LowbitError("smoothing and lowrank need layer-wise calibration statistics (hessian.source: layerwise)")
        if self.lowrank.enabled and self.weights.method == "none":
            raise LowbitError("lowrank reconstructs a quantization error: weights.method none has none")
        if self.weights.method == "billm" and (self.lowrank.enabled or self.transform.incoherence != "none"):
            raise LowbitError("weights.method billm takes no lowrank branch and no incoherence transform")
        if self.activations.enabled and self.hessian.source == "output_adaptive":
            raise LowbitError("activation quantization needs layer-wise Hessians (hessian.source: layerwise)")
        return self

    @property
    def needs_calibration(self) -> bool:
        return (self.weights.method not in ("rtn", "none") or self.activations.static or self.smoothing.enabled
                or self.lowrank.enabled)

    @property
    def needs_hessians(self) -> bool:
        """Rounding or the whitened low-rank branch use the layer Hessians."""
        return self.weights.method in ("gptq", "ldlq", "billm") or (self.lowrank.enabled and self.lowrank.whiten)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["hessian"]["passes"] == 1:  # how the gradient pass is split changes no number: left out at its
            del d["hessian"]["passes"]   # default, so that recipes keep the identity (resume, cache) they had
        return d

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
