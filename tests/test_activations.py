"""The shared activation-quantization pieces against independent float64 references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lowbit.activations import ActQuantizer, cluster_labels, fake_quantize, head_labels, permutation_from_labels
from lowbit.activations.observer import RangeObserver
from lowbit.activations.quantizer import cluster_ranges


def _reference(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """Min-max fake quantization in float64, written from the definition (range always holds 0)."""
    maxq = 2**bits - 1
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        hi = np.maximum(-lo, hi)
        lo = np.where(lo < 0, -hi, lo)
    scale = np.maximum((hi - lo) / maxq, 1e-5).astype(np.float16).astype(np.float64)
    zero = np.full_like(scale, (maxq + 1) / 2) if symmetric else np.clip(np.round(-lo / scale), 0, maxq)
    q = np.clip(np.round(x / scale) + zero, 0, maxq)
    return (q - zero) * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_static_per_channel_matches_float64_reference(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 48, generator=g) * torch.linspace(0.1, 20, 48) + torch.linspace(-3, 3, 48)
    lo, hi = x.amin(0), x.amax(0)
    q = ActQuantizer.from_ranges(lo, hi, bits, symmetric)
    ref = _reference(x.double().numpy(), lo.double().numpy(), hi.double().numpy(), bits, symmetric)
    # float32 vs float64 arithmetic: a value exactly between two levels may round the other way
    # (one step), never more; everything else agrees to float32 precision
    diff = np.abs(q(x).double().numpy() - ref)
    step = q.scale.double().numpy()
    assert np.all(diff <= step * (1 + 1e-6))
    assert np.mean(diff < 1e-5 * np.abs(ref).max()) > 0.999


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_dynamic_per_token_error_is_half_a_step_inside_the_range(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 40, generator=g) * torch.rand(3, 17, 1, generator=g) * 10
    out = ActQuantizer(bits, dynamic=True)(x)
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    step = (hi - lo) / (2**bits - 1)
    # the integer zero point shifts the grid by up to half a step, so a token's extremes may
    # clip by up to one step; every other value is within half a step (+ float16 scale rounding)
    err = (out - x).abs()
    assert torch.all(err <= step * 1.01)
    assert (err <= 0.5 * step * 1.01).float().mean() > 0.97
    assert out.shape == x.shape and out.dtype == x.dtype
    # one range per token: a huge token does not disturb its neighbours
    x2 = x.clone()
    x2[0, 0] *= 1000
    assert torch.equal(ActQuantizer(bits, dynamic=True)(x2)[0, 1:], out[0, 1:])


def test_fake_quantize_keeps_dtype_and_levels():
    x = torch.linspace(-1, 1, 101, dtype=torch.bfloat16)
    y = fake_quantize(x, torch.tensor(0.25), torch.tensor(4.0), 3)
    assert y.dtype == torch.bfloat16
    assert set(torch.round(y.float() / 0.25).tolist()) <= set(range(-4, 4))


def test_observer_tracks_running_extremes_per_channel():
    obs = RangeObserver(channel_dims=2)
    parts = [torch.randn(2, 5, 3, 4) for _ in range(3)]
    for p in parts:
        obs(p)
    lo, hi = obs.ranges()
    whole = torch.cat(parts).reshape(-1, 3, 4)
    assert torch.equal(lo, whole.amin(0)) and torch.equal(hi, whole.amax(0))


def test_cluster_ranges_cover_their_members_and_one_cluster_is_per_tensor():
    g = torch.Generator().manual_seed(0)
    lo, hi = -torch.rand(32, generator=g) * 5, torch.rand(32, generator=g) * 5
    labels = cluster_labels(lo, hi, 4)
    clo, chi = cluster_ranges(lo, hi, labels)
    assert torch.all(clo <= lo) and torch.all(chi >= hi)
    for c in labels.unique():
        members = labels == c
        assert clo[members].unique().numel() == 1 and clo[members][0] == lo[members].min()
    one_lo, one_hi = cluster_ranges(lo, hi, torch.zeros(32, dtype=torch.long))
    assert torch.all(one_lo == lo.min()) and torch.all(one_hi == hi.max())


def test_clusters_give_a_valid_contiguous_permutation_and_are_deterministic():
    g = torch.Generator().manual_seed(3)
    hi = torch.cat([torch.rand(40, generator=g), 30 + torch.rand(5, generator=g), 5 + torch.rand(19, generator=g)])
    lo = -hi * 0.5
    labels = cluster_labels(lo, hi, 3)
    assert torch.equal(labels, cluster_labels(lo, hi, 3))  # fixed seed, canonical numbering
    assert labels.unique().numel() == 3
    perm = permutation_from_labels(labels)
    assert torch.equal(torch.sort(perm).values, torch.arange(64))  # a permutation
    reordered = labels[perm]
    assert torch.all(reordered[1:] >= reordered[:-1])  # every cluster is one contiguous slice
    # the three planted groups are recovered: outliers share a cluster, apart from the rest
    assert labels[40:45].unique().numel() == 1 and labels[40] not in labels[:40]


def test_per_head_permutation_stays_inside_each_head():
    g = torch.Generator().manual_seed(0)
    lo, hi = -torch.rand(3, 16, generator=g), torch.rand(3, 16, generator=g) * torch.arange(1, 17)
    perm = permutation_from_labels(head_labels(lo, hi, 4))
    assert torch.equal(torch.sort(perm).values, torch.arange(48))
    assert torch.equal(perm // 16, torch.arange(48) // 16)


def test_more_clusters_never_widen_a_channels_range():
    """Finer clusters fit each channel at least as tightly: the quantization error drops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.logspace(-1, 1.5, 64)[torch.randperm(64, generator=g)]
    lo, hi = x.amin(0), x.amax(0)
    errors = []
    for k in (1, 4, 16, 64):
        q = ActQuantizer.from_ranges(lo, hi, 4, False, cluster_labels(lo, hi, k))
        errors.append(float((q(x) - x).pow(2).mean()))
    assert errors[0] > 5 * errors[-1]
    assert all(a >= b * 0.999 for a, b in itertools.pairwise(errors))
