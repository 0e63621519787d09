"""CPU kernel back-ends (PyTorch's int4 / int8 weight-only matmuls) against the reference path, which
multiplies by the dequantized float weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

import lowbit
from lowbit.backends import int4_group
from lowbit.methods.weights import round_weight
from lowbit.recipes import WeightSpec
from lowbit.runtime import QuantLinear, packed_module
from lowbit.runtime.build import use_kernels
from lowbit.runtime.kernels import Int4Kernel, Int8Kernel, available, kernel_for

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch has no CPU int4/int8 weight-only kernels")


def _layer(out_f: int, in_f: int, seed: int = 0, **spec) -> QuantLinear:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    qw = round_weight(w, None, WeightSpec(method="rtn", **spec), name="test")
    bias = torch.randn(out_f, generator=torch.Generator().manual_seed(seed + 1))
    return packed_module(qw, bias)


def _both(layer: QuantLinear, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's product (plus bias) and the reference's, for 14 rows of random inputs."""
    x = torch.randn(14, layer.in_features, generator=torch.Generator().manual_seed(9)).to(dtype)
    layer.kernel = kernel_for(layer.quantized(), layer.group_size)
    with torch.no_grad():
        ref = F.linear(x.float(), layer.dense_weight(), layer.bias).to(dtype)
        got = layer.kernel(x)
        return (got + layer.bias.to(dtype) if layer.bias is not None else got), ref


@pytest.mark.parametrize("shape,group", [
    ((64, 256), 256), ((64, 256), 128), ((48, 192), 64), ((32, 96), 32),
    ((64, 576), 128),  # SmolLM2's width: a smaller last group of 64, served by kernel groups of 64
    ((32, 96), 64),    # last group 32
    ((64, 576), None),  # per channel: one group per row, repeated over kernel groups
])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 3, 2])  # 2- and 3-bit codes: 4-bit codes with the top values unused
def test_int4_kernel_equals_the_reference(shape, group, symmetric, bits):
    layer = _layer(*shape, bits=bits, group_size=group, symmetric=symmetric)
    assert layer.kernel is None
    got, ref = _both(layer)
    assert isinstance(layer.kernel, Int4Kernel)
    # float32 sums in another order: a few units of float32 rounding of the largest output
    torch.testing.assert_close(got, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128), (2, 64), (8, None)])
def test_kernels_in_bfloat16_agree_to_its_rounding(bits, group):
    layer = _layer(64, 256, bits=bits, group_size=group)
    got, ref = _both(layer, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: products and sums rounded there, a few 2^-8 of the largest output
    torch.testing.assert_close(got.float(), ref.float(), atol=0.02 * float(ref.abs().max()), rtol=0.02)


def test_forward_uses_the_kernel_for_few_bfloat16_rows_only(monkeypatch):
    """Fast for bfloat16 and few rows (decoding); the reference path for float32 and long prompts."""
    layer = _layer(64, 256, bits=4, group_size=128)
    layer.kernel = kernel_for(layer.quantized(), 128)
    calls = []
    real = layer.dense_weight
    monkeypatch.setattr(layer, "dense_weight", lambda: calls.append("reference") or real())
    with torch.no_grad():
        layer(torch.randn(1, 3, 256, dtype=torch.bfloat16))
        assert calls == []
        layer(torch.randn(1, 3, 256))
        assert calls == ["reference"]
        layer(torch.randn(1, layer.kernel.max_rows + 1, 256, dtype=torch.bfloat16))
        assert calls == ["reference"] * 2


@pytest.mark.parametrize("symmetric", [False, True])
def test_int8_kernel_equals_the_reference(symmetric):
    layer = _layer(64, 192, bits=8, group_size=None, symmetric=symmetric)
    got, ref = _both(layer)
    assert isinstance(layer.kernel, Int8Kernel)
    # one more float32 sum (the zero-point term, times the sum of the inputs)
    torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("case", ["5-bit", "rows-not-16", "group-16", "8-bit-grouped"])
def test_layers_no_kernel_takes_keep_the_reference_path(case):
    spec = {"5-bit": dict(bits=5, group_size=64),
            "rows-not-16": dict(bits=4, group_size=64), "group-16": dict(bits=4, group_size=16),
            "8-bit-grouped": dict(bits=8, group_size=64)}[case]
    rows = 40 if case == "rows-not-16" else 64
    layer = _layer(rows, 128, **spec)
    assert kernel_for(layer.quantized(), layer.group_size) is None


@pytest.mark.parametrize("in_f,group", [(256, 64), (96, 64), (576, 128)])  # with a smaller last group too
def test_act_order_layers_take_the_kernel_with_sorted_columns(in_f, group):
    """GPTQ's act-order: groups of consecutive columns in its own order (``g_idx`` not ascending)."""
    from lowbit.grids import natural_group_index

    layer = _layer(64, in_f, bits=4, group_size=group)
    qw = layer.quantized()
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(3))  # column j of W is column perm[j] of GPTQ's
    qw = type(qw)(qw.codes[:, perm.argsort()], qw.scale, qw.zero, natural_group_index(in_f, group)[perm.argsort()],
                  qw.bits)
    layer = packed_module(qw, None)
    assert layer.g_idx is not None  # saved as act-order
    got, ref = _both(layer)
    assert isinstance(layer.kernel, Int4Kernel) and layer.kernel.order is not None
    torch.testing.assert_close(got, ref, atol=1e-6 * float(ref.abs().max()), rtol=1e-5)


