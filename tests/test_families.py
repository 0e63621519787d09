"""The architecture matrix: every family through quantize -> save -> reload -> evaluate, on tiny random models.

Families (``conftest.FAMILY_CONFIGS``): Llama, Mistral, Qwen2, Qwen3 (q/k norms), Gemma-3 (sliding and
full attention), Phi-3 (fused ``qkv_proj``/``gate_up_proj``: quantized fused), GPT-2 (``Conv1D`` made
``nn.Linear``; fused ``c_attn`` quantized fused), OPT, and two mixture-of-experts families (Mixtral;
Qwen2-MoE with a shared expert): every expert quantized on the tokens routed to it, routers in float.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import FAMILY_CONFIGS, tiny_family
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import load_quantized
from lowbit.models import block_linears, find_blocks
from lowbit.models.linearize import LinearExperts, expert_linears, linearize, router_names
from lowbit.recipes import apply_overrides

# one weight-only recipe of each rounding kind and one activation recipe; groups of 16 divide every width
RECIPES = {
    "rtn": ("rtn-w4g128", ["weights.group_size=16"]),
    "gptq": ("gptq-w4g128", ["weights.group_size=16"]),
    "quip": ("quip-w4", []),
    "w4a8": ("naive-w4a8", []),
}
MOE = ("mixtral", "qwen2_moe")


def _recipe(key: str):
    name, sets = RECIPES[key]
    return apply_overrides(lowbit.recipes.get(name), sets)


def _quantizable_names(model: nn.Module) -> set[str]:
    path, blocks = find_blocks(model)
    return {f"{path}.{b}.{n}" for b, block in enumerate(blocks)
            for n in block_linears(block) if n not in router_names(block)}


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_family_quantizes_saves_reloads_and_evaluates(family, recipe, calib, tmp_path):
    model = tiny_family(family)
    ids = calib[:2, :24]
    with torch.no_grad():
        float_logits = model(ids).logits
    model_q = lowbit.quantize(model, _recipe(recipe), calib, show_progress=False)
    report = model_q.report
    # every linear of every block is quantized (experts one by one), nothing but routers left in float
    assert set(model_q.weights) == _quantizable_names(model)
    assert {r.name for r in report.layers} == set(model_q.weights)
    with torch.no_grad():
        in_memory = model(ids).logits
    # 4-bit weights (and 8-bit activations) move random-weight logits, but not far: a working quantizer
    rel = float((in_memory - float_logits).norm() / float_logits.norm())
    assert 0 < rel < 0.5, rel

    lowbit.save(model_q, tmp_path / "ckpt", report=report)
    reloaded, _ = load_quantized(tmp_path / "ckpt")
    assert not any(p.dim() == 3 for p in reloaded.parameters())  # no fused experts left in float
    with torch.no_grad():
        got = reloaded(ids).logits
    # same codes and scales; packed layers compute in another order (and QuIP's fast transforms): float32 rounding
    torch.testing.assert_close(got, in_memory, atol=5e-5, rtol=1e-4)

    from lowbit.eval.perplexity import window_nll

    nll, count = window_nll(reloaded, calib[:4])  # the evaluation path: finite, above a perfect model's
    assert count == 4 * 31 and 1 < math.exp(nll / count) < float("inf")


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_linearized_model_computes_what_the_original_does(family):
    """Conv1D -> nn.Linear and fused experts -> one nn.Linear pair per expert: the same logits as transformers'
    own modules (float32: its grouped-matmul experts take no float64), to float32 rounding."""
    model = tiny_family(family)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
    replaced = linearize(model)
    assert bool(replaced) == (family in MOE + ("gpt2",))
    assert all(p.dim() <= 2 for p in model.parameters())
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _routed_inputs(model: nn.Module, calib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 0's MLP input (every token) and its router's choices ``(tokens, k)``, read off the float model
    with hooks on ``transformers``' own modules (before any lowbit surgery)."""
    moe = model.model.layers[0].mlp
    seen = {}
    h1 = moe.experts.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0], index=args[1]))
    try:
        with torch.no_grad():
            for i in range(calib.shape[0]):
                model(calib[i : i + 1])
                seen.setdefault("xs", []).append(seen["x"])
                seen.setdefault("indices", []).append(seen["index"])
    finally:
        h1.remove()
    return torch.cat(seen["xs"]), torch.cat(seen["indices"])


