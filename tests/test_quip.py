"""QuIP: structured orthogonal transforms, incoherence processing, LDLQ ≡ GPTQ, greedy passes,
the RMS grid, and QuIP layers through the pipeline, save and reload.

References are float64 dense computations; tolerances are stated where they are not exact.
"""

import math

import pytest
import torch
from conftest import ARCHITECTURES

from lowbit.errors import LowbitError
from lowbit.export import load_quantized, save
from lowbit.format.codec import storage_bits
from lowbit.grids import RMSGrid, UniformGrid
from lowbit.hessians import condition_hessian, robust_udu
from lowbit.pipeline import quantize_model
from lowbit.recipes import CalibrationSpec, Recipe, TransformSpec, WeightSpec
from lowbit.recipes import get as get_recipe
from lowbit.rounding import gptq_quantize, proxy_loss, rtn_quantize
from lowbit.rounding.greedy import greedy_refine
from lowbit.rounding.ldlq import ldlq_quantize
from lowbit.runtime import QuipLinear, packed_module
from lowbit.transforms import Incoherence, RandomHadamard, RandomKronecker, incoherence
from lowbit.transforms.orthogonal import hadamard_blocks, kron_apply, sylvester

WIDTHS = [64, 96, 576, 1536, 7]  # power of two, 2^k·3, SmolLM2's 576 = 64·9 and 1536 = 512·3, a prime


def _problem(rows=24, cols=96, seed=0, tokens=600, spiky=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, cols, generator=g, dtype=torch.float64)
         @ torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.3)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if spiky:  # a few heavy input channels and outlier weights: what incoherence processing is for
        x[:, :3] *= 25
        w[2, 5], w[7, 40] = 30.0, -25.0
    return w, 2 * x.T @ x / tokens


@pytest.mark.parametrize("cls", [RandomHadamard, RandomKronecker])
@pytest.mark.parametrize("n", WIDTHS)
def test_structured_transforms_are_orthogonal_and_invert_exactly(cls, n):
    t = cls(n, seed=5)
    v = t.matrix()
    assert torch.allclose(v.T @ v, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(3, 4, n, dtype=torch.float64)
    assert torch.allclose(t.apply(x), x @ v.T, atol=1e-12, rtol=0)  # apply = V·x per row vector
    assert torch.allclose(t.apply_t(t.apply(x)), x, atol=1e-12, rtol=0)
    assert torch.equal(cls(n, seed=5).matrix(), v)  # rebuilt from the seed alone
    assert not torch.equal(cls(n, seed=6).matrix(), v) or n == 1


def _radix2_fwht(x: torch.Tensor) -> torch.Tensor:
    """Textbook butterfly, the O(n log n) reference: pairs (a, b) -> (a+b, a−b), log2(n) passes."""
    n = x.shape[-1]
    y, h = x.clone(), 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).reshape(-1, n)
        h *= 2
    return y / math.sqrt(n)


