import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.grids import RMSGrid, UniformGrid, natural_group_index, pack_codes, packed_nbytes, unpack_codes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 64, 1001])
def test_pack_unpack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel).long(), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(LowbitError):
        pack_codes(torch.tensor([4]), 2)


def _reference_minmax(w: torch.Tensor, bits: int):
    """float64 min-max asymmetric quantizer written from the GPTQ definition."""
    w = w.double()
    maxq = 2**bits - 1
    xmin = torch.clamp(w.min(1).values, max=0)
    xmax = torch.clamp(w.max(1).values, min=0)
    scale = ((xmax - xmin) / maxq).half().double()
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)
    return scale[:, None] * (q - zero[:, None])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_matches_float64_reference(bits):
    w = torch.randn(16, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(bits))
    grid = UniformGrid(bits)
    p = grid.fit(w)
    got = grid.quantize_dequantize(w.float(), p.scale, p.zero)
    torch.testing.assert_close(got.double(), _reference_minmax(w, bits), atol=1e-6, rtol=0)


def test_smaller_last_group_is_fitted_on_its_own_columns():
    w = torch.randn(8, 576, generator=torch.Generator().manual_seed(0))
    grid = UniformGrid(3, group_size=128)
    assert grid.n_groups(576) == 5
    p = grid.fit_groups(w)
    assert p.scale.shape == (8, 5)
    last = grid.fit(w[:, 512:])
    torch.testing.assert_close(p.scale[:, 4:], last.scale)
    assert torch.equal(natural_group_index(576, 128)[-64:], torch.full((64,), 4))


def test_symmetric_grid_is_centred():
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    grid = UniformGrid(4, symmetric=True)
    p = grid.fit(w)
    assert torch.all(p.zero == 8)  # codes 0..15 stand for -8s..7s (GPTQ's symmetric grid)
    inside = (w >= -8 * p.scale) & (w <= 7 * p.scale)
    err = (grid.quantize_dequantize(w, p.scale, p.zero) - w).abs()
    assert torch.all(err[inside] <= (p.scale / 2 + 1e-6).expand_as(w)[inside])


@pytest.mark.parametrize("kwargs", [dict(bits=0), dict(bits=9), dict(bits=2.5), dict(group_size=0),
                                    dict(group_size=-128), dict(group_size="128")])
def test_bad_grid_arguments_raise(kwargs):
    with pytest.raises(LowbitError):
        UniformGrid(**kwargs)


def test_clip_search_picks_the_best_shrink_factor_by_brute_force():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[:, 0] *= 8  # one outlier per row stretches the min-max range
    grid = UniformGrid(3, clip_search=True)
    got = grid.fit(w)
    plain = UniformGrid(3)
    for r in range(w.shape[0]):
        row = w[r : r + 1].double()
        best_err, best_scale = None, None
        for i in range(0, 80):
            s = 1 - i / 100
            p = plain.range_params(s * torch.clamp(row.min(1).values, max=0).float(),
                                   s * torch.clamp(row.max(1).values, min=0).float())
            err = (plain.quantize_dequantize(row.float(), p.scale, p.zero) - row.float()).abs().pow(2.4).sum().item()
            if best_err is None or err < best_err:
                best_err, best_scale = err, p.scale.item()
        assert got.scale[r].item() == pytest.approx(best_scale)
    mm = plain.fit(w)
    err = lambda p: (grid.quantize_dequantize(w, p.scale, p.zero) - w).pow(2).sum()  # noqa: E731
    assert err(got) < err(mm)


def test_clip_search_in_row_chunks_equals_all_at_once(monkeypatch):
    import lowbit.grids.uniform as uniform

    w = torch.randn(37, 50, generator=torch.Generator().manual_seed(5))
    grid = UniformGrid(2, clip_search=True)
    whole = grid.fit(w)
    monkeypatch.setitem(uniform.CLIP_CHUNK_ELEMENTS, "cpu", 80 * 50 * 3)  # 3 rows at a time
    chunked = grid.fit(w)
    assert torch.equal(whole.scale, chunked.scale) and torch.equal(whole.zero, chunked.zero)


@pytest.mark.parametrize("cols,group_size,permuted",
                         [(96, None, False), (96, 32, False), (96, 32, True), (100, 32, False)])
def test_dequantize_equals_the_gathered_formula_bit_for_bit(cols, group_size, permuted):
    """Natural groups broadcast their scale and zero, others gather them: the same floats as
    ``scale[:, g]·(codes − zero[:, g])`` either way (per channel, equal runs, act-order, smaller last group)."""
    from lowbit.rounding import QuantizedWeight

    gen = torch.Generator().manual_seed(cols)
    g = natural_group_index(cols, group_size)
    if permuted:
        g = g[torch.randperm(cols, generator=gen)]
    n_groups = int(g.max()) + 1
    codes = torch.randint(0, 8, (24, cols), generator=gen, dtype=torch.uint8)
    scale, zero = torch.rand(24, n_groups, generator=gen), torch.randint(0, 8, (24, n_groups), generator=gen).float()
    got = QuantizedWeight(codes, scale, zero, g, 3).dequantize()
    assert torch.equal(got, scale[:, g] * (codes.float() - zero[:, g]))



@pytest.mark.parametrize("grid", [UniformGrid(3, group_size=8, clip_search=True), UniformGrid(4, symmetric=True),
                                  RMSGrid(2)], ids=["minmax-g8-clip", "sym-channel", "rms"])
def test_every_grid_is_a_grid(grid):
    """The protocol the rounding algorithms use: codes in [0, maxq] that dequantize to the nearest level."""
    w = torch.randn(6, 24, generator=torch.Generator().manual_seed(0))
    p = grid.fit_groups(w)
    assert p.scale.shape == (6, grid.n_groups(24)) == p.zero.shape
    g = grid.group_index(24)
    codes = grid.quantize(w, p.scale[:, g], p.zero[:, g])
    assert codes.min() >= 0 and codes.max() <= grid.maxq and torch.equal(codes, codes.round())
    deq = grid.dequantize(codes, p.scale[:, g], p.zero[:, g])
    torch.testing.assert_close(grid.quantize_dequantize(w, p.scale[:, g], p.zero[:, g]), deq, rtol=0, atol=0)
    levels = grid.dequantize(torch.arange(grid.maxq + 1.0)[:, None, None], p.scale[:, g], p.zero[:, g])
    inside = (w >= levels[0]) & (w <= levels[-1])  # clipped values saturate instead
    nearest = (levels - w).abs().amin(0)
    torch.testing.assert_close((deq - w).abs()[inside], nearest[inside], rtol=0, atol=1e-6)
