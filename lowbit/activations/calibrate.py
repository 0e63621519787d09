"""Per block: observe activation ranges, cluster channels (RPTQ), fold the permutations, attach quantizers.

Sites, named after RPTQ's reorder points: ``attn_in`` (R1, attention-norm output), ``attn_out``
(R3, input of the attention's output projection, clustered per K/V head), ``mlp_in`` (R4,
MLP-norm output), ``mlp_mid`` (R5, down-projection input), ``k_cache`` (R2) and ``v_cache``
(which shares R3's clusters: the attention output's channel order is V's). Everything a block
needs is a :class:`BlockActPlan` — permutations plus quantizers — so that a resumed run can
apply a saved plan instead of recalibrating.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.activations.attention import use_lowbit_attention
from lowbit.activations.clustering import cluster_labels, head_labels, permutation_from_labels
from lowbit.activations.install import attach
from lowbit.activations.observer import RangeObserver
from lowbit.activations.quantizer import ActQuantizer
from lowbit.errors import LowbitError
from lowbit.models.layout import BlockLayout
from lowbit.recipes.schema import FLOAT_BITS, ActivationSpec, SmoothingSpec
from lowbit.surgery.reorder import expand_kv_perm, fold_permutations
from lowbit.surgery.smoothing import column_absmax, expand_kv, fold_smoothing, kv_shared, smoothing_scales

LINEAR_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
KV_SITES = ("k_cache", "v_cache")
# where each site's quantizer sits: (BlockLayout field, quantizer kind in activations.install)
SITE_HOME = {"attn_in": ("attn_norm", "act_out"), "mlp_in": ("mlp_norm", "act_out"), "attn_out": ("o", "act_in"),
             "mlp_mid": ("down", "act_in"), "k_cache": ("attention", "k_quant"), "v_cache": ("attention", "v_quant")}


@dataclass
class BlockActPlan:
    """Smoothing scales (folded first), then permutations, then quantizers (in the final order)."""

    perms: dict[str, torch.Tensor] = field(default_factory=dict)
    quantizers: dict[str, ActQuantizer] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors and metadata to store the plan (for resume)."""
        tensors = {f"perm.{k}": v for k, v in self.perms.items()}
        tensors.update({f"smooth.{k}": v for k, v in self.scales.items()})
        for site, q in self.quantizers.items():
            tensors.update({f"quant.{site}.{k}": v for k, v in q.state_dict().items()})
        return tensors, {site: q.metadata() for site, q in self.quantizers.items()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict) -> BlockActPlan:
        perms = {k[5:]: v for k, v in tensors.items() if k.startswith("perm.")}
        scales = {k[7:]: v for k, v in tensors.items() if k.startswith("smooth.")}
        quantizers = {}
        for site, info in meta.items():
            q = ActQuantizer.from_metadata(info)
            q.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"quant.{site}.")})
            quantizers[site] = q
        return cls(perms, quantizers, scales)


def _homes(layout: BlockLayout, site: str) -> tuple[str, ...]:
    """The modules a site's quantizer sits on: one, or every expert's down projection."""
    names = getattr(layout, SITE_HOME[site][0])
    return names if isinstance(names, tuple) else (names,)


def check_layout(layout: BlockLayout, spec: ActivationSpec, smoothing: SmoothingSpec, family: str) -> None:
    """Smoothing and reordering rescale or permute q/k/v and gate/up one by one: refused where they are fused."""
    per_channel = spec.granularity not in ("token", "tensor")
    reorders = spec.enabled and spec.reorder and per_channel
    if not layout.separable and (reorders or smoothing.enabled):
        what = "smoothing" if smoothing.enabled else "channel reordering"
        raise LowbitError(f"{what} needs separate q/k/v and gate/up projections and one MLP per block; {family} "
                          "fuses them or has experts (activation recipes without smoothing or reordering work)")
    if len(layout.down) > 1 and per_channel and "mlp_mid" in active_sites(spec):
        raise LowbitError(f"{family} has many experts' down projections: their inputs take per-tensor or per-token "
                          f"activation quantizers (granularity: {spec.granularity}; or leave out the mlp_mid site)")


def _site_bits(site: str, spec: ActivationSpec) -> int:
    return spec.kv_bits if site in KV_SITES else spec.bits


