"""A recipe is data: which Hessian, which rounding on which grid, which calibration.

Sections map one-to-one to the YAML/TOML files a user reads and writes; unknown keys and
out-of-range values are rejected with a one-line message before any model is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lowbit.data.sources import DATASETS, SAMPLING, check_dataset, text_file
from lowbit.errors import LowbitError
from lowbit.recipes.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_list,
    check_seed,
    check_sites,
    is_int,
)
from lowbit.recipes.methods import METHOD_TABLE, METHODS

GRIDS, INCOHERENCE = ("minmax", "rms"), ("none", "hadamard", "kron")
HESSIAN_SOURCES = ("layerwise", "output_adaptive")
ACT_GRANULARITY = ("tensor", "token", "cluster")
ACT_SITES = SMOOTHING_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")  # the linear inputs
FLOAT_BITS = 16  # activations (or the KV cache) left in floating point

# Upper bounds no real run comes near: a typo (an extra zero, a seed pasted as a count) fails here, not after hours.
MAX_NSAMPLES = 100_000          # calibration sequences
MAX_SEQLEN = 1_048_576          # tokens per calibration sequence (2**20)
MAX_WIDTH = 65_536              # group_size, blocksize, lowrank.rank, smoothing.outliers: columns of one layer
MAX_CLUSTERS = 4_096            # activation clusters (more than a layer's channels are cut to them when clustering)
MAX_GREEDY_PASSES = 100         # QuIP's coordinate-descent passes (the presets use 1)
MAX_HESSIAN_PASSES = 1_024      # output-adaptive gradient passes (a 7B Llama has 224 linear layers to share out)
MAX_RMS_MULT = 100.0            # QuIP's per-matrix grid ±rms_mult·RMS(W) (the paper: 2.4)


@dataclass(frozen=True)
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
        """Each value's type and range, then the combinations a method supports."""
        check_choice(self.method, "weights.method", METHODS)
        lo = min(METHOD_TABLE[self.method].bits[0], 2)  # billm's 1 is also its only width: below
        if not (is_int(self.bits) and lo <= self.bits <= 8):
            raise LowbitError(f"weights.bits must be an integer from 2 to 8 (1 with method billm), got {self.bits!r}")
        check_int(self.group_size, "weights.group_size", 1, MAX_WIDTH, null=True)
        for flag in ("symmetric", "clip_search", "act_order"):
            check_bool(getattr(self, flag), f"weights.{flag}")
        check_float(self.damp, "weights.damp", 0, 1, hi_open=True)
        check_int(self.blocksize, "weights.blocksize", 1, MAX_WIDTH)
        check_choice(self.grid, "weights.grid", GRIDS)
        check_float(self.rms_mult, "weights.rms_mult", 0, MAX_RMS_MULT, lo_open=True)
        check_int(self.greedy_passes, "weights.greedy_passes", 0, MAX_GREEDY_PASSES)
        check_float(self.outlier_fraction, "weights.outlier_fraction", 0, 0.5, hi_open=True)
        check_int(self.stats_bits, "weights.stats_bits", 2, 8, null=True)
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings valid alone that a method or grid cannot honour together."""
        if self.method == "billm" and (self.bits != 1 or self.group_size is not None or self.act_order
                                       or self.clip_search or self.grid != "minmax" or self.greedy_passes):
            raise LowbitError("weights.method billm binarizes: set bits: 1, group_size: null, act_order: false, "
                              "clip_search: false, greedy_passes: 0")
        if self.grid == "rms" and (self.group_size is not None or self.clip_search):
            raise LowbitError("weights.grid: rms has one scale per matrix: set group_size: null and clip_search: false")
        method = METHOD_TABLE[self.method]
        if self.greedy_passes and not method.hessian:
            raise LowbitError("weights.greedy_passes needs a Hessian: use method gptq or ldlq, not rtn")
        if self.outlier_fraction and (not method.outliers or self.greedy_passes or self.grid != "minmax"):
            raise LowbitError("weights.outlier_fraction needs method gptq on the minmax grid, without greedy passes")
        if self.stats_bits is not None and (not method.scale_codes or self.group_size is None
                                            or self.grid != "minmax"):
            raise LowbitError("weights.stats_bits quantizes group scales: it needs method gptq or rtn, a group_size "
                              "and the minmax grid")


@dataclass(frozen=True)
class TransformSpec:
    """Rewrites of each layer before rounding. ``incoherence``: QuIP's two-sided random orthogonal
    transform (``kron``: the paper's Kronecker of small random orthogonals with a permutation;
    ``hadamard``: randomized Hadamard), with the diagonal rescaling ``rescale``; ``seed`` makes
    the per-layer transforms (stored as seeds) reproducible."""

    incoherence: str = "none"
    rescale: bool = True
    seed: int = 0

    def validate(self) -> None:
        """Type and range of each value."""
        check_choice(self.incoherence, "transform.incoherence", INCOHERENCE)
        check_bool(self.rescale, "transform.rescale")
        check_seed(self.seed, "transform.seed")


@dataclass(frozen=True)
class HessianSpec:
    """Where curvature comes from: ``layerwise`` (``2·XᵀX/n`` of each layer's calibration inputs)
    or ``output_adaptive`` (OAC: Fisher of the output cross-entropy's gradients, one gradient pass
    on the full-precision model up front). ``skip_first_tokens`` (layer-wise only) drops
    attention-sink positions. ``passes`` (output-adaptive only) splits the gradient pass into that
    many, each summing a share of the layers, when one pass's sums would not fit the device: a
    7B Llama's are 28 GB in float32. ``experts`` (layer-wise, mixture-of-experts models): ``routed``,
    each expert's Hessian from the tokens its router sends it (an expert reached by fewer tokens
    than it has inputs is rounded with RTN), or ``all``, from every token (the block's outputs are
    the routed ones either way)."""

    source: str = "layerwise"
    skip_first_tokens: int = 0
    passes: int = 1
    experts: str = "routed"

    def validate(self) -> None:
        """Type and range of each value; each knob applies to one source only."""
        check_choice(self.source, "hessian.source", HESSIAN_SOURCES)
        check_int(self.skip_first_tokens, "hessian.skip_first_tokens", 0, MAX_SEQLEN)
        if self.skip_first_tokens and self.source != "layerwise":
            raise LowbitError("hessian.skip_first_tokens applies to the layer-wise Hessian only, "
                              f"not to hessian.source {self.source!r}")
        check_int(self.passes, "hessian.passes", 1, MAX_HESSIAN_PASSES)
        check_choice(self.experts, "hessian.experts", ("routed", "all"))
        if self.experts != "routed" and self.source != "layerwise":
            raise LowbitError("hessian.experts applies to the layer-wise Hessian only, "
                              f"not to hessian.source {self.source!r}")
        if self.passes > 1 and self.source != "output_adaptive":
            raise LowbitError("hessian.passes applies to the output-adaptive Hessian only, "
                              f"not to hessian.source {self.source!r}")


@dataclass(frozen=True)
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
        """Type and range of each value (clusters beyond a layer's channels need the model: cut when clustering)."""
        for key in ("bits", "kv_bits"):
            v = getattr(self, key)
            if not (is_int(v) and (2 <= v <= 8 or v == FLOAT_BITS)):
                raise LowbitError(f"activations.{key} must be an integer from 2 to 8, or 16 for float, got {v!r}")
        check_choice(self.granularity, "activations.granularity", ACT_GRANULARITY)
        for flag in ("symmetric", "reorder"):
            check_bool(getattr(self, flag), f"activations.{flag}")
        for key in ("clusters_norm", "clusters_mlp", "clusters_head"):
            check_int(getattr(self, key), f"activations.{key}", 1, MAX_CLUSTERS)
        check_seed(self.seed, "activations.seed")
        check_sites(self.sites, "activations.sites", ACT_SITES)


@dataclass(frozen=True)
class SmoothingSpec:
    """SmoothQuant's migration of activation range into the weights, per input channel
    ``s_j = max|X_j|^α / max|W_:,j|^(1−α)`` folded into the producing norm / linear
    (``alpha: null``: off) at ``sites`` (SmoothQuant's: the two norm outputs; ``attn_out`` and
    ``mlp_mid`` fold into V and up-projection rows), and ASER's outlier extraction: the ``outliers`` input columns
    of each layer with the largest (smoothed) weight magnitude are left out of the quantized weight, so
    the quantization error the low-rank branch reconstructs holds them whole."""

    alpha: float | None = None
    outliers: int = 0
    sites: list[str] = field(default_factory=lambda: ["attn_in", "mlp_in"])

    @property
    def enabled(self) -> bool:
        return self.alpha is not None

    def validate(self) -> None:
        """Type and range of each value."""
        check_float(self.alpha, "smoothing.alpha", 0, 1, null=True)
        check_int(self.outliers, "smoothing.outliers", 0, MAX_WIDTH)
        check_sites(self.sites, "smoothing.sites", SMOOTHING_SITES, nonempty=True)


@dataclass(frozen=True)
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
        """Type and range of each value; the rank is fixed or found from the energy, not both."""
        check_int(self.rank, "lowrank.rank", 0, MAX_WIDTH)
        for key in ("energy", "budget"):
            check_float(getattr(self, key), f"lowrank.{key}", 0, 1, lo_open=True, null=True)
        if self.rank and self.energy is not None:
            raise LowbitError("lowrank: give either rank or energy, not both")
        check_bool(self.whiten, "lowrank.whiten")
        check_float(self.damp, "lowrank.damp", 0, 1, hi_open=True)


@dataclass(frozen=True)
class CalibrationSpec:
    dataset: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sampling: str = "documents"

    def validate(self) -> None:
        """Type and range of each value: a huge count would run for days before anything failed."""
        if not (isinstance(self.dataset, str) and (self.dataset in DATASETS or text_file(self.dataset))):
            raise LowbitError(f"calibration.dataset must be one of {', '.join(DATASETS)}, or a .txt / .jsonl file, "
                              f"got {self.dataset!r}")
        if self.dataset not in DATASETS:
            check_dataset(self.dataset, "calibration.dataset")
        check_int(self.nsamples, "calibration.nsamples", 1, MAX_NSAMPLES)
        check_int(self.seqlen, "calibration.seqlen", 1, MAX_SEQLEN)
        check_seed(self.seed, "calibration.seed")
        check_choice(self.sampling, "calibration.sampling", SAMPLING)


@dataclass(frozen=True)
class PipelineSpec:
    """``true_sequential``: quantize q/k/v, then o, then gate/up, then down, each on inputs that
    already went through the quantized layers before it (GPTQ's ``--true-sequential``)."""

    true_sequential: bool = True
    skip: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Type of each value; every skip pattern must compile."""
        check_bool(self.true_sequential, "pipeline.true_sequential")
        check_list(self.skip, "pipeline.skip", "a list of regular expressions", lambda p: isinstance(p, str))
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise LowbitError(f"pipeline.skip pattern {pattern!r} is not a valid regular expression: "
                                  f"{exc}") from None


