"""BiLLM-style binarization (OAC's 1-bit base): the parts' scales against float64 means, GPTQ's
feedback lowering the output error, packed storage = counted bits, checkpoint and resume."""

import pytest
import torch
from conftest import full_and_resumed, tiny_llama
from test_gptq import _problem

import lowbit
from lowbit.errors import LowbitError
from lowbit.format.codec import storage_bits
from lowbit.recipes import Recipe
from lowbit.rounding import proxy_loss
from lowbit.rounding.binary import CONC, SAL1, SAL2, SPARSE, billm_quantize
from lowbit.runtime import BinaryLinear, packed_module


def _spiky(rows=32, cols=96, seed=0):
    w, h = _problem(rows=rows, cols=cols, seed=seed)
    w[:, [3, 40]] *= 8  # a few salient columns
    return w, h


def test_block_scales_are_the_parts_mean_magnitudes():
    """Identity Hessian: no feedback, every block binarized as it is; each α is a float64 mean."""
    w, _ = _spiky()
    bw = billm_quantize(w, torch.eye(w.shape[1], dtype=torch.float64), blocksize=48, damp=0.0)
    a = bw.alphas.double()
    for b in range(2):
        cols = slice(48 * b, 48 * (b + 1))
        blk, sal, split = w[:, cols], bw.salient[cols], bw.split[:, cols]
        assert sal.sum() >= 2 if b == 0 else True  # the two loud columns are found
        if sal.any():
            ws = blk[:, sal]
            a1 = ws.abs().mean(1)
            a2 = (ws - a1[:, None] * torch.where(ws >= 0, 1.0, -1.0).double()).abs().mean(1)
            torch.testing.assert_close(a[:, b, SAL1], a1, rtol=1e-3, atol=1e-4)  # float16 storage
            torch.testing.assert_close(a[:, b, SAL2], a2, rtol=1e-3, atol=1e-4)
        rest = blk[:, ~sal].abs()
        sp = split[:, ~sal]
        conc = (rest * ~sp).sum(1) / (~sp).sum(1).clamp(min=1)
        sparse = (rest * sp).sum(1) / sp.sum(1).clamp(min=1)
        torch.testing.assert_close(a[:, b, CONC], conc, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(a[:, b, SPARSE], sparse, rtol=1e-3, atol=1e-4)
        # the split is by magnitude: every sparse weight is larger than every concentrated one
        assert rest[sp].min() > rest[~sp].max()
    q = bw.weight().double()
    assert torch.equal(torch.sign(q[:, ~bw.salient]), torch.where(w[:, ~bw.salient] >= 0, 1.0, -1.0).double())


def test_feedback_and_salient_columns_lower_the_output_error():
    w, h = _spiky(seed=1)
    with_feedback = billm_quantize(w, h, blocksize=32)
    no_feedback = billm_quantize(w, torch.eye(w.shape[1], dtype=torch.float64), blocksize=32, damp=0.0)
    naive = w.abs().mean(1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0).double()  # one α·sign(w) per row
    losses = [proxy_loss(q - w, h) for q in (with_feedback.weight().double(), no_feedback.weight().double(), naive)]
    assert losses[0] < losses[1] < losses[2]


def test_packed_layer_holds_the_counted_bits():
    w, h = _spiky(rows=40, cols=200, seed=2)
    bw = billm_quantize(w, h, blocksize=64)
    layer = packed_module(bw, None)
    assert torch.equal(layer.binary().weight(), bw.weight())
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert stored * 8 == storage_bits(bw)  # the count is the declared tensors' bytes
    rows, cols = w.shape
    # signs, residual or split bit per weight, salient bitmap, 4 float16 α per row and block (4 blocks of ≤ 64
    # columns); each of the 4 bit streams pads its last byte
    assert storage_bits(bw) == pytest.approx(2 * rows * cols + cols + rows * 4 * 4 * 16, abs=4 * 7)


@pytest.mark.parametrize("preset", ["billm-w1", "oac-w1"])
def test_presets_save_and_reload(preset, tmp_path, calib_ids):
    model = tiny_llama()
    model_q = lowbit.quantize(model, lowbit.recipes.get(preset), calib_ids, show_progress=False)
    report = model_q.report
    assert all(r.bits == 1 for r in report.layers)
    lowbit.save(model_q, tmp_path, report=report)
    reloaded, _ = lowbit.load_model(tmp_path)
    assert sum(isinstance(m, BinaryLinear) for m in reloaded.modules()) == len(model_q.weights)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(calib_ids).logits, model(calib_ids).logits, atol=1e-5, rtol=0)


def test_resume_gives_the_same_binary_model(tmp_path, calib_ids, monkeypatch):
    full, resumed = full_and_resumed(lowbit.recipes.get("billm-w1"), calib_ids, tmp_path, monkeypatch)
    with torch.no_grad():
        assert torch.equal(full.model(calib_ids[:2]).logits, resumed.model(calib_ids[:2]).logits)


@pytest.mark.parametrize("data,message", [
    ({"weights": {"method": "billm", "bits": 2}}, "billm binarizes"),
    ({"weights": {"method": "billm", "bits": 1, "group_size": 64}}, "billm binarizes"),
    ({"weights": {"method": "gptq", "bits": 1}}, "from 2 to 8 \\(1 with method billm\\)"),
    ({"weights": {"method": "billm", "bits": 1}, "lowrank": {"rank": 4}}, "no lowrank branch"),
])
def test_bad_binary_settings(data, message):
    with pytest.raises(LowbitError, match=message):
        Recipe.from_dict({"name": "x", **data}).validate()
