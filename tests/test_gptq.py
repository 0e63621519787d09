"""GPTQ against an independent float64 reference: the one-column-at-a-time OBS update with an
explicit inverse Hessian downdate (no Cholesky, no lazy batches)."""

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.grids import UniformGrid
from lowbit.hessians import HessianAccumulator, robust_cholesky_inverse
from lowbit.rounding import gptq_quantize, proxy_loss, rtn_quantize


def _problem(rows=24, cols=80, seed=0, tokens=400):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, cols, generator=g, dtype=torch.float64)
         @ torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.3)
    h = 2 * x.T @ x / tokens
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return w, h


def reference_obs(w, h, grid: UniformGrid, damp=0.01):
    """Naive OBS/OBQ: quantize column q, spread its error with H⁻¹[q, q:], then remove q from H⁻¹."""
    w = w.clone()
    h = h.clone() + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    cols = w.shape[1]
    codes = torch.zeros_like(w)
    gs = grid.group_size
    p = grid.fit(w)
    scale, zero = p.scale[:, 0].double(), p.zero[:, 0].double()
    for q in range(cols):
        if gs is not None and q % gs == 0:
            p = grid.fit(w[:, q : q + gs])
            scale, zero = p.scale[:, 0].double(), p.zero[:, 0].double()
        c = grid.quantize(w[:, q], scale, zero)
        codes[:, q] = c
        err = (w[:, q] - grid.dequantize(c, scale, zero)) / hinv[q, q]
        w[:, q:] -= err[:, None] * hinv[q, q:][None, :]
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return codes


@pytest.mark.parametrize("group_size", [None, 16, 30])
@pytest.mark.parametrize("blocksize", [128, 32, 7])
def test_gptq_equals_float64_obs_reference(group_size, blocksize):
    w, h = _problem()
    grid = UniformGrid(3, group_size=group_size)
    qw = gptq_quantize(w, h, grid, blocksize=blocksize, dtype=torch.float64)
    ref = reference_obs(w, h, grid)
    mismatch = (qw.codes.double() != ref).float().mean().item()
    assert mismatch == 0.0, f"{mismatch:.2%} of codes differ"


def test_act_order_equals_reference_on_permuted_problem():
    w, h = _problem(seed=3)
    grid = UniformGrid(4)
    qw = gptq_quantize(w, h, grid, act_order=True, dtype=torch.float64)
    h_damped = h + 0.01 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    perm = torch.argsort(torch.diag(h_damped), descending=True)
    ref = reference_obs(w[:, perm], h[perm][:, perm], grid)
    assert torch.equal(qw.codes[:, perm].double(), ref)


