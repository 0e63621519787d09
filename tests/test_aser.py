"""ASER / LoRC / SmoothQuant: the whitened truncation is optimal, smoothing preserves the function,
the low-rank branch is part of the checkpoint and the runtime."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, full_and_resumed, tiny_llama

from lowbit.activations.calibrate import calibrate_block
from lowbit.errors import LowbitError
from lowbit.export.load import load_quantized
from lowbit.export.write import save
from lowbit.methods.weights import outlier_columns
from lowbit.models import find_blocks
from lowbit.models.layout import block_layout
from lowbit.pipeline import quantize_model
from lowbit.pipeline.capture import capture_block_inputs, run_block
from lowbit.recipes import ActivationSpec, Recipe, SmoothingSpec
from lowbit.runtime import LowRankLinear
from lowbit.transforms.lowrank import choose_rank, reconstruct_error


def _problem(seed: int = 0, out: int = 24, n_in: int = 32, tokens: int = 400):
    """An error matrix and correlated inputs with a few loud channels (where whitening matters)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= 20
    e = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    return e, x


def _output_error(e, lr, x):
    m = torch.zeros_like(e) if lr is None else lr.a.double() @ lr.b.double()
    return float(torch.linalg.matrix_norm((e - m) @ x.T))


@pytest.mark.parametrize("rank", [1, 4, 8, 16])
def test_whitened_truncation_is_optimal_for_the_output_error(rank):
    e, x = _problem(rank)
    h = x.T @ x
    white = reconstruct_error(e, h, rank=rank, damp=0.0, dtype=torch.float64)
    plain = reconstruct_error(e, h, rank=rank, whiten=False, dtype=torch.float64)
    # closed form (float64): the tail singular values of E·S, S = chol(XᵀX)
    sigma = torch.linalg.svdvals(e @ torch.linalg.cholesky(h))
    expected = float(sigma[rank:].pow(2).sum().sqrt())
    assert _output_error(e, white, x) == pytest.approx(expected, rel=1e-8)
    assert _output_error(e, white, x) <= _output_error(e, plain, x)
    # and plain SVD is the optimum of the unweighted error instead
    assert (float(torch.linalg.matrix_norm(e - plain.a @ plain.b))
            <= float(torch.linalg.matrix_norm(e - white.a @ white.b)) + 1e-9)


def test_float16_factors_stay_close_to_the_float64_optimum():
    e, x = _problem(1)
    h = x.T @ x
    exact = _output_error(e, reconstruct_error(e, h, rank=8, damp=0.0, dtype=torch.float64), x)
    half = _output_error(e, reconstruct_error(e, h, rank=8, damp=0.0), x)
    assert half == pytest.approx(exact, rel=1e-3)


def test_rank_rules_energy_and_budget():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert choose_rank(sigma, (10, 10), rank=3) == 3
    assert choose_rank(sigma, (10, 10), energy=16 / 22) == 1
    assert choose_rank(sigma, (10, 10), energy=0.8) == 2
    assert choose_rank(sigma, (10, 10), energy=1.0) == 4
    assert choose_rank(sigma, (10, 10), rank=4, budget=0.1) == 0  # 0.1·100/20 = 0.5 → 0
    assert choose_rank(sigma, (100, 100), rank=4, budget=0.02) == 1
    assert reconstruct_error(torch.zeros(4, 4), torch.eye(4), energy=0.9) is None


def test_near_singular_gram_is_repaired_not_fatal():
    e, x = _problem(2)
    x[:, 5] = x[:, 4]  # rank-deficient inputs
    h = x.T @ x
    h[7, :] = h[:, 7] = 0  # a dead input
    lr = reconstruct_error(e, h, rank=4, damp=0.0)
    assert lr is not None and torch.isfinite(lr.a).all() and torch.isfinite(lr.b).all()


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda f: f.__name__)
def test_smoothing_every_site_preserves_the_function(arch, calib_ids):
    model = arch()
    ids = calib_ids[:2, :24]
    spec = ActivationSpec()  # no quantizers: smoothing only
    smoothing = SmoothingSpec(alpha=0.5, sites=["attn_in", "attn_out", "mlp_in", "mlp_mid"])
    with torch.no_grad():
        ref = model(ids).logits
        norm_before = model.get_submodule(f"{find_blocks(model)[0]}.0").get_submodule(
            block_layout(find_blocks(model)[1][0], model.config).attn_norm).weight.clone()
        _, blocks = find_blocks(model)
        inputs, kwargs = capture_block_inputs(model, blocks, calib_ids)
        for b, block in enumerate(blocks):
            plan = calibrate_block(block, block_layout(block, model.config), inputs, kwargs[b], spec, model.config,
                                   smoothing)
            assert set(plan.scales) == set(smoothing.sites) and not plan.quantizers
            inputs = run_block(block, inputs, kwargs[b])
        out = model(ids).logits
    norm_after = blocks[0].get_submodule(block_layout(blocks[0], model.config).attn_norm).weight
    assert not torch.allclose(norm_before, norm_after)  # really rescaled
    assert (out - ref).abs().max() <= 1e-5