def active_sites(spec: ActivationSpec) -> list[str]:
    return [s for s in LINEAR_SITES + KV_SITES
            if _site_bits(s, spec) < FLOAT_BITS and (s in KV_SITES or s in spec.sites)]


@torch.no_grad()
def observe_block(block: nn.Module, layout: BlockLayout, inputs: torch.Tensor, kwargs: dict,
                  sites: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) at each site over all calibration tokens; K/V as ``(kv_heads, head_dim)``."""
    obs = {s: RangeObserver(2 if s in KV_SITES else 1) for s in sites}
    get = block.get_submodule
    handles = []
    for site in LINEAR_SITES:
        if site in obs:  # observed where its quantizer will sit: a module's input or output
            o, kind, homes = obs[site], SITE_HOME[site][1], _homes(layout, site)
            pooled = len(homes) > 1  # many (experts of other widths): one range for all of them
            for module in map(get, homes):
                if kind == "act_in":
                    handles.append(module.register_forward_pre_hook(
                        lambda _m, a, o=o, pooled=pooled: o(a[0].reshape(-1, 1) if pooled else a[0])))
                else:
                    handles.append(module.register_forward_hook(lambda _m, _a, out, o=o: o(out)))
    attn = get(layout.attention)
    if "k_cache" in obs or "v_cache" in obs:
        def observe_kv(key, value):  # (b, kv, s, d) -> channels (kv, d)
            if "k_cache" in obs:
                obs["k_cache"](key.transpose(1, 2))
            if "v_cache" in obs:
                obs["v_cache"](value.transpose(1, 2))
        attn.lowbit_kv_observe = observe_kv
        use_lowbit_attention(attn.config)
    try:
        for i in range(inputs.shape[0]):
            block(inputs[i : i + 1], **kwargs)
    finally:
        for h in handles:
            h.remove()
        attn.__dict__.pop("lowbit_kv_observe", None)
    return {s: o.ranges() for s, o in obs.items()}


def _per_kv_head(lo: torch.Tensor, hi: torch.Tensor, layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-output ranges ``(heads·d)`` pooled over the query heads sharing a K/V head -> ``(kv, d)``."""
    shape = (layout.kv_heads, layout.group, layout.head_dim)
    return lo.view(shape).amin(1), hi.view(shape).amax(1)


