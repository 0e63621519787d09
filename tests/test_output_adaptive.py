"""OAC's output-adaptive Hessian against autograd: per-sample weight gradients formed explicitly
(float64), then ``Σ GᵀG / (N·d_out)``; and the Hessian source through the pipeline."""

import pytest
import torch
from conftest import ARCHITECTURES, tiny_llama

from lowbit.export import load_quantized, save
from lowbit.hessians.output_adaptive import StoredHessians, output_adaptive_hessians, split_layers
from lowbit.models import block_linears, find_blocks
from lowbit.pipeline import quantize_model
from lowbit.recipes import CalibrationSpec, HessianSpec, Recipe, TransformSpec, WeightSpec


def _layers(model):
    path, blocks = find_blocks(model)
    return {f"{path}.{b}.{n}": m for b, block in enumerate(blocks) for n, m in block_linears(block).items()}


def _reference(model, layers, calib):
    """Explicit per-sequence ∂ℓ/∂W from autograd, aggregated row-wise."""
    ref = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    for i in range(calib.shape[0]):
        model.zero_grad()
        model(calib[i : i + 1], labels=calib[i : i + 1]).loss.backward()
        for n, m in layers.items():
            g = m.weight.grad.double()
            ref[n] += g.T @ g
    return {n: h / (calib.shape[0] * layers[n].out_features) for n, h in ref.items()}


@pytest.mark.parametrize("make", ARCHITECTURES, ids=lambda f: f.__name__)
def test_aggregated_hessian_equals_explicit_sum_of_gradient_products(make, calib_ids):
    model = make().double()
    layers = _layers(model)
    got, cost = output_adaptive_hessians(model, layers, calib_ids, show_progress=False)
    ref = _reference(model, layers, calib_ids)
    for n in layers:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-12 * float(ref[n].abs().max()))
    assert cost["seconds"] > 0 and cost["peak_memory_mb"] > 0


def test_per_sequence_gradient_from_hooks_equals_autograds_weight_gradient(calib_ids):
    from lowbit.hessians.output_adaptive import sample_weight_gradient

    model = tiny_llama().double()
    layers = _layers(model)
    seen: dict[str, list] = {n: [] for n in layers}

    def keep(name: str):
        def hook(_module, args, out):  # the layer's input now, its output gradient in the backward
            seen[name].append(args[0].detach())
            out.register_hook(seen[name].append)

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    ids = calib_ids[1:2]
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for h in handles:
        h.remove()
    for n, m in layers.items():
        x, grad_out = seen[n]
        torch.testing.assert_close(sample_weight_gradient(x, grad_out), m.weight.grad, rtol=1e-10, atol=1e-14)


