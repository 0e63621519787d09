"""OAC's Hessians shared through a cache directory: one gradient pass for every recipe on the same
model and calibration set, the same codes as a run without the cache, its own key for anything else."""

import pytest
import torch
from conftest import tiny_llama

from lowbit.hessians import output_adaptive as oac
from lowbit.hessians.cache import HessianCache
from lowbit.models import block_linears, find_blocks
from lowbit.pipeline import quantize_model
from lowbit.recipes import CalibrationSpec, HessianSpec, Recipe, TransformSpec, WeightSpec


def _recipe(name: str, method: str = "gptq", transform: str = "none", passes: int = 1) -> Recipe:
    return Recipe(name=name, weights=WeightSpec(method=method, bits=2, group_size=16 if transform == "none" else None,
                                                act_order=True),
                  transform=TransformSpec(incoherence=transform),
                  hessian=HessianSpec(source="output_adaptive", passes=passes),
                  calibration=CalibrationSpec(nsamples=6, seqlen=32))


def _layers(model):
    path, blocks = find_blocks(model)
    return {f"{path}.{b}.{n}": m for b, block in enumerate(blocks) for n, m in block_linears(block).items()}


def _count_gradients(monkeypatch) -> list:
    """Every per-sequence gradient product summed from now on (the real ``add`` still runs)."""
    seen, add = [], oac._Accumulator.add

    def counted(self, grad_out):
        seen.append(1)
        add(self, grad_out)

    monkeypatch.setattr(oac._Accumulator, "add", counted)
    return seen


@pytest.mark.parametrize("passes", [1, 2])
def test_a_second_recipe_reads_the_first_ones_hessians_and_gets_the_same_codes(passes, calib_ids, tmp_path,
                                                                                monkeypatch):
    cache = tmp_path / "hessians"
    first = tiny_llama()
    first_q = quantize_model(first, _recipe("a", passes=passes), calib_ids, show_progress=False, hessian_cache=cache)
    r1 = first_q.report
    assert r1.hessian_pass["seconds"] > 0 and "resumed_at" not in r1.hessian_pass and not r1.hessian_pass["reused"]
    assert r1.hessian_pass["cache"].startswith(str(cache))

    second = _recipe("b", method="ldlq", transform="hadamard", passes=passes)
    reference = tiny_llama()
    reference_q = quantize_model(reference, second, calib_ids, show_progress=False)  # no cache: its own gradient pass
    seen = _count_gradients(monkeypatch)
    cached = tiny_llama()
    cached_q = quantize_model(cached, second, calib_ids, show_progress=False, hessian_cache=cache)
    r2 = cached_q.report
    assert not seen  # no gradient was taken: the pass was read
    assert r2.hessian_pass["reused"] and r2.hessian_pass["resumed_at"] == calib_ids.shape[0] * passes
    assert 0 < r2.hessian_pass["seconds"] <= r1.hessian_pass["seconds"]  # the first run's pass, as it saved it
    for name, qw in reference_q.weights.items():
        assert torch.equal(cached_q.weights[name].codes, qw.codes), name
    assert list(cache.glob("oac-*.safetensors"))  # kept for the next recipe, unlike a run's own progress


def test_an_interrupted_pass_in_the_cache_is_continued_by_the_next_recipe(calib_ids, tmp_path, monkeypatch):
    cache, calls = tmp_path / "hessians", []
    model = tiny_llama()

    def stop_at_fifth(_module, _args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(stop_at_fifth)
    with pytest.raises(KeyboardInterrupt):  # sums are saved every 8 sequences and at the end: none yet
        quantize_model(model, _recipe("a"), calib_ids, show_progress=False, hessian_cache=cache)
    handle.remove()
    # a pass that saved its sums partway (as every 8 sequences on a long run) is continued, not redone
    layers = _layers(model)
    key = HessianCache(cache).key(model, layers, calib_ids)
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        handle = model.register_forward_pre_hook(stop_at_fifth)
        try:
            oac.output_adaptive_hessians(model, layers, calib_ids, show_progress=False,
                                         state=HessianCache(cache).state(key), save_every=2)
        finally:
            handle.remove()
    seen = _count_gradients(monkeypatch)
    resumed = tiny_llama()
    resumed_q = quantize_model(resumed, _recipe("b"), calib_ids, show_progress=False, hessian_cache=cache)
    report = resumed_q.report
    assert report.hessian_pass["resumed_at"] == 4 and not report.hessian_pass["reused"]
    assert len(seen) == (calib_ids.shape[0] - 4) * len(layers)  # the two sequences left, every layer
    reference = tiny_llama()
    reference_q = quantize_model(reference, _recipe("b"), calib_ids, show_progress=False)
    for name, qw in reference_q.weights.items():
        assert torch.equal(resumed_q.weights[name].codes, qw.codes), name


def test_another_calibration_set_or_model_gets_its_own_key(calib_ids):
    cache = HessianCache("unused")
    model = tiny_llama()
    layers = _layers(model)
    key = cache.key(model, layers, calib_ids)
    assert cache.key(tiny_llama(), _layers(tiny_llama()), calib_ids) == key  # the same weights, rebuilt
    assert cache.key(model, layers, calib_ids[:5]) != key
    assert cache.key(model, layers, torch.flip(calib_ids, dims=[0])) != key
    assert cache.key(tiny_llama(seed=1), layers, calib_ids) != key
    assert cache.key(model, dict(list(layers.items())[:-1]), calib_ids) != key
    edited = tiny_llama()
    with torch.no_grad():
        next(edited.parameters()).view(-1)[0] += 1.0  # a sampled weight
    assert cache.key(edited, _layers(edited), calib_ids) != key