def plan_block(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], layout: BlockLayout,
               spec: ActivationSpec) -> BlockActPlan:
    """Clusters, permutations (in the old channel order) and quantizers (in the new order)."""
    plan = BlockActPlan()
    sites = active_sites(spec)
    ranges = {s: r for s, r in ranges.items() if s in sites}  # smoothing may have observed more
    if spec.granularity == "token":
        plan.quantizers = {s: ActQuantizer(_site_bits(s, spec), spec.symmetric, dynamic=True) for s in sites}
        return plan
    if spec.granularity == "tensor":
        for s in sites:
            lo, hi = ranges[s]
            plan.quantizers[s] = ActQuantizer.from_ranges(lo.min().view(1), hi.max().view(1), _site_bits(s, spec),
                                                          spec.symmetric)
        return plan

    labels: dict[str, torch.Tensor] = {}
    for s, k in (("attn_in", spec.clusters_norm), ("mlp_in", spec.clusters_norm), ("mlp_mid", spec.clusters_mlp)):
        if s in ranges:
            labels[s] = cluster_labels(*ranges[s], k, spec.seed)
    kv_labels_out = None
    if "attn_out" in ranges or "v_cache" in ranges:  # one clustering per K/V head serves both
        lo, hi = _per_kv_head(*ranges["attn_out"], layout) if "attn_out" in ranges else ranges["v_cache"]
        kv_labels_out = head_labels(lo, hi, spec.clusters_head, spec.seed)
        if "attn_out" in ranges:
            labels["attn_out"] = torch.cat([kv_labels_out[h // layout.group] for h in range(layout.heads)])
        if "v_cache" in ranges:
            labels["v_cache"] = kv_labels_out.reshape(-1)
    if "k_cache" in ranges:
        labels["k_cache"] = head_labels(*ranges["k_cache"], spec.clusters_head, spec.seed).reshape(-1)

    order: dict[str, torch.Tensor] = {}  # per site: new channel i is old channel order[i]
    if spec.reorder:
        for s in ("attn_in", "mlp_in", "mlp_mid"):
            if s in labels:
                plan.perms[s] = order[s] = permutation_from_labels(labels[s])
        if kv_labels_out is not None:
            plan.perms["attn_out"] = perm_kv = permutation_from_labels(kv_labels_out)
            if "attn_out" in labels:
                order["attn_out"] = expand_kv_perm(perm_kv, layout)
            if "v_cache" in labels:
                order["v_cache"] = perm_kv
        if "k_cache" in labels and not layout.rope:  # q/k pair up under RoPE: K keeps its order
            plan.perms["qk"] = order["k_cache"] = permutation_from_labels(labels["k_cache"].view(layout.kv_heads, -1))
    heads = {"attn_out": layout.heads, "k_cache": layout.kv_heads, "v_cache": layout.kv_heads}
    for s in sites:
        lo, hi = (r.reshape(-1) for r in ranges[s])
        lab = labels[s]
        if s in order:
            lo, hi, lab = lo[order[s]], hi[order[s]], lab[order[s]]
        if s in heads:  # labels are numbered per head: offset them so that clusters never span heads
            lab = lab + torch.arange(heads[s]).repeat_interleave(layout.head_dim) * (int(lab.max()) + 1)
        if s in KV_SITES:  # tables broadcast against (batch, kv_heads, seq, head_dim)
            lo, hi, lab = (t.view(layout.kv_heads, 1, layout.head_dim) for t in (lo, hi, lab))
        plan.quantizers[s] = ActQuantizer.from_ranges(lo, hi, _site_bits(s, spec), spec.symmetric, lab)
    return plan


def apply_plan(block: nn.Module, layout: BlockLayout, plan: BlockActPlan, config) -> None:
    """Fold the plan's smoothing scales and permutations into the block and attach its quantizers."""
    if plan.scales:
        fold_smoothing(block, layout, plan.scales)
    if plan.perms:
        fold_permutations(block, layout, plan.perms)
    for site, q in plan.quantizers.items():
        homes = _homes(layout, site)
        for name in homes:  # a copy each: every module saves and loads its own tables
            module = block.get_submodule(name)
            ref = next(module.parameters(), None)
            mine = copy.deepcopy(q) if len(homes) > 1 else q
            attach(module, SITE_HOME[site][1], mine.to(ref.device) if ref is not None else mine, config)


def smoothing_plan(block: nn.Module, layout: BlockLayout, ranges: dict,
                   smoothing: SmoothingSpec) -> dict[str, torch.Tensor]:
    """SmoothQuant scales per site (``attn_out``: one per K/V channel) from observed ranges."""
    scales = {}
    for site in smoothing.sites:
        lo, hi = ranges[site]
        x = torch.maximum(-lo, hi)
        w = column_absmax(block, layout, site)
        if site == "attn_out":
            x, w = kv_shared(x, layout), kv_shared(w, layout)
        scales[site] = smoothing_scales(x, w, smoothing.alpha)
    return scales


def _smoothed(ranges: dict, scales: dict[str, torch.Tensor], layout: BlockLayout) -> dict:
    """Channel ranges after dividing by the (positive) smoothing scales."""
    out = dict(ranges)
    for site, s in scales.items():
        if site in out:
            s = expand_kv(s, layout) if site == "attn_out" else s
            out[site] = (out[site][0] / s, out[site][1] / s)
        if site == "attn_out" and "v_cache" in out:
            s_kv = scales[site].view(layout.kv_heads, layout.head_dim)
            out["v_cache"] = (out["v_cache"][0] / s_kv, out["v_cache"][1] / s_kv)
    return out


def calibrate_block(block: nn.Module, layout: BlockLayout, inputs: torch.Tensor | None, kwargs: dict | None,
                    spec: ActivationSpec, config, smoothing: SmoothingSpec | None = None) -> BlockActPlan:
    """Observe, smooth, cluster, fold and attach, for one block (before its weights are rounded)."""
    smooth = smoothing is not None and smoothing.enabled
    sites = sorted(set(active_sites(spec)) | (set(smoothing.sites) if smooth else set()))
    ranges = observe_block(block, layout, inputs, kwargs, sites) if spec.static or smooth else {}
    scales = smoothing_plan(block, layout, ranges, smoothing) if smooth else {}
    plan = plan_block(_smoothed(ranges, scales, layout), layout, spec)
    plan.scales = scales
    apply_plan(block, layout, plan, config)
    return plan