@pytest.mark.parametrize("group_size,blocksize", [(16, 7), (30, 32), (30, 128)])
@pytest.mark.parametrize("clip_search", [False, True])
def test_act_order_with_groups_equals_reference(group_size, blocksize, clip_search):
    """Act-order permutes the columns; groups are then contiguous in the permuted order (g_idx)."""
    w, h = _problem(seed=4)
    grid = UniformGrid(3, group_size=group_size, clip_search=clip_search)
    qw = gptq_quantize(w, h, grid, act_order=True, blocksize=blocksize, dtype=torch.float64)
    h_damped = h + 0.01 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    perm = torch.argsort(torch.diag(h_damped), descending=True)
    ref = reference_obs(w[:, perm], h[perm][:, perm], grid)
    assert torch.equal(qw.codes[:, perm].double(), ref)
    assert torch.equal(qw.g_idx[perm], torch.arange(w.shape[1]) // group_size)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("bits,group_size,act_order", [(2, 16, False), (3, None, True), (4, 32, True)])
def test_gptq_proxy_loss_never_above_rtn(seed, bits, group_size, act_order):
    w, h = _problem(seed=seed)
    grid = UniformGrid(bits, group_size=group_size)
    g = gptq_quantize(w.float(), h, grid, act_order=act_order)
    r = rtn_quantize(w.float(), grid)
    assert proxy_loss(g.dequantize() - w, h) <= proxy_loss(r.dequantize() - w, h)


def test_dead_inputs_get_zero_weights():
    w, h = _problem()
    h[5, :] = 0
    h[:, 5] = 0
    qw = gptq_quantize(w.float(), h, UniformGrid(4))
    assert torch.all(qw.dequantize()[:, 5] == 0)


def test_non_positive_definite_hessian_is_repaired_by_more_damping():
    w, h = _problem(cols=40)
    vals, vecs = torch.linalg.eigh(h)
    vals[:5] = -0.5 * vals[-1] * 0.001  # slightly indefinite: 1% damping is not enough
    h_bad = vecs @ torch.diag(vals) @ vecs.T
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(h_bad + 1e-4 * torch.mean(torch.diag(h_bad)) * torch.eye(40, dtype=h.dtype))
    qw = gptq_quantize(w.float(), h_bad, UniformGrid(4), damp=1e-4)
    assert torch.isfinite(qw.dequantize()).all()


def test_hopeless_hessian_raises_clear_error_naming_layer():
    h = torch.full((8, 8), float("nan"), dtype=torch.float64)
    with pytest.raises(LowbitError, match="blocks.3.mlp"):
        robust_cholesky_inverse(h, 0.01, name="blocks.3.mlp")


def test_hessian_accumulator_matches_float64():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 9, 12, generator=g) for _ in range(3)]
    acc = HessianAccumulator(12)
    for x in xs:
        acc.add(x)
    x_all = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    # per-batch products are float32 (sums float64): agree with float64 to float32 precision
    torch.testing.assert_close(acc.hessian(), 2 * x_all.T @ x_all / x_all.shape[0], rtol=1e-5, atol=1e-6)
    skip = HessianAccumulator(12, skip_first_tokens=1)
    for x in xs:
        skip.add(x)
    x_rest = torch.cat([x[:, 1:].reshape(-1, 12) for x in xs]).double()
    torch.testing.assert_close(skip.hessian(), 2 * x_rest.T @ x_rest / x_rest.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 9, 130])
def test_in_place_symmetric_permutation_is_indexing(n):
    """GPTQ's act-order permutes its own Hessian copy in place: the same bits as ``h[perm][:, perm]``."""
    from lowbit.hessians.conditioning import permute_symmetric_

    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, n, generator=g, dtype=torch.float64)
    perm = torch.randperm(n, generator=g)
    assert torch.equal(permute_symmetric_(h.clone(), perm), h[perm][:, perm])


def test_cholesky_inverse_factor_is_the_textbook_one():
    """Written in place into one matrix: equal (same bits) to the three steps with fresh outputs."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 120, generator=g, dtype=torch.float64)
    h = x.T @ x / 300
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    assert torch.equal(robust_cholesky_inverse(h, 0.0), ref)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lends_the_callers_hessian_back_bit_for_bit(act_order):
    """GPTQ conditions a float64 Hessian in place (no copy) and puts it back: the conditioned problem is the
    copying one's, bit for bit (dead inputs and act-order included), and the caller's matrix is unchanged."""
    from lowbit.rounding.sequential import SequentialProblem

    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 40, generator=g)
    x = torch.randn(200, 40, generator=g, dtype=torch.float64)
    x[:, 5] = 0  # a dead input
    h = x.T @ x / 200
    before = h.clone()
    with SequentialProblem.borrowed(w, h, 0.01, act_order) as lent:
        built = SequentialProblem.build(w, before, 0.01, act_order)
        assert torch.equal(lent.h, built.h) and torch.equal(lent.w, built.w)
        assert (lent.perm is None and built.perm is None) or torch.equal(lent.perm, built.perm)
    assert torch.equal(h, before) and lent.h is None
    gptq_quantize(w, h, UniformGrid(3, group_size=8), act_order=act_order)
    assert torch.equal(h, before)