def test_smoothing_balances_activation_and_weight_ranges():
    from lowbit.surgery.smoothing import smoothing_scales

    x = torch.tensor([100.0, 1.0, 4.0, 0.0])
    w = torch.tensor([1.0, 1.0, 4.0, 2.0])
    s = smoothing_scales(x, w, 0.5)
    torch.testing.assert_close(x[:3] / s[:3], w[:3] * s[:3])  # α = ½: equal ranges after migration
    assert s[3] == 1.0  # a channel that never fired is left alone


def _aser(**over) -> Recipe:
    data = {"weights": {"method": "rtn", "bits": 4}, "activations": {"bits": 8, "granularity": "token"},
            "smoothing": {"alpha": 0.5, "outliers": 2}, "lowrank": {"rank": 4}}
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return Recipe.from_dict(data)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda f: f.__name__)
def test_low_rank_branch_survives_save_and_reload(arch, calib_ids, tmp_path):
    model = arch()
    model_q = quantize_model(model, _aser(), calib_ids, show_progress=False)
    assert all(qw.lowrank is not None and qw.lowrank.rank == 4 for qw in model_q.weights.values())
    save(model_q, tmp_path)
    back, _ = load_quantized(tmp_path)
    branches = [m for m in back.modules() if isinstance(m, LowRankLinear)]
    assert len(branches) == len(model_q.weights) and all(m.a.dtype == torch.float16 for m in branches)
    with torch.no_grad():  # fake-quant W + A·B in memory vs packed Q(W)·x + A·(B·x): summation order only
        torch.testing.assert_close(back(calib_ids[:2]).logits, model(calib_ids[:2]).logits, atol=1e-4, rtol=1e-4)


def test_low_rank_branch_composes_with_quip(calib_ids, tmp_path):
    recipe = _aser(weights={"method": "ldlq", "bits": 2}, transform={"incoherence": "hadamard"},
                   activations={"bits": 16}, smoothing={"alpha": None, "outliers": 0})
    model = tiny_llama()
    model_q = quantize_model(model, recipe, calib_ids, show_progress=False)
    save(model_q, tmp_path)
    back, _ = load_quantized(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(calib_ids[:2]).logits, model(calib_ids[:2]).logits, atol=1e-4, rtol=1e-4)


def test_error_reconstruction_lowers_the_output_error(calib_ids):
    """Same RTN weights and smoothing; the branch fitted in the whitened space helps the model's
    output most, the plain-SVD one (LoRC) less, none at all least."""
    with torch.no_grad():
        ref = tiny_llama()(calib_ids).logits
    errors = {}
    for name, over in {"rtn": {"lowrank": {"rank": 0}}, "lorc": {"lowrank": {"whiten": False}}, "aser": {}}.items():
        model = tiny_llama()
        quantize_model(model, _aser(activations={"bits": 16}, smoothing={"outliers": 0}, **over), calib_ids,
                       show_progress=False)
        with torch.no_grad():
            errors[name] = float((model(calib_ids).logits - ref).pow(2).mean())
    assert errors["aser"] < errors["lorc"] < errors["rtn"]


def test_outlier_columns_are_the_largest_and_left_to_the_branch():
    w = torch.randn(8, 16)
    w[:, [3, 11]] *= 50
    assert set(outlier_columns(w, 2).tolist()) == {3, 11}


def test_resume_keeps_the_low_rank_branch(calib_ids, tmp_path, monkeypatch):
    full, resumed = full_and_resumed(_aser(), calib_ids, tmp_path, monkeypatch)
    with torch.no_grad():
        assert torch.equal(full.model(calib_ids[:2]).logits, resumed.model(calib_ids[:2]).logits)


@pytest.mark.parametrize("data,message", [
    ({"smoothing": {"alpha": 1.5}}, "smoothing.alpha"),
    ({"smoothing": {"sites": ["q_proj"]}}, "smoothing.sites"),
    ({"smoothing": {"outliers": 4}}, "needs lowrank"),
    ({"lowrank": {"rank": -1}}, "lowrank.rank"),
    ({"lowrank": {"rank": 4, "energy": 0.9}}, "either rank or energy"),
    ({"lowrank": {"energy": 1.5}}, "lowrank.energy"),
    ({"lowrank": {"rank": 4}, "weights": {"method": "none"}}, "method none"),
])
def test_bad_settings_are_rejected(data, message):
    with pytest.raises(LowbitError, match=message):
        Recipe.from_dict(data)


def test_branches_export_as_a_peft_lora_adapter(calib_ids, tmp_path):
    """PEFT's LoRA forward, ``base(x) + lora_B(lora_A(x))·alpha/r``, written out by hand from the
    exported files, gives the checkpoint's output."""
    import json

    from safetensors.torch import load_file

    from lowbit.export import export_lora

    model = tiny_llama()
    model_q = quantize_model(model, _aser(activations={"bits": 16}), calib_ids, show_progress=False)
    save(model_q, tmp_path / "ckpt")
    back, _ = load_quantized(tmp_path / "ckpt")
    export_lora(back, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert config["peft_type"] == "LORA" and len(config["rank_pattern"]) == len(model_q.weights)
    name = "model.layers.1.mlp.down_proj"
    layer = back.get_submodule(name)
    lora_a = tensors[f"base_model.model.{name}.lora_A.weight"].float()
    lora_b = tensors[f"base_model.model.{name}.lora_B.weight"].float()
    scaling = config["alpha_pattern"][name] / config["rank_pattern"][name]
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer.inner(x) + (x @ lora_a.T @ lora_b.T) * scaling, layer(x))