@pytest.mark.parametrize("family", MOE)
def test_each_expert_is_rounded_with_the_hessian_of_its_own_tokens(family, calib):
    """GPTQ on an expert equals GPTQ on that expert's weights with ``2/n Σ x xᵀ`` over the tokens the float
    model's router sends it (computed here from transformers' own fused modules), token counts reported."""
    from lowbit.methods.weights import round_weight

    recipe = apply_overrides(_recipe("gptq"), ["pipeline.true_sequential=false"])  # block 0 sees float inputs
    model = tiny_family(family)
    x, index = _routed_inputs(model, calib)
    fused = model.model.layers[0].mlp.experts
    weights = {e: fused.gate_up_proj[e].detach().clone() for e in range(fused.gate_up_proj.shape[0])}
    model_q = lowbit.quantize(model, recipe, calib, show_progress=False)
    report = model_q.report
    layers = {r.name: r for r in report.layers}
    checked = 0
    for e, w in weights.items():
        tokens = (index == e).any(-1)
        name = f"model.layers.0.mlp.experts.{e}.gate_up_proj"
        assert layers[name].tokens == int(tokens.sum())
        if layers[name].tokens < w.shape[1]:
            assert layers[name].method == "rtn"
            continue
        xe = x[tokens].double()
        h = (2.0 / xe.shape[0]) * xe.T @ xe
        expected = round_weight(w, h.float(), recipe.weights, name=name)
        assert torch.equal(model_q.weights[name].codes, expected.codes), e
        checked += 1
    assert checked >= 2  # the comparison ran on most experts, not only on fallbacks


@pytest.mark.parametrize("family", MOE)
def test_experts_calibration_barely_reaches_fall_back_to_rtn_and_say_so(family, caplog):
    calib = torch.randint(3, 128, (1, 1), generator=torch.Generator().manual_seed(4))  # 1 token: 2 of 4 experts
    import dataclasses

    from lowbit.methods.weights import round_weight

    model, recipe = tiny_family(family), _recipe("gptq")
    linearize(model)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if ".experts." in n and hasattr(m, "weight")}
    with caplog.at_level(logging.WARNING, logger="lowbit.pipeline.stages"):
        model_q = lowbit.quantize(model, recipe, calib, show_progress=False)
        report = model_q.report
    experts = [r for r in report.layers if ".experts." in r.name]
    assert experts and all(r.method == "rtn" and r.tokens < r.shape[1] for r in experts)
    assert any(r.tokens == 0 for r in experts) and "saw no calibration input" in caplog.text
    assert "fewer than its" in caplog.text
    rtn = dataclasses.replace(recipe.weights, method="rtn")  # the recipe's grid, no Hessian
    for r in experts:  # the fallback is RTN on the expert's own weights
        expected = round_weight(weights[r.name], None, rtn, name=r.name)
        assert torch.equal(model_q.weights[r.name].codes, expected.codes), r.name
    dense = [r for r in report.layers if ".experts." not in r.name]
    assert all(r.method == "gptq" for r in dense)  # attention (and a shared expert) keep GPTQ


def test_moe_blocks_are_experts_and_routers_stay_in_float():
    model = tiny_family("qwen2_moe")
    linearize(model)
    block = model.model.layers[0]
    assert isinstance(block.mlp.experts, LinearExperts)
    assert router_names(block) == {"mlp.gate", "mlp.shared_expert_gate"}
    assert len(expert_linears(block)) == 2 * 4
    model_q = lowbit.quantize(model, _recipe("rtn"), None, show_progress=False)
    assert not any(".gate" == n[-5:] or "shared_expert_gate" in n for n in model_q.weights)
    assert "model.layers.0.mlp.shared_expert.down_proj" in model_q.weights


@pytest.mark.parametrize("family", ["phi3", "gpt2", "mixtral"])
@pytest.mark.parametrize("preset", ["rptq-w4a8", "smoothquant-w8a8"])
def test_smoothing_and_reordering_on_fused_or_expert_blocks_are_one_line_errors(family, preset, calib, monkeypatch):
    model = tiny_family(family)

    def never(*args, **kwargs):
        raise AssertionError("rounded before the refusal")

    monkeypatch.setattr("lowbit.pipeline.stages.round_weight", never)  # refused before any rounding
    with pytest.raises(LowbitError, match="needs separate q/k/v and gate/up") as err:
        lowbit.quantize(model, preset, calib, show_progress=False)
    assert "\n" not in str(err.value)


def test_fused_projections_are_quantized_fused():
    """Phi-3's qkv_proj / gate_up_proj and GPT-2's c_attn are quantized as the one matrix each is."""
    for family, names in (("phi3", ("self_attn.qkv_proj", "mlp.gate_up_proj")), ("gpt2", ("attn.c_attn",))):
        model = tiny_family(family)
        model_q = lowbit.quantize(model, _recipe("rtn"), None, show_progress=False)
        path, blocks = find_blocks(model)
        for n in names:
            layer = blocks[0].get_submodule(n)
            assert isinstance(layer, nn.Linear) and f"{path}.0.{n}" in model_q.weights
            assert model_q.weights[f"{path}.0.{n}"].codes.shape == layer.weight.shape


