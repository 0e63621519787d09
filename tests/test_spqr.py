"""SpQR-style sparse outliers in GPTQ (the 2-bit base of OAC) against float64 references:
exactly the budgeted count, picked by the Hessian-weighted rounding error, kept exact, and the
rest of the rounding identical to a one-column-at-a-time OBS reference with those weights held."""

import pytest
import torch
from conftest import full_and_resumed, tiny_llama
from test_gptq import _problem

import lowbit
from lowbit.errors import LowbitError
from lowbit.format import LayerSpec
from lowbit.format.codec import storage_bits
from lowbit.grids import UniformGrid
from lowbit.recipes import Recipe
from lowbit.rounding import gptq_quantize, proxy_loss, rtn_quantize
from lowbit.rounding.outliers import outlier_budget
from lowbit.runtime import QuantLinear, packed_module

DAMP = 0.01


def _damped(h):
    return h + DAMP * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)


def _reference_mask(w, h, grid, fraction):
    """Top-k of ((w − rtn(w)) / U_jj)², U the upper Cholesky factor of the damped H⁻¹ (float64)."""
    u = torch.linalg.cholesky(torch.linalg.inv(_damped(h)), upper=True)
    sens = ((w - rtn_quantize(w.float(), grid).dequantize().double()) / torch.diag(u)) ** 2
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.topk(sens.reshape(-1), outlier_budget(w.numel(), fraction)).indices] = True
    return mask.view_as(w)


def _reference_obs_with_outliers(w, h, grid, keep):
    """Naive OBS: outliers keep their current value (as float16); groups fitted without them."""
    w = w.clone()
    hinv = torch.linalg.inv(_damped(h))
    codes, values = torch.zeros_like(w), torch.zeros_like(w)
    gs = grid.group_size
    for q in range(w.shape[1]):
        if q % gs == 0:
            p = grid.fit(w[:, q:q + gs].masked_fill(keep[:, q:q + gs], 0))
            scale, zero = p.scale[:, 0].double(), p.zero[:, 0].double()
        c = grid.quantize(w[:, q], scale, zero)
        codes[:, q] = c
        values[:, q] = w[:, q].half().double()
        deq = torch.where(keep[:, q], values[:, q], grid.dequantize(c, scale, zero))
        err = (w[:, q] - deq) / hinv[q, q]
        w[:, q:] -= err[:, None] * hinv[q, q:][None, :]
        hinv = hinv - torch.outer(hinv[:, q], hinv[q, :]) / hinv[q, q]
    return codes, values


@pytest.mark.parametrize("fraction,blocksize", [(0.004, 16), (0.02, 7), (0.1, 128)])
def test_gptq_with_outliers_equals_float64_reference(fraction, blocksize):
    w, h = _problem(rows=24, cols=64, seed=5)
    grid = UniformGrid(2, group_size=16)
    qw = gptq_quantize(w, h, grid, blocksize=blocksize, dtype=torch.float64, outlier_fraction=fraction)
    keep = _reference_mask(w, h, grid, fraction)
    assert qw.sparse.count == round(fraction * w.numel())  # exactly the budget
    got = torch.zeros(w.numel(), dtype=torch.bool)
    got[qw.sparse.index] = True
    assert torch.equal(got.view_as(w), keep)
    codes, values = _reference_obs_with_outliers(w, h, grid, keep)
    assert torch.equal(qw.codes.double()[~keep], codes[~keep])
    torch.testing.assert_close(qw.sparse.values.double(), values.reshape(-1)[qw.sparse.index], rtol=0, atol=1e-6)
    dense = qw.weight()  # outliers written over the grid values
    assert torch.equal(dense.reshape(-1)[qw.sparse.index], qw.sparse.values.float())


def test_outliers_lower_the_loss_and_cost_48_bits_each():
    w, h = _problem(rows=32, cols=96, seed=6)
    grid = UniformGrid(2, group_size=16, clip_search=True)
    losses = []
    for fraction in (0.0, 0.01, 0.05):
        qw = gptq_quantize(w, h, grid, act_order=True, outlier_fraction=fraction)
        losses.append(proxy_loss(qw.weight().double() - w, h))
        base = gptq_quantize(w, h, grid, act_order=True)
        extra = storage_bits(qw) - storage_bits(base)
        assert extra == outlier_budget(w.numel(), fraction) * (32 + 16)  # int32 index + float16 value
    assert losses[0] > losses[1] > losses[2]


def test_act_order_outliers_are_in_natural_column_order():
    w, h = _problem(rows=16, cols=48, seed=7)
    grid = UniformGrid(2, group_size=16)
    qw = gptq_quantize(w, h, grid, act_order=True, dtype=torch.float64, outlier_fraction=0.05)
    perm = torch.argsort(torch.diag(_damped(h)), descending=True)
    ref = gptq_quantize(w[:, perm], h[perm][:, perm], grid, dtype=torch.float64, outlier_fraction=0.05)
    mine = torch.zeros_like(w, dtype=torch.bool).view(-1)
    mine[qw.sparse.index] = True
    theirs = torch.zeros_like(w, dtype=torch.bool).view(-1)
    theirs[ref.sparse.index] = True
    assert torch.equal(mine.view_as(w)[:, perm], theirs.view_as(w))
    torch.testing.assert_close(qw.weight()[:, perm], ref.weight(), rtol=0, atol=1e-6)


