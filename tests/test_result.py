"""What quantizing returns: one typed value (lowbit.pipeline.Quantized), nothing left on the model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import tiny_llama

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.load import load_quantized
from lowbit.models.source import set_source
from lowbit.pipeline import Quantized
from lowbit.runtime.build import packed_layers

RECIPES = ["gptq-w4g128", "quip-w2", "aser-w4a8", "rptq-w4a8"]


def _small(name: str) -> lowbit.recipes.Recipe:
    recipe = lowbit.recipes.get(name).with_overrides("calibration.nsamples=4", "calibration.seqlen=32")
    return recipe.with_overrides("weights.group_size=32") if recipe.weights.group_size else recipe


@pytest.mark.parametrize("name", RECIPES)
def test_quantize_returns_a_typed_value_and_leaves_no_attributes(name, calib_ids, tmp_path):
    model = tiny_llama()
    set_source(model, "tiny-llama")
    attributes = set(vars(model))
    result = lowbit.quantize(model, _small(name), calib_ids, show_progress=False)
    assert isinstance(result, Quantized) and result.model is model
    assert result.recipe == _small(name) and result.source == "tiny-llama"
    assert set(vars(model)) == attributes  # no lowbit_* attribute (nor any other) was added
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.recipe = None
    assert len(result.weights) == 14 and result.report.layers  # 2 blocks × 7 linears
    assert 0 < result.effective_bits < 16  # low-rank branches are large beside a 64-wide layer
    lowbit.save(result, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "lowbit_config.json").read_text())
    assert meta["base_model"] == "tiny-llama" and meta["recipe"] == result.recipe.to_dict()


@pytest.mark.parametrize("name", RECIPES)
def test_packed_is_the_model_a_checkpoint_loads(name, calib_ids, tmp_path):
    """``.packed()`` puts the runtime modules in place, in memory: the same logits as saving and loading."""
    result = lowbit.quantize(tiny_llama(), _small(name), calib_ids, show_progress=False)
    lowbit.save(result, tmp_path / "ckpt")
    loaded, _ = load_quantized(tmp_path / "ckpt")
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        fake = result.model(ids).logits
        packed = result.packed()
        assert set(packed_layers(packed)) == set(result.weights)
        torch.testing.assert_close(packed(ids).logits, loaded(ids).logits, rtol=0, atol=0)
        # the rounded float weights and the packed layers compute the same function (QuIP: to float rounding)
        torch.testing.assert_close(packed(ids).logits, fake, rtol=1e-4, atol=1e-4)


def test_a_loaded_checkpoint_saves_with_its_recipe_and_base(calib_ids, tmp_path):
    model = tiny_llama()
    set_source(model, "tiny-llama")
    result = lowbit.quantize(model, _small("gptq-w4g128"), calib_ids, show_progress=False)
    lowbit.save(result, tmp_path / "a")
    loaded, _ = load_quantized(tmp_path / "a")
    assert loaded.config.name_or_path == str(tmp_path / "a")  # where it came from, where transformers keeps it
    lowbit.save(loaded, tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "lowbit_config.json").read_text()) for d in "ab")
    assert b["base_model"] == a["base_model"] == "tiny-llama" and b["recipe"] == a["recipe"]


def test_saving_a_float_model_is_one_line():
    with pytest.raises(LowbitError, match="pass what lowbit.quantize returned"):
        lowbit.save(tiny_llama(), "never-written")