def test_interrupted_pass_continues_from_its_saved_sums(calib_ids, tmp_path):
    model = tiny_llama().double()
    layers = _layers(model)
    whole, _ = output_adaptive_hessians(model, layers, calib_ids, show_progress=False)
    state, calls = tmp_path / "oac.safetensors", []

    def stop_at_fifth(_module, _args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(stop_at_fifth)
    with pytest.raises(KeyboardInterrupt):
        output_adaptive_hessians(model, layers, calib_ids, show_progress=False, state=state, save_every=2)
    calls.clear()
    got, cost = output_adaptive_hessians(model, layers, calib_ids, show_progress=False, state=state, save_every=2)
    handle.remove()
    assert cost["resumed_at"] == 4 and len(calls) == calib_ids.shape[0] - 4
    for n in layers:
        torch.testing.assert_close(got[n], whole[n], rtol=1e-12, atol=0)


def test_the_pass_leaves_the_model_untouched(calib_ids):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output_adaptive_hessians(model, _layers(model), calib_ids, show_progress=False)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method,transform", [("gptq", "none"), ("ldlq", "hadamard")])
def test_output_adaptive_source_plugs_into_gptq_ldlq_and_incoherence(method, transform, calib_ids, tmp_path):
    recipe = Recipe(name="oac", weights=WeightSpec(method=method, bits=2,
                                                   group_size=16 if transform == "none" else None, act_order=True),
                    transform=TransformSpec(incoherence=transform), hessian=HessianSpec(source="output_adaptive"),
                    calibration=CalibrationSpec(nsamples=6, seqlen=32))
    model = tiny_llama()
    model_q = quantize_model(model, recipe, calib_ids, show_progress=False)
    report = model_q.report
    assert report.hessian_pass["seconds"] > 0 and report.capture_seconds == 0  # no block inputs needed
    assert len(report.layers) == len(model_q.weights) == 14
    assert all(r.proxy_loss is not None and r.proxy_loss >= 0 for r in report.layers)
    ids = calib_ids[:2]
    with torch.no_grad():
        expected = model(ids).logits
    save(model_q, tmp_path, None, report)
    reloaded, _ = load_quantized(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=2e-5, rtol=1e-4)


def test_resumed_oac_run_reuses_the_gradient_pass_and_gives_the_same_model(calib_ids, tmp_path, monkeypatch):
    from conftest import interrupt_rounding_in_block

    from lowbit.hessians import output_adaptive as oac

    recipe = Recipe(name="oac", weights=WeightSpec(method="gptq", bits=2, group_size=16),
                    hessian=HessianSpec(source="output_adaptive"), calibration=CalibrationSpec(nsamples=6, seqlen=32))
    full = tiny_llama(layers=3)
    full_q = quantize_model(full, recipe, calib_ids, show_progress=False)
    with monkeypatch.context() as m:
        interrupt_rounding_in_block(m, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(tiny_llama(layers=3), recipe, calib_ids, progress_dir=tmp_path, show_progress=False)
    assert (tmp_path / "oac_hessians.safetensors").exists()
    summed = []
    monkeypatch.setattr(oac._Accumulator, "add", lambda self, g: summed.append(g))  # no new gradients may come
    resumed = tiny_llama(layers=3)
    resumed_q = quantize_model(resumed, recipe, calib_ids, progress_dir=tmp_path, resume=True, show_progress=False)
    report = resumed_q.report
    assert report.resumed_blocks == 2 and not summed and report.hessian_pass["resumed_at"] == calib_ids.shape[0]
    assert report.total_seconds >= report.hessian_pass["seconds"] > 0  # the earlier run's pass is counted
    assert report.peak_memory_mb >= report.hessian_pass["peak_memory_mb"] > 0
    assert not (tmp_path / "oac_hessians.safetensors").exists()  # dropped once every block is stored
    for name, qw in full_q.weights.items():
        assert torch.equal(resumed_q.weights[name].codes, qw.codes), name

    again = quantize_model(tiny_llama(layers=3), recipe, calib_ids, progress_dir=tmp_path, resume=True,
                           show_progress=False).report  # every block stored (killed while evaluating)
    assert again.resumed_blocks == 3 and again.hessian_pass == report.hessian_pass  # the pass is still reported
    assert again.total_seconds >= again.hessian_pass["seconds"]


def test_bfloat16_gradients_give_the_float32_hessian_to_bf16_precision(calib_ids):
    """A model run in bf16 (as on a GPU) back-propagates bf16 gradients; the products and the sum
    stay in float32, so the Hessian differs only by bf16's rounding of activations."""
    model = tiny_llama()
    layers = _layers(model)
    ref, _ = output_adaptive_hessians(model, layers, calib_ids, show_progress=False)
    half = tiny_llama().to(torch.bfloat16)
    got, _ = output_adaptive_hessians(half, _layers(half), calib_ids, show_progress=False)
    for n in layers:
        assert got[n].dtype == torch.float32
        rel = float((got[n] - ref[n]).norm() / ref[n].norm())
        assert rel < 0.03, (n, rel)  # measured 0.4–0.7 %: bf16 keeps 8 bits of mantissa


def test_float32_sums_match_the_float64_reference(calib_ids):
    """A float32 model accumulates in float32 (half of float64's memory); over the calibration
    sequences that costs no more than float32's own rounding."""
    model = tiny_llama()
    layers = _layers(model)
    got, _ = output_adaptive_hessians(model, layers, calib_ids, show_progress=False)
    ref = _reference(model.double(), _layers(model), calib_ids)
    for n in layers:
        assert got[n].dtype == torch.float32
        rel = float((got[n].double() - ref[n]).norm() / ref[n].norm())
        assert rel < 1e-5, (n, rel)


def test_layers_split_into_contiguous_runs_of_about_equal_memory():
    model = tiny_llama(layers=3)
    layers = _layers(model)
    sizes = {n: m.in_features**2 for n, m in layers.items()}
    for parts in (1, 2, 3, 5, 100):
        runs = split_layers(layers, parts)
        assert [n for run in runs for n in run] == list(layers)  # every layer once, in order
        assert len(runs) == min(parts, len(layers))
        share = sum(sizes.values()) / parts
        assert all(sum(sizes[n] for n in run) <= share + max(sizes.values()) for run in runs)


def test_split_passes_give_the_one_pass_hessians(calib_ids):
    import gc

    model = tiny_llama().double()
    layers = _layers(model)
    whole, _ = output_adaptive_hessians(model, layers, calib_ids, show_progress=False)
    got, cost = output_adaptive_hessians(model, layers, calib_ids, show_progress=False, passes=3)
    assert cost["passes"] == 3 and cost["seconds"] > 0
    scratch = next(iter(got.files.values()))[0].parent  # no state given: a scratch directory of its own
    assert isinstance(got, StoredHessians) and len(got) == len(layers)
    for n in layers:
        torch.testing.assert_close(got.pop(n), whole[n], rtol=1e-12, atol=0)
    del got
    gc.collect()
    assert not scratch.exists()  # removed with the object
    with pytest.raises(ValueError, match="positive integer"):
        output_adaptive_hessians(model, layers, calib_ids, show_progress=False, passes=0)


def test_an_interrupted_split_pass_keeps_the_passes_it_finished(calib_ids, tmp_path):
    model = tiny_llama().double()
    layers = _layers(model)
    whole, _ = output_adaptive_hessians(model, layers, calib_ids, show_progress=False)
    n, state, calls = calib_ids.shape[0], tmp_path / "oac.safetensors", []

    def stop_in_second_pass(_module, _args):
        calls.append(1)
        if len(calls) == n + 3:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(stop_in_second_pass)
    with pytest.raises(KeyboardInterrupt):
        output_adaptive_hessians(model, layers, calib_ids, show_progress=False, state=state, save_every=2, passes=2)
    calls.clear()
    got, cost = output_adaptive_hessians(model, layers, calib_ids, show_progress=False, state=state, save_every=2,
                                         passes=2)
    handle.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oac_0.safetensors", "oac_1.safetensors"]
    assert cost["resumed_at"] == n + 2 and len(calls) == n - 2  # only the second pass's unsummed sequences
    assert isinstance(got, StoredHessians) and len(got) == len(layers)  # read from the files, layer by layer
    for name in layers:
        torch.testing.assert_close(got.pop(name), whole[name], rtol=1e-12, atol=0)
    assert len(got) == 0


def test_a_split_gradient_pass_gives_the_same_quantized_model(calib_ids, tmp_path, monkeypatch):
    """Also after an interruption: a resumed run splits the layers as the first run did, so every
    pass finds its file and no gradient is computed again."""
    from conftest import interrupt_rounding_in_block

    from lowbit.hessians import output_adaptive as oac

    recipe = Recipe(name="oac", weights=WeightSpec(method="gptq", bits=2, group_size=16),
                    hessian=HessianSpec(source="output_adaptive"), calibration=CalibrationSpec(nsamples=6, seqlen=32))
    one = tiny_llama(layers=3)
    one_q = quantize_model(one, recipe, calib_ids, show_progress=False)
    recipe = recipe.with_overrides("hessian.passes=3")
    split = tiny_llama(layers=3)
    split_q = quantize_model(split, recipe, calib_ids, progress_dir=tmp_path / "a", show_progress=False)
    report = split_q.report
    assert report.hessian_pass["passes"] == 3 and not list((tmp_path / "a").glob("oac_*"))  # dropped once done
    with monkeypatch.context() as m:
        interrupt_rounding_in_block(m, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(tiny_llama(layers=3), recipe, calib_ids, progress_dir=tmp_path / "b", show_progress=False)
    summed = []
    monkeypatch.setattr(oac._Accumulator, "add", lambda self, g: summed.append(g))  # no new gradients may come
    resumed = tiny_llama(layers=3)
    resumed_q = quantize_model(resumed, recipe, calib_ids, progress_dir=tmp_path / "b", resume=True,
                               show_progress=False)
    report = resumed_q.report
    assert report.resumed_blocks == 2 and not summed
    for name, qw in one_q.weights.items():
        assert torch.equal(split_q.weights[name].codes, qw.codes), name
        assert torch.equal(resumed_q.weights[name].codes, qw.codes), name