@pytest.mark.parametrize("n", [2, 32, 64, 512, 2048])
def test_blocked_hadamard_is_the_walsh_hadamard_transform(n):
    """The runtime's radix-≤32 passes compute exactly the butterfly's transform."""
    blocks = hadamard_blocks(n)
    assert math.prod(blocks) == n and max(blocks) <= 32
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(kron_apply(x, [sylvester(b) for b in blocks]), _radix2_fwht(x), atol=1e-12, rtol=0)
    assert torch.allclose(_radix2_fwht(x), x @ sylvester(n).T, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
def test_incoherence_round_trip_and_proxy_loss(kind):
    w, h = _problem(spiky=True)
    t = Incoherence.fit(w, h, kind, seed=0, name="layer")
    w2, h2 = t.forward_weight(w), t.forward_hessian(h)
    assert torch.allclose(t.inverse_weight(w2), w, atol=1e-10, rtol=0)
    # U·W·D·Vᵀ with V·D⁻¹HD⁻¹·Vᵀ keeps tr(W H Wᵀ) up to the trace normalisation n/tr(D⁻¹HD⁻¹)
    d_inv = 1 / t.in_scale.double()
    norm = h.shape[0] / torch.trace(h * d_inv[None] * d_inv[:, None])
    assert proxy_loss(w2, h2) == pytest.approx(proxy_loss(w, h) * float(norm), rel=1e-9)
    assert torch.trace(h2).item() == pytest.approx(h.shape[0], rel=1e-12)
    # and any quantization error maps back with the same loss: the rounding problem is equivalent
    e2 = torch.randn_like(w2) * 0.1
    assert proxy_loss(t.inverse_weight(w2 + e2) - w, h) * float(norm) == pytest.approx(proxy_loss(e2, h2), rel=1e-9)


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
def test_incoherence_lowers_mu_as_the_paper_predicts(kind):
    """QuIP Lemma 5: after the random orthogonal multiply μ_H and μ_W are O(√log n)-ish; a spiky
    problem starts far above that. Bound used: μ ≤ 2·√(2·log(n·m)) (with high probability)."""
    w, h = _problem(rows=96, cols=192, spiky=True)
    mu_w, mu_h = incoherence(w, h)
    t = Incoherence.fit(w, h, kind, seed=1, name="layer", rescale=False)
    mu_w2, mu_h2 = incoherence(t.forward_weight(w), t.forward_hessian(h))
    bound = 2 * math.sqrt(2 * math.log(w.numel()))
    assert mu_w > 2 * bound and mu_w2 < bound
    assert mu_h2 < mu_h and mu_h2 < bound


def test_udu_factor_reconstructs_the_hessian():
    _, h = _problem()
    hd, _ = condition_hessian(h, torch.zeros(1, h.shape[0], dtype=torch.float64), 0.01)
    a, d = robust_udu(hd, 0.01)
    assert torch.equal(a, torch.triu(a, diagonal=1))  # strictly upper
    unit = a + torch.eye(h.shape[0], dtype=torch.float64)
    assert torch.allclose(unit @ torch.diag(d) @ unit.T, hd, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("group_size", [None, 16, 30])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("blocksize", [128, 7])
def test_ldlq_equals_gptq(group_size, act_order, blocksize):
    """QuIP Theorem 6: LDLQ and OPTQ are the same algorithm — same codes and grids in float64."""
    w, h = _problem(seed=2)
    grid = UniformGrid(3, group_size=group_size, clip_search=group_size == 16)
    a = gptq_quantize(w, h, grid, act_order=act_order, blocksize=blocksize, dtype=torch.float64)
    b = ldlq_quantize(w, h, grid, act_order=act_order, blocksize=blocksize, dtype=torch.float64)
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero) and torch.equal(a.g_idx, b.g_idx)


def test_ldlq_loss_is_the_ldl_weighted_rounding_noise():
    """LDLQ's loss is Σ_k D_k·‖η_k‖², η the per-column rounding noise of the fed-back values."""
    w, h = _problem(seed=4)
    grid = RMSGrid(2)
    hd, wd = condition_hessian(h, w, 0.01)
    a, d = robust_udu(hd, 0.01)
    qw = ldlq_quantize(w, h, grid, dtype=torch.float64)
    what = qw.dequantize().double()
    fed = wd + (wd - what) @ a  # z_k = w_k + (W − Ŵ)_{<k}·A_{<k,k} (A strictly upper)
    eta = what - fed
    assert proxy_loss(what - wd, hd) == pytest.approx(float((eta.pow(2).sum(0) * d).sum()), rel=1e-9)


def test_greedy_passes_never_increase_the_loss_and_help():
    w, h = _problem(seed=5, spiky=True)
    grid = UniformGrid(2, group_size=32)
    hd, wd = condition_hessian(h, w, 0.01)
    losses = [proxy_loss(rtn_quantize(wd, grid).dequantize() - wd, hd)]
    q = rtn_quantize(wd, grid)
    for _ in range(3):
        q = greedy_refine(wd, hd, q, grid, passes=1, dtype=torch.float64)
        losses.append(proxy_loss(q.dequantize() - wd, hd))
    assert all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.9 * losses[0]
    ldlq = ldlq_quantize(w, h, grid, dtype=torch.float64)
    refined = greedy_refine(wd, hd, ldlq, grid, passes=2, dtype=torch.float64)
    assert proxy_loss(refined.dequantize() - wd, hd) <= proxy_loss(ldlq.dequantize() - wd, hd) + 1e-9


def test_blocked_greedy_pass_equals_updating_every_column_each_time():
    """The lazily updated gradient gives the codes of the textbook coordinate descent (float64,
    blocks of 7 over 96 columns, so the last block is short, visited in a random order, two
    passes); the default float32 path and block size give the same codes here too."""
    w, h = _problem(seed=6, spiky=True)
    grid = UniformGrid(2, group_size=16)
    hd, wd = condition_hessian(h, w, 0.01)
    start = rtn_quantize(wd, grid)
    order = torch.randperm(wd.shape[1], generator=torch.Generator().manual_seed(0))
    what, codes = start.dequantize().double(), start.codes.clone()
    s, z = start.scale.double()[:, start.g_idx.long()], start.zero.double()[:, start.g_idx.long()]
    for _ in range(2):
        for k in order.tolist():
            grad = ((what - wd) @ hd)[:, k]  # recomputed from scratch: no bookkeeping to get wrong
            codes[:, k] = grid.quantize(what[:, k] - grad / hd[k, k], s[:, k], z[:, k]).to(codes.dtype)
            what[:, k] = grid.dequantize(codes[:, k], s[:, k], z[:, k])
    assert wd.shape[1] % 7
    refined = greedy_refine(wd, hd, start, grid, passes=2, order=order, dtype=torch.float64, block=7)
    assert torch.equal(refined.codes, codes)
    assert torch.equal(greedy_refine(wd, hd, start, grid, passes=2, order=order).codes, codes)
    assert not torch.equal(start.codes, codes)  # the passes did change codes


def test_greedy_pass_keeps_quantized_group_scales():
    """A recipe may combine SpQR-style quantized scales (``stats_bits``) with greedy passes: the
    pass changes codes only, so the scales' own codes must survive it (they set the storage)."""
    w, h = _problem(seed=7)
    grid = UniformGrid(2, group_size=16)
    qw = gptq_quantize(w, h, grid, stats_bits=3)
    hd, wd = condition_hessian(h, w, 0.01)
    refined = greedy_refine(wd, hd, qw, grid, passes=1)
    assert qw.scale_stats is not None and refined.scale_stats is qw.scale_stats
    assert storage_bits(refined) == storage_bits(qw) and not torch.equal(refined.codes, qw.codes)


def test_rms_grid_levels_are_midrise_and_scaled_by_rms():
    w = torch.randn(8, 64, dtype=torch.float64)
    grid = RMSGrid(2, rms_mult=2.4)
    p = grid.fit(w)
    assert torch.all(p.scale == p.scale[0, 0]) and torch.all(p.zero == 1.5)
    rms = float(w.pow(2).mean().sqrt())
    levels = grid.dequantize(torch.arange(4, dtype=torch.float64), p.scale[0, 0].double(), 1.5)
    assert torch.allclose(levels, torch.tensor([-1, -1 / 3, 1 / 3, 1], dtype=torch.float64) * 2.4 * rms, rtol=1e-3)
    q = grid.quantize(w, p.scale, p.zero)
    assert q.min() >= 0 and q.max() <= 3
    # nearest level: no weight is farther than half a step from its level unless clamped at ±c·RMS
    err = (grid.dequantize(q, p.scale, p.zero) - w).abs()
    inside = w.abs() <= 2.4 * rms
    assert torch.all(err[inside] <= p.scale[0, 0] / 2 + 1e-9)


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
def test_quip_beats_gptq_at_2_bits_on_a_spiky_problem(kind):
    """The paper's claim in miniature: incoherence + LDLQ beats OPTQ at 2 bits per channel."""
    w, h = _problem(rows=64, cols=192, seed=7, spiky=True)
    from lowbit.methods.weights import round_weight

    gptq = round_weight(w, h, WeightSpec(method="gptq", bits=2, act_order=True, clip_search=True), "l")
    quip = round_weight(w, h, WeightSpec(method="ldlq", bits=2, grid="rms", act_order=True, greedy_passes=1), "l",
                        TransformSpec(incoherence=kind))
    assert proxy_loss(quip.weight().double() - w, h) < 0.7 * proxy_loss(gptq.weight().double() - w, h)


def _quip_recipe(kind="hadamard", bits=2, method="ldlq", **weights):
    return Recipe(name=f"quip-{kind}", weights=WeightSpec(method=method, bits=bits, grid="rms", act_order=True,
                                                          greedy_passes=1, **weights),
                  transform=TransformSpec(incoherence=kind), calibration=CalibrationSpec(nsamples=6, seqlen=32))


@pytest.mark.parametrize("make", ARCHITECTURES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", ["hadamard", "kron"])
def test_quip_checkpoint_reloads_with_equal_logits(make, kind, calib_ids, tmp_path):
    model = make()
    model_q = quantize_model(model, _quip_recipe(kind), calib_ids, show_progress=False)
    report = model_q.report
    ids = calib_ids[:2, :20]
    with torch.no_grad():
        expected = model(ids).logits
    save(model_q, tmp_path, None, report)
    reloaded, _ = load_quantized(tmp_path)
    layer = reloaded.get_submodule(next(iter(model_q.weights)))
    assert isinstance(layer, QuipLinear) and layer.inner.float_zeros
    with torch.no_grad():
        got = reloaded(ids).logits
    # fast transforms on activations vs the dense inverse-transformed weight: float32 rounding only
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), float((got - expected).abs().max())
    # the checkpoint stores seeds and packed 2-bit codes, not n×n matrices
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = next(iter(model_q.weights))
    out_f, in_f = model_q.weights[name].codes.shape
    assert tensors[f"{name}.inner.qweight"].numel() == math.ceil(out_f * in_f * 2 / 8)
    assert set(k.removeprefix(name + ".") for k in tensors if k.startswith(name + ".")) <= {
        "inner.qweight", "inner.scales", "inner.zeros", "inner.g_idx", "in_scale", "bias"}


@pytest.mark.parametrize("kind", ["hadamard", "kron"])
@pytest.mark.parametrize("tokens", [1, 200])
def test_quip_layer_output_is_the_dense_inverse_transformed_weights(kind, tokens):
    """Fast transforms on the activations, packed codes dequantized per call: the float64 product
    with ``Uᵀ·Ŵ·V·D⁻¹`` to float32 rounding, for one token (decoding) and many (prefill)."""
    from lowbit.methods.weights import round_weight

    w, h = _problem(rows=96, cols=72)
    qw = round_weight(w.float(), h.float(), WeightSpec(method="gptq", bits=3), "layer", TransformSpec(incoherence=kind))
    assert not torch.all(qw.transform.in_scale == 1)  # QuIP's rescaling is on, so D⁻¹ is checked too
    bias = torch.randn(96)
    layer = packed_module(qw, bias)
    x = torch.randn(2, tokens, 72)
    dense = qw.transform.inverse_weight(qw.dequantize().double())  # Uᵀ·Ŵ·V·D⁻¹ in float64
    expected = x.double() @ dense.T + bias.double()
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_quip_resume_gives_the_same_model(calib_ids, tmp_path, monkeypatch):
    from conftest import interrupt_rounding_in_block, tiny_llama

    recipe = _quip_recipe("kron")
    full = tiny_llama()
    full_q = quantize_model(full, recipe, calib_ids, show_progress=False)
    interrupt_rounding_in_block(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_llama(), recipe, calib_ids, progress_dir=tmp_path, show_progress=False)
    monkeypatch.undo()
    resumed = tiny_llama()
    resumed_q = quantize_model(resumed, recipe, calib_ids, progress_dir=tmp_path, resume=True, show_progress=False)
    report = resumed_q.report
    assert report.resumed_blocks == 1
    for name, qw in full_q.weights.items():
        other = resumed_q.weights[name]
        assert torch.equal(qw.codes, other.codes) and torch.equal(qw.transform.in_scale, other.transform.in_scale)
        assert torch.equal(full.get_submodule(name).weight, resumed.get_submodule(name).weight)


def test_quip_presets_and_bad_input():
    for bits in (2, 3, 4):
        r = get_recipe(f"quip-w{bits}")
        assert r.weights.method == "ldlq" and r.weights.bits == bits and r.transform.incoherence != "none"
    with pytest.raises(LowbitError, match="transform.incoherence"):
        Recipe.from_dict({"transform": {"incoherence": "fourier"}})
    with pytest.raises(LowbitError, match="one scale per matrix"):
        Recipe.from_dict({"weights": {"grid": "rms", "group_size": 128}})
    with pytest.raises(LowbitError, match="greedy_passes"):
        Recipe.from_dict({"weights": {"greedy_passes": -1}})
    with pytest.raises(LowbitError, match="greedy_passes needs a Hessian"):
        Recipe.from_dict({"weights": {"method": "rtn", "greedy_passes": 1}})
    with pytest.raises(LowbitError, match="unknown recipe key 'hadamard'"):
        Recipe.from_dict({"transform": {"hadamard": True}})


@pytest.mark.parametrize("recipe", [
    _quip_recipe("hadamard"),
    Recipe(name="g", weights=WeightSpec(method="gptq", bits=3, group_size=16, act_order=True),
           calibration=CalibrationSpec(nsamples=6, seqlen=32)),
    Recipe(name="q", weights=WeightSpec(method="ldlq", bits=2, clip_search=True, act_order=True),
           transform=TransformSpec(incoherence="kron"), calibration=CalibrationSpec(nsamples=6, seqlen=32)),
], ids=["quip-rms", "gptq-g16-act", "quip-minmax"])
def test_storage_bits_match_the_checkpoint(recipe, calib_ids, tmp_path):
    """Effective bits per weight, as reported, are what the saved tensors really take."""
    from conftest import tiny_llama
    from safetensors import safe_open

    model = tiny_llama()
    model_q = quantize_model(model, recipe, calib_ids, show_progress=False)
    save(model_q, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for name, qw in model_q.weights.items():
            stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() * 8
                         for k in f.keys() if k.startswith(name + ".") and not k.endswith("bias"))
            assert storage_bits(qw) == stored