def test_packed_layer_round_trip():
    w, h = _problem(rows=24, cols=64, seed=8)
    qw = gptq_quantize(w, h, UniformGrid(2, group_size=16), act_order=True, outlier_fraction=0.02)
    layer = packed_module(qw, None)
    assert layer.outlier_index.dtype == torch.int32 and layer.outlier_value.numel() == qw.sparse.count
    assert torch.equal(layer.quantized().weight(), qw.weight())


@pytest.mark.parametrize("preset", ["spqr-w2", "oac-w2"])
def test_presets_save_and_reload_with_outliers(preset, tmp_path, calib_ids):
    model = tiny_llama()
    recipe = lowbit.recipes.get(preset)
    model_q = lowbit.quantize(model, recipe, calib_ids, show_progress=False)
    report = model_q.report
    counts = {n: qw.sparse.count for n, qw in model_q.weights.items()}
    assert all(c == round(0.01 * model.get_submodule(n).weight.numel()) for n, c in counts.items())
    lowbit.save(model_q, tmp_path, report=report)
    reloaded, _ = lowbit.load_model(tmp_path)
    layers = {n: m for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert {n: m.n_outliers for n, m in layers.items()} == counts
    with torch.no_grad():
        torch.testing.assert_close(reloaded(calib_ids).logits, model(calib_ids).logits, atol=1e-5, rtol=0)


def test_resume_keeps_the_outliers(tmp_path, calib_ids, monkeypatch):
    full, resumed = full_and_resumed(lowbit.recipes.get("spqr-w2"), calib_ids, tmp_path, monkeypatch)
    assert all(torch.equal(resumed.weights[n].sparse.index.long(), qw.sparse.index.long())
               for n, qw in full.weights.items())
    with torch.no_grad():
        assert torch.equal(full.model(calib_ids[:2]).logits, resumed.model(calib_ids[:2]).logits)


@pytest.mark.parametrize("weights,message", [
    ({"method": "rtn", "outlier_fraction": 0.01}, "needs method gptq"),
    ({"method": "ldlq", "outlier_fraction": 0.01}, "needs method gptq"),
    ({"outlier_fraction": 0.6}, "must be a number in [0, 0.5)"),
    ({"outlier_fraction": -0.1}, "must be a number in [0, 0.5)"),
    ({"stats_bits": 3}, "needs method gptq or rtn, a group_size"),
    ({"group_size": 16, "stats_bits": 1}, "stats_bits must be an integer from 2 to 8"),
])
def test_outlier_fraction_validation(weights, message):
    with pytest.raises(LowbitError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        Recipe.from_dict({"name": "x", "weights": weights}).validate()


def test_scale_codes_against_float64_min_max():
    from lowbit.grids.stats import STATS_ROWS, quantize_scales

    g = torch.Generator().manual_seed(9)
    scale = torch.rand(37, 5, generator=g) * 0.1 + 0.01  # 37 rows: a last chunk of 5
    st = quantize_scales(scale, 3)
    s = scale.double()
    for c0 in range(0, 37, STATS_ROWS):
        chunk = s[c0:c0 + STATS_ROWS]
        lo = chunk.min(0).values.half().double()
        step = ((chunk.max(0).values - lo) / 7).half().double()
        codes = ((chunk - lo) / step).round().clamp(0, 7)
        assert torch.equal(st.codes[c0:c0 + STATS_ROWS].double(), codes)
        torch.testing.assert_close(st.decode()[c0:c0 + STATS_ROWS].double(), lo + codes * step, rtol=0, atol=1e-7)
    decl = {d.key: d for d in LayerSpec((37, 80), 2, 5, 16, stats_bits=3).grid_tensors()}
    stats_bytes = sum(decl[k].nbytes for k in ("scale_codes", "scale_lo", "scale_step"))
    assert 8 * stats_bytes == 8 * -(-37 * 5 * 3 // 8) + 3 * 5 * 32  # 3-bit codes, packed; float16 lo and step


def test_gptq_rounds_with_the_quantized_scales_and_packs_them():
    w, h = _problem(rows=40, cols=64, seed=10)
    grid = UniformGrid(2, group_size=16, clip_search=True)
    qw = gptq_quantize(w, h, grid, act_order=True, outlier_fraction=0.01, stats_bits=3)
    for c0 in range(0, 40, 16):  # each chunk of rows and group: at most 8 scale values, on lo + k·step
        assert all(qw.scale[c0:c0 + 16, g].unique().numel() <= 8 for g in range(4))
    torch.testing.assert_close(qw.scale, qw.scale_stats.decode(), rtol=0, atol=0)
    plain = gptq_quantize(w, h, grid, act_order=True, outlier_fraction=0.01)
    assert storage_bits(plain) - storage_bits(qw) == 40 * 4 * (16 - 3) - 3 * 4 * 32
    layer = packed_module(qw, None)
    assert not hasattr(layer, "scales") and layer.scale_codes.numel() == -(-40 * 4 * 3 // 8)
    assert torch.equal(layer.quantized().weight(), qw.weight())
    # quantized scales cost a little output error, far less than the bits they save
    assert proxy_loss(qw.weight().double() - w, h) < 1.5 * proxy_loss(plain.weight().double() - w, h)
