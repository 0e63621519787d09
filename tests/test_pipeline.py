"""The block-by-block driver on tiny random Llama and OPT models."""


import pytest
import torch
from conftest import ARCHITECTURES, interrupt_rounding_in_block, tiny_llama

import lowbit
from lowbit.errors import ResumeMismatch
from lowbit.models import block_linears, find_blocks, keep_first_blocks
from lowbit.pipeline import engine, quantize_model
from lowbit.pipeline.capture import capture_block_inputs, run_block, sequential_groups
from lowbit.recipes import Recipe, WeightSpec


def _recipe(method="gptq", bits=4, group_size=16, act_order=True, **kw) -> Recipe:
    return Recipe(name=f"{method}-test", weights=WeightSpec(method=method, bits=bits, group_size=group_size,
                                                             act_order=act_order), **kw)


def test_true_sequential_groups_follow_execution_order(calib_ids):
    model = tiny_llama()
    _, blocks = find_blocks(model)
    inputs, kwargs = capture_block_inputs(model, blocks, calib_ids[:1])
    groups = sequential_groups(blocks[0], block_linears(blocks[0]), inputs, kwargs[0])
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]



def _block_output(model, block: int, ids: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = find_blocks(model)[1][block].register_forward_hook(
        lambda _m, _a, o: out.update(h=(o[0] if isinstance(o, tuple) else o).clone()))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    return out["h"]


@pytest.mark.parametrize("factory", ARCHITECTURES)
def test_first_blocks_run_as_in_the_whole_model(factory, calib_ids):
    """A model cut to its first blocks (the benchmarks' few-block runs) computes them bit for bit as
    the whole model does: Gemma's last kept block is a sliding-window one with its own mask."""
    model = factory(layers=4)
    whole = _block_output(model, 2, calib_ids)
    keep_first_blocks(model, 3)
    assert len(find_blocks(model)[1]) == model.config.num_hidden_layers == 3
    type(model.config)(**model.config.to_dict())  # the cut config reloads (Gemma checks its layer_types)
    torch.testing.assert_close(_block_output(model, 2, calib_ids), whole, atol=0, rtol=0)
    with pytest.raises(lowbit.LowbitError, match="cannot keep 4 of the 3"):
        keep_first_blocks(model, 4)


@pytest.mark.parametrize("factory", ARCHITECTURES)
def test_captured_inputs_reproduce_the_model(factory, calib_ids):
    """Replaying captured block-0 inputs (and each block's own kwargs) through all blocks gives the
    model's own last hidden state: what calibration sees is what the model computes."""
    model = factory()
    _, blocks = find_blocks(model)
    inputs, kwargs = capture_block_inputs(model, blocks, calib_ids)
    h = inputs
    for b, block in enumerate(blocks):
        h = run_block(block, h, kwargs[b])
    last = {}
    handle = blocks[-1].register_forward_hook(lambda _m, _a, out:
                                              last.update(h=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(calib_ids, use_cache=False)
    handle.remove()
    torch.testing.assert_close(h, last["h"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", ARCHITECTURES)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_block_linear_lands_on_its_grid(factory, method, calib_ids):
    model = factory()
    model_q = quantize_model(model, _recipe(method), calib_ids, show_progress=False)
    report = model_q.report
    blocks_path, blocks = find_blocks(model)
    names = {f"{blocks_path}.{b}.{n}" for b, blk in enumerate(blocks) for n in block_linears(blk)}
    assert set(model_q.weights) == names
    assert {r.name for r in report.layers} == names
    for name, qw in model_q.weights.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())
        assert int(qw.codes.max()) <= 15


def test_one_pass_mode_quantizes_everything_from_full_precision_inputs(calib_ids):
    """true_sequential=false: every layer's Hessian comes from the block's unquantized inputs."""
    seq, flat = tiny_llama(), tiny_llama()
    seq_q = quantize_model(seq, _recipe("gptq", bits=3), calib_ids, show_progress=False)
    rec = _recipe("gptq", bits=3).with_overrides("pipeline.true_sequential=false")
    flat_q = quantize_model(flat, rec, calib_ids, show_progress=False)
    q = "model.layers.0.self_attn.q_proj"  # first group: same inputs either way
    assert torch.equal(seq_q.weights[q].codes, flat_q.weights[q].codes)
    down = "model.layers.0.mlp.down_proj"  # later groups: inputs differ once q/k/v/o are quantized
    assert not torch.equal(seq_q.weights[down].codes, flat_q.weights[down].codes)


def test_reloaded_checkpoint_runs_in_bfloat16_with_biases(tmp_path, calib_ids):
    from conftest import tiny_opt

    model = tiny_opt()
    model_q = lowbit.quantize(model, _recipe("rtn"), show_progress=False)
    lowbit.save(model_q, tmp_path)
    reloaded, _ = lowbit.load_model(tmp_path, dtype=torch.bfloat16)
    with torch.no_grad():
        out = reloaded(calib_ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_gptq_beats_rtn_on_layer_output_error(calib_ids):
    calib = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(3))
    errs = {}
    for method in ("rtn", "gptq"):
        model = tiny_llama()
        quantize_model(model, _recipe(method, bits=3, group_size=None, act_order=False), calib, show_progress=False)
        ref = tiny_llama()
        with torch.no_grad():
            errs[method] = (model(calib).logits - ref(calib).logits).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


@pytest.mark.parametrize("factory", ARCHITECTURES)
def test_save_reload_gives_identical_logits(factory, tmp_path, calib_ids):
    from lowbit.runtime import QuantLinear

    model = factory()
    model_q = lowbit.quantize(model, _recipe("gptq", bits=3, group_size=24), calib_ids, show_progress=False)
    report = model_q.report
    lowbit.save(model_q, tmp_path / "ckpt", report=report)
    reloaded, tok = lowbit.load_model(tmp_path / "ckpt")
    assert tok is None  # saved without a tokenizer
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == len(model_q.weights)
    if model.config.tie_word_embeddings:
        assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight  # tie survives
    with torch.no_grad():
        # same codes, same float16 scales, same dequantization: equal up to float32 reassociation
        torch.testing.assert_close(reloaded(calib_ids).logits, model(calib_ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_checkpoint_size_is_bits_over_16_of_fp16(tmp_path, calib_ids, bits):
    model = tiny_llama(layers=1)
    model_q = lowbit.quantize(model, _recipe("rtn", bits=bits, group_size=32), show_progress=False)
    lowbit.save(model_q, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        quant_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                          for k in f.keys() if k.rsplit(".", 1)[-1] in ("qweight", "scales", "qzeros", "g_idx"))
    n_weights = sum(qw.codes.numel() for qw in model_q.weights.values())
    fp16_bytes = 2 * n_weights
    # codes take exactly bits/16 of fp16; group-32 scales+zeros add (16 + bits)/32 bits per weight
    expected = fp16_bytes * bits / 16 + n_weights / 32 * (2 + bits / 8)
    assert quant_bytes == pytest.approx(expected, rel=0.01)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, calib_ids, monkeypatch):
    recipe = _recipe("gptq", bits=3, group_size=16)
    full = tiny_llama(layers=3)
    full_q = quantize_model(full, recipe, calib_ids, show_progress=False)

    interrupt_rounding_in_block(monkeypatch, 2)
    partial = tiny_llama(layers=3)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(partial, recipe, calib_ids, progress_dir=tmp_path, show_progress=False)
    monkeypatch.undo()

    resumed = tiny_llama(layers=3)
    resumed_q = quantize_model(resumed, recipe, calib_ids, progress_dir=tmp_path, resume=True, show_progress=False)
    report = resumed_q.report
    assert report.resumed_blocks == 2
    for name, qw in full_q.weights.items():
        assert torch.equal(resumed_q.weights[name].codes, qw.codes), name
        assert torch.equal(resumed.get_submodule(name).weight, full.get_submodule(name).weight), name


def test_a_finished_run_resumes_without_a_calibration_forward(tmp_path, calib_ids, monkeypatch):
    """Every block stored (a run killed while evaluating): resuming loads the weights and runs no block."""
    recipe = _recipe("gptq", bits=3, group_size=16)
    full = tiny_llama(layers=3)
    full_q = quantize_model(full, recipe, calib_ids, progress_dir=tmp_path, show_progress=False)
    first = full_q.report

    calls = []
    monkeypatch.setattr(engine, "capture_block_inputs", lambda *a, **k: calls.append("capture"))
    monkeypatch.setattr(engine, "run_block", lambda *a, **k: calls.append("run_block"))
    resumed = tiny_llama(layers=3)
    resumed_q = quantize_model(resumed, recipe, calib_ids, progress_dir=tmp_path, resume=True, show_progress=False)
    report = resumed_q.report
    assert calls == [] and report.resumed_blocks == 3
    assert report.capture_seconds == first.capture_seconds > 0  # the first run's costs are still reported
    assert report.total_seconds >= sum(report.block_seconds) + report.capture_seconds
    for name, qw in full_q.weights.items():
        assert torch.equal(resumed.get_submodule(name).weight, full.get_submodule(name).weight), name


def test_resume_refuses_a_different_recipe(tmp_path, calib_ids):
    quantize_model(tiny_llama(), _recipe("gptq", bits=3), calib_ids, progress_dir=tmp_path, show_progress=False)
    with pytest.raises(ResumeMismatch, match="different"):
        quantize_model(tiny_llama(), _recipe("gptq", bits=4), calib_ids, progress_dir=tmp_path, resume=True,
                       show_progress=False)


def test_matrices_outside_linears_are_named_and_mixture_of_experts_routers_are_not_warned_of(caplog):
    """A matrix no recipe can quantize (not nn.Linear, not a fused expert tensor) is named in a warning;
    Mixtral's experts become linears and its routers stay in float on purpose (said at info level)."""
    from torch import nn
    from transformers import MixtralConfig, MixtralForCausalLM

    from lowbit.models.adapters import weights_left_in_float

    odd = tiny_llama()
    for block in odd.model.layers:
        block.mlp.extra = nn.Parameter(torch.zeros(4, 4))  # used by nothing: only its kind matters here
    with caplog.at_level("WARNING", logger="lowbit.pipeline.driver"):
        quantize_model(odd, lowbit.recipes.get("rtn-w4"), None, show_progress=False)
    assert "stay in float" in caplog.text and "mlp.extra" in caplog.text
    assert weights_left_in_float(tiny_llama().model.layers[0]) == []  # a dense block: nothing left out

    caplog.clear()
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2, max_position_embeddings=128)).eval()
    with caplog.at_level("INFO", logger="lowbit.pipeline.driver"):
        model_q = quantize_model(model, lowbit.recipes.get("rtn-w4"), None, show_progress=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "routers stay in float: mlp.gate" in caplog.text
    assert "model.layers.0.mlp.experts.3.down_proj" in model_q.weights
