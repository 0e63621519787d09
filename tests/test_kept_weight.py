"""Keeping packed layers' dequantized weights (``lowbit eval --keep-dequantized``) changes time, not numbers."""

import pytest
import torch
from conftest import tiny_llama

import lowbit
from lowbit.runtime import KeptWeight, keep_dequantized


@pytest.mark.parametrize("preset", ["gptq-w3g128", "spqr-w2", "billm-w1", "quip-w2", "aser-w4a8"])
def test_kept_weights_give_the_same_logits_bit_for_bit(preset, tmp_path, calib_ids):
    model = tiny_llama()
    model_q = lowbit.quantize(model, lowbit.recipes.get(preset), calib_ids, show_progress=False)
    report = model_q.report
    lowbit.save(model_q, tmp_path, report=report)
    reloaded, _ = lowbit.load_model(tmp_path)
    layers = [m for m in reloaded.modules() if isinstance(m, KeptWeight)]
    assert layers and len(layers) == len(model_q.weights)  # QuIP's and ASER's wrappers hold one each
    with torch.no_grad():
        rebuilt = reloaded(calib_ids).logits
        assert keep_dequantized(reloaded) == len(layers)
        first = reloaded(calib_ids).logits
        kept = [m._kept for m in layers]
        second = reloaded(calib_ids).logits
    assert torch.equal(first, rebuilt) and torch.equal(second, rebuilt)  # the same weight tensors, exactly
    assert all(k is not None and m._kept is k for m, k in zip(layers, kept))  # the second call rebuilt nothing
    assert all(k.shape == (m.out_features, m.in_features) for m, k in zip(layers, kept))
    keep_dequantized(reloaded, keep=False)
    with torch.no_grad():
        assert torch.equal(reloaded(calib_ids).logits, rebuilt)
    assert all(m._kept is None for m in layers)  # switched off: the memory is given back
    assert "_kept" not in str(reloaded.state_dict().keys())  # never part of a checkpoint


def test_a_kept_weight_follows_the_activation_dtype(tmp_path, calib_ids):
    model = tiny_llama()
    model_q = lowbit.quantize(model, lowbit.recipes.get("gptq-w4g128"), calib_ids, show_progress=False)
    report = model_q.report
    lowbit.save(model_q, tmp_path, report=report)
    reloaded, _ = lowbit.load_model(tmp_path)
    keep_dequantized(reloaded)
    with torch.no_grad():
        reloaded(calib_ids)
        reloaded.to(torch.bfloat16)
        kept_bf16 = reloaded(calib_ids).logits
        keep_dequantized(reloaded, keep=False)
        rebuilt_bf16 = reloaded(calib_ids).logits
    assert kept_bf16.dtype == torch.bfloat16 and torch.equal(kept_bf16, rebuilt_bf16)
