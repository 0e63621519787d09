"""The quantized-layer format (lowbit.format): every kind of layer is declared once, and the codec, the
runtime modules, the checkpoint, the resume files and the bit count all agree with that declaration."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from lowbit.errors import LowbitError
from lowbit.format import LayerSpec
from lowbit.format.codec import DTYPES, decode, encode, spec_of, storage_bits
from lowbit.methods.weights import round_weight
from lowbit.pipeline.resume import ProgressStore
from lowbit.recipes import LowRankSpec, TransformSpec, WeightSpec
from lowbit.runtime import packed_module

ROWS, COLS = 48, 80  # 80 = 3 groups of 24 + a last group of 8


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=g)
    x = torch.randn(4 * COLS, COLS, generator=g) * torch.linspace(0.2, 3, COLS)
    return w, (x.T @ x / x.shape[0]).double()


KINDS = {
    "rtn-w4g16": (WeightSpec(method="rtn", bits=4, group_size=16), None, None),
    "rtn-w3-channel": (WeightSpec(method="rtn", bits=3), None, None),
    "gptq-w4g24-act-order-partial": (WeightSpec(bits=4, group_size=24, act_order=True), None, None),
    "spqr-outliers-stats": (WeightSpec(bits=2, group_size=16, act_order=True, outlier_fraction=0.02, stats_bits=3),
                            None, None),
    "quip-rms": (WeightSpec(method="ldlq", bits=2, grid="rms"), TransformSpec(incoherence="hadamard"), None),
    "quip-minmax-lowrank": (WeightSpec(method="ldlq", bits=3, group_size=16), TransformSpec(incoherence="kron"),
                            LowRankSpec(rank=4)),
    "gptq-lowrank": (WeightSpec(bits=4, group_size=16), None, LowRankSpec(rank=6)),
    "billm": (WeightSpec(method="billm", bits=1, blocksize=32), None, None),
}


@pytest.fixture(params=list(KINDS), scope="module")
def layer(request):
    w, h = _problem()
    spec, transform, lowrank = KINDS[request.param]
    return round_weight(w, h, spec, "layer", transform, lowrank)


def _fields(qw) -> dict[str, torch.Tensor]:
    names = (("signs", "residual", "split", "salient", "alphas") if qw.bits == 1
             else ("codes", "scale", "zero", "g_idx"))
    return {n: getattr(qw, n) for n in names}


def test_encode_gives_the_declared_tensors_and_decode_gives_the_weight_back(layer):
    spec = spec_of(layer)
    tensors = encode(spec, layer)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == {
        d.key: (d.shape, DTYPES[d.dtype]) for d in spec.tensors()}
    assert storage_bits(layer) == 8 * sum(v.numel() * v.element_size() for v in tensors.values())
    back = decode(spec, tensors)
    for name, value in _fields(layer).items():  # exact: every stored number was rounded as it is stored
        assert torch.equal(getattr(back, name).to(value.dtype), value), name
    assert torch.equal(back.weight(), layer.weight())
    assert spec_of(back) == spec


def test_the_runtime_module_holds_the_declared_tensors(layer):
    spec = spec_of(layer)
    bias = torch.randn(ROWS)
    module = packed_module(layer, bias)
    state = module.state_dict()
    assert torch.equal(state.pop(spec.bias_key), bias)
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        d.key: (d.shape, DTYPES[d.dtype]) for d in spec.tensors()}
    assert module.spec == spec
    x = torch.randn(3, COLS)
    torch.testing.assert_close(module(x), x @ layer.weight().T + bias, rtol=1e-5, atol=1e-5)


def test_attributes_survive_json(layer):
    spec = spec_of(layer)
    info = json.loads(json.dumps(spec.to_json()))
    assert LayerSpec.from_json(info) == spec
    old = {k: v for k, v in info.items() if k != "groups"}  # format 3 tables: groups come from the tensors
    assert LayerSpec.from_json(old, spec.groups) == spec
    with pytest.raises(KeyError):
        LayerSpec.from_json(old)


def test_bits_against_an_independent_count():
    """A W4g16 layer with integer zeros and natural groups: codes, float16 scales, 4-bit zeros, nothing else."""
    w, _ = _problem()
    qw = round_weight(w, None, WeightSpec(method="rtn", bits=4, group_size=16), "layer")
    groups = COLS // 16
    assert storage_bits(qw) == ROWS * COLS * 4 + ROWS * groups * (16 + 4)
    act = round_weight(w, _problem()[1], WeightSpec(bits=4, group_size=16, act_order=True), "layer")
    assert storage_bits(act) == storage_bits(qw) + 32 * COLS  # act-order: one int32 group index per column


def test_group_size_is_the_grids_even_where_one_group_covers_the_row():
    """A 128 group on 80 columns is one group per row: the spec says 128, as the recipe did."""
    w, _ = _problem()
    qw = round_weight(w, None, WeightSpec(method="rtn", bits=4, group_size=128), "layer")
    assert spec_of(qw).group_size == 128 and spec_of(qw).groups == 1
    bare = type(qw)(qw.codes, qw.scale, qw.zero, qw.g_idx, qw.bits)  # built without it: none, for one group
    assert spec_of(bare).group_size is None and spec_of(bare).storage_bits() == spec_of(qw).storage_bits()


def test_a_format_3_checkpoint_loads(tmp_path, calib_ids):
    """Tables written before layers recorded their groups read them from the scales' shape."""
    import lowbit
    from lowbit.pipeline import quantize_model

    model = tiny_llama()
    model_q = quantize_model(model, lowbit.recipes.get("gptq-w4g128").with_overrides("weights.group_size=16",
                                                                            "calibration.nsamples=4",
                                                                            "calibration.seqlen=32"),
                   calib_ids, show_progress=False)
    lowbit.save(model_q, tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "lowbit_config.json").read_text())
    assert meta["format_version"] == 4 and all("groups" in info for info in meta["layers"].values())
    meta["format_version"] = 3
    for info in meta["layers"].values():
        del info["groups"]
    (tmp_path / "new" / "lowbit_config.json").write_text(json.dumps(meta))
    loaded, _ = lowbit.load_model(str(tmp_path / "new"))
    ids = calib_ids[:1, :16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_resume_state_of_another_version_is_one_line(tmp_path):
    store = ProgressStore(tmp_path, "fp", resume=False)
    manifest = json.loads(store.manifest.read_text())
    store.manifest.write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(LowbitError, match="another lowbit version.*rerun without --resume"):
        ProgressStore(tmp_path, "fp", resume=True)