def test_scrambled_groups_keep_the_reference_path():
    """A g_idx whose groups are not of the grid's sizes once sorted is not act-order's: no kernel."""
    layer = _layer(64, 128, bits=4, group_size=64)
    qw = layer.quantized()
    g_idx = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(88, dtype=torch.long)])
    qw = type(qw)(qw.codes, qw.scale, qw.zero, g_idx, qw.bits)
    assert kernel_for(qw, 64) is None


def test_int4_group_is_the_widest_that_divides_width_and_group():
    assert int4_group(576, 64, 128) == 64 and int4_group(1536, 576, 128) == 128 and int4_group(576, 64, None) == 64
    assert int4_group(4096, 4096, None) == 256 and int4_group(96, 64, 16) is None and int4_group(256, 40, 64) is None


def test_a_reloaded_checkpoint_with_kernels_gives_the_reference_logits(tmp_path, calib_ids):
    model = tiny_llama()
    recipe = lowbit.recipes.apply_overrides(lowbit.recipes.get("gptq-w4g128"), ["weights.group_size=32"])
    assert recipe.weights.act_order  # GPTQ's groups in its own column order: the kernels sort them back
    model_q = lowbit.quantize(model, recipe, calib_ids, show_progress=False)
    lowbit.save(model_q, tmp_path / "ckpt")
    reloaded, _ = lowbit.load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = reloaded(calib_ids).logits.float()
        chosen = use_kernels(reloaded)
        got = reloaded(calib_ids).logits.float()
    assert set(chosen.values()) == {"int4"} and len(chosen) == 7 * 2
    assert not torch.equal(got, ref)  # the kernels ran (they round in another order)
    torch.testing.assert_close(got, ref, atol=0.03 * float(ref.abs().max()), rtol=0.03)  # bfloat16 rounding
    assert set(use_kernels(reloaded, enable=False).values()) == {"reference"}


def test_eval_with_kernels_gives_the_reference_perplexity(tmp_path):
    """``lowbit eval --kernels`` on a user's checkpoint: bfloat16 activations and kernels give the float32
    reference's perplexity to within bfloat16 rounding (1 %), in a window log of their own."""
    import json
    import subprocess
    import sys

    from hostile_setup import write_tiny_model

    write_tiny_model(tmp_path / "tiny")

    def cli(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=600,
                           check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    cli("quantize", str(tmp_path / "tiny"), "--recipe", "rtn-w4g128", "--set", "weights.group_size=32",
        "--out", str(tmp_path / "ckpt"))
    args = ("eval", str(tmp_path / "ckpt"), "--ppl", "wikitext2", "--windows", "2", "--seqlen", "256", "--json")
    ref = json.loads(cli(*args).stdout)["perplexity"]["wikitext2"]
    fast = cli(*args, "--kernels")
    assert "back-ends: int4 14 layers" in fast.stderr
    got = json.loads(fast.stdout)["perplexity"]["wikitext2"]
    assert got["tokens"] == ref["tokens"] and abs(got["ppl"] - ref["ppl"]) <= 0.01 * ref["ppl"]
    logs = sorted(p.name for p in (tmp_path / "ckpt" / "eval-log").iterdir())
    assert any(".kernels." in n for n in logs) and any(".kernels." not in n for n in logs)


@pytest.mark.parametrize("recipe,sets", [("rtn-w4", ["weights.group_size=32"]), ("rtn-w3", []),
                                         ("rtn-w4", ["weights.bits=8"]), ("gptq-w4g128", ["weights.group_size=32"]),
                                         ("spqr-w2", []), ("quip-w4", [])])
def test_inspect_names_the_backend_the_kernels_take_and_counts_every_parameter(recipe, sets, tmp_path, calib_ids):
    """``lowbit inspect`` decides each layer's CPU back-end from the files alone (no torch); loading with kernels
    builds them: the two must agree. Its parameter count is the float model's (tied embedding once)."""
    from lowbit.export.inspect import inspect_checkpoint
    from lowbit.recipes import apply_overrides

    model = tiny_llama()
    n_params = sum(p.numel() for p in model.parameters())
    model_q = lowbit.quantize(model, apply_overrides(lowbit.recipes.get(recipe), sets), calib_ids, show_progress=False)
    lowbit.save(model_q, tmp_path / "c")
    summary = inspect_checkpoint(tmp_path / "c")
    loaded, _ = lowbit.load_model(tmp_path / "c")
    built = use_kernels(loaded)
    for layer in summary.layers:
        inner = [n for n in built if n == layer.name or n.startswith(f"{layer.name}.")]
        want = built[inner[0]] if inner and available() else "reference"
        assert layer.backend == (want if available() else layer.backend), layer.name
    assert summary.parameters == n_params
    assert f"{8 * summary.total_bytes / n_params:.2f} bits per parameter" in summary.table()