def test_a_mixture_of_experts_folder_through_the_command_line(tmp_path):
    """A user's Mixtral folder: quantize (GPTQ, calibration from C4), inspect names the experts' token counts,
    eval reads the checkpoint back (experts as linears) and gives a finite perplexity."""
    import json
    import subprocess
    import sys

    from hostile_setup import VOCAB, tiny_tokenizer
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    MixtralForCausalLM(cfg).eval().save_pretrained(tmp_path / "moe")
    tiny_tokenizer().save_pretrained(tmp_path / "moe")

    def cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=600,
                           check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    cli("quantize", str(tmp_path / "moe"), "--recipe", "gptq-w4g128", "--set", "weights.group_size=16",
        "--nsamples", "2", "--seqlen", "64", "--out", str(tmp_path / "ckpt"))
    table = cli("inspect", str(tmp_path / "ckpt"))
    report = json.loads((tmp_path / "ckpt" / "report.json").read_text())
    experts = [r for r in report["layers"] if ".experts." in r["name"]]
    assert len(experts) == 2 * 2 * 4 and sum(r["tokens"] for r in experts if r["name"].endswith("0.down_proj")) > 0
    assert all(r["tokens"] <= 2 * 2 * 64 for r in experts)  # k = 2 of 4 experts per token, 128 tokens
    assert "tokens" in table and "mlp.experts.3.down_proj" in table and "mlp.gate" not in table
    ppl = json.loads(cli("eval", str(tmp_path / "ckpt"), "--ppl", "wikitext2", "--windows", "1", "--seqlen", "256",
                         "--json", "--no-log"))["perplexity"]["wikitext2"]["ppl"]
    assert 1 < ppl < float("inf")


@pytest.mark.parametrize("family", MOE)
def test_hessian_experts_all_calibrates_every_expert_on_every_token(family, calib):
    """``hessian.experts: all``: each expert's Hessian is ``2/n Σ x xᵀ`` over every token of the MLP input
    (no RTN fallback, however the router splits them); the block computes the same output meanwhile."""
    from lowbit.methods.weights import round_weight
    from lowbit.models.linearize import experts_see_every_token

    recipe = apply_overrides(_recipe("gptq"), ["pipeline.true_sequential=false", "hessian.experts=all"])
    assert recipe.to_dict()["hessian"]["experts"] == "all"
    assert "experts" not in _recipe("gptq").to_dict()["hessian"]  # the default keeps older recipes' identity
    model = tiny_family(family)
    x, _ = _routed_inputs(model, calib)
    w = model.model.layers[0].mlp.experts.gate_up_proj[1].detach().clone()
    probe = tiny_family(family)
    linearize(probe)
    with torch.no_grad():
        routed = probe(calib[:2]).logits
        with experts_see_every_token(probe.model.layers[0]), experts_see_every_token(probe.model.layers[1]):
            every = probe(calib[:2]).logits
    torch.testing.assert_close(every, routed, atol=1e-6, rtol=1e-6)

    model_q = lowbit.quantize(model, recipe, calib, show_progress=False)
    report = model_q.report
    experts = [r for r in report.layers if ".experts." in r.name]
    assert all(r.tokens == calib.numel() and r.method == "gptq" for r in experts)
    name = "model.layers.0.mlp.experts.1.gate_up_proj"
    h = (2.0 / x.shape[0]) * x.double().T @ x.double()
    assert torch.equal(model_q.weights[name].codes, round_weight(w, h.float(), recipe.weights, name=name).codes)


def test_true_sequential_rounds_all_experts_gate_up_then_all_down(calib):
    """Which experts a sample calls depends on its routing: the experts' layers form two groups (all
    gate_up, then all down) after the attention's, whatever order the first sample called them in."""
    model = tiny_family("qwen2_moe")
    model_q = lowbit.quantize(model, _recipe("gptq"), calib, show_progress=False)
    report = model_q.report
    block0 = [r.name.removeprefix("model.layers.0.") for r in report.layers if r.block == 0]
    ups = [f"mlp.experts.{e}.gate_up_proj" for e in range(4)]
    downs = [f"mlp.experts.{e}.down_proj" for e in range(4)]
    i = block0.index(ups[0])
    assert block0[i : i + 8] == ups + downs
    assert block0[:4] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert set(block0[4:i] + block0[i + 8 :]) == {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj",
                                                  "mlp.shared_expert.down_proj"}
