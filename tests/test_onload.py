"""Quantizing block by block from disk (``--onload``): the same checkpoint as the whole-model run, one block in
memory, each block written as it finishes, and a run killed mid-way resumed to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit.export.load import load_quantized
from lowbit.export.write import FORMAT_VERSION
from lowbit.models.onload import DiskModel

QUANTIZE = ("--recipe", "gptq-w4g128", "--nsamples", "4", "--seqlen", "64", "--set", "weights.group_size=32")


def _cli(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOWBIT_KILL_AT", None)
    if kill_at is not None:
        env["LOWBIT_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "report.json"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny Llama of the hostile tests (tied embeddings), its tensors in three shards."""
    from hostile_setup import write_tiny_model
    from transformers import AutoModelForCausalLM

    path = write_tiny_model(tmp_path_factory.mktemp("onload") / "model", layers=3)
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, max_shard_size="100KB")
    (path / "model.safetensors").unlink(missing_ok=True)
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def whole(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "ckpt"
    r = _cli("quantize", str(model), *QUANTIZE, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def onloaded(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onloaded") / "ckpt"
    r = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--onload")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "onloading one block at a time in float32" in r.stdout
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_quantized(path)[0].state_dict()


def test_onload_gives_the_whole_model_runs_checkpoint(onloaded, whole, tmp_path):
    """float32 blocks read from disk one at a time: every tensor of the loaded checkpoint is the whole run's."""
    out = onloaded
    a, b = _state(out), _state(whole)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"block-0000{i}.safetensors" for i in range(3)] + [
        "model-rest.safetensors"]
    assert json.loads((out / "lowbit_config.json").read_text())["format_version"] == FORMAT_VERSION == 4
    # each block's shard holds that block's tensors only
    assert all(k.startswith("model.layers.1.") for k in load_file(out / "block-00001.safetensors"))
    assert not (out / ".progress").exists()
    # a sharded checkpoint exports as a single-file one does: the same dense tensors
    for ckpt in (out, whole):
        r = _cli("export", str(ckpt), str(tmp_path / f"{ckpt.parent.name}-dense"), "--format", "dense")
        assert r.returncode == 0, r.stderr[-2000:]
    dense = [load_file(tmp_path / f"{c.parent.name}-dense" / "model.safetensors") for c in (out, whole)]
    assert dense[0].keys() == dense[1].keys() and all(torch.equal(dense[0][k], dense[1][k]) for k in dense[0])
    assert _cli("inspect", str(out)).returncode == 0
    # plain transformers (the checkpoint's own lowbit_hf entry) reads the shards: lowbit's logits exactly
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    x = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.equal(theirs(x).logits, load_quantized(out)[0](x).logits)


@pytest.mark.parametrize("point", ["block:1", "save:tensors"])
def test_killed_onload_run_resumes_to_the_same_bytes(point, model, onloaded, tmp_path):
    reference = onloaded
    out = tmp_path / "ckpt"
    killed = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--onload", kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "lowbit_config.json").exists()
    shards = sorted(p.name for p in (out / ".progress" / "shards").glob("*.safetensors"))
    assert shards == [f"block-0000{i}.safetensors" for i in range(2 if point == "block:1" else 3)]
    resumed = _cli("quantize", str(model), *QUANTIZE, "--out", str(out), "--onload", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _hashes(out) == _hashes(reference)


def test_bfloat16_files_are_onloaded_in_bfloat16(model, tmp_path):
    """The files' own dtype by default: the checkpoint says bfloat16 and its logits are the float32 run's to
    bfloat16 rounding of the weights (same codes but for a few ties)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(model).save_pretrained(src)
    assert DiskModel(src).dtype == torch.bfloat16
    out = tmp_path / "ckpt"
    r = _cli("quantize", str(src), "--recipe", "rtn-w4g128", "--set", "weights.group_size=32", "--out", str(out),
             "--onload")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "lowbit_config.json").read_text())["dtype"] == "bfloat16"
    q, _ = load_quantized(out)
    assert next(q.parameters()).dtype == torch.bfloat16
    ref, _ = load_quantized(out, dtype=torch.float32)
    x = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.allclose(q(x).logits.float(), ref(x).logits, atol=0.05, rtol=0.05)


def test_one_line_refusals(model, whole, tmp_path):
    out = str(tmp_path / "ckpt")
    cases = [
        (("--onload", "--max-memory", "1MB"), "one block needs about"),
        (("--max-memory", "4GB"), "--max-memory applies to --onload"),
        (("--onload", "--max-memory", "lots"), "--max-memory must be a size such as 4GB"),
        (("--onload", "--eval", "wikitext2"), "lowbit eval OUT --onload"),
        (("--dtype", "int8"), "--dtype must be one of float32, bfloat16, float16"),
    ]
    for extra, message in cases:
        r = _cli("quantize", str(model), *QUANTIZE, "--out", out, *extra)
        assert r.returncode != 0 and message in r.stderr, (extra, r.stderr[-800:])
        assert "Traceback" not in r.stderr
        assert not Path(out, "lowbit_config.json").exists()
    r = _cli("quantize", str(whole), *QUANTIZE, "--out", out, "--onload")
    assert r.returncode != 0 and "is a lowbit checkpoint: it is quantized already" in r.stderr, r.stderr[-800:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    binary = tmp_path / "bin"  # weights as pytorch_model.bin (transformers 5 saves only safetensors)
    float_model = AutoModelForCausalLM.from_pretrained(model)
    float_model.config.save_pretrained(binary)
    torch.save(float_model.state_dict(), binary / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(model).save_pretrained(binary)
    r = _cli("quantize", str(binary), *QUANTIZE, "--out", out, "--onload")
    assert r.returncode != 0 and "its weights must be safetensors files" in r.stderr, r.stderr[-800:]
    assert "Traceback" not in r.stderr and not Path(out, "lowbit_config.json").exists()
    oac = _cli("quantize", str(model), "--recipe", "oac-w2", "--nsamples", "2", "--seqlen", "32", "--out", out,
               "--onload")
    assert oac.returncode != 0 and "output-adaptive Hessians (OAC) need the whole model" in oac.stderr, oac.stderr


def test_memory_need_counts_one_block_not_the_model(model):
    """The estimate grows with the block and the calibration set, not with the number of blocks."""
    disk = DiskModel(model)
    parts = disk.memory_need(nsamples=4, seqlen=64)
    params = sum(p.numel() for p in disk.blocks[0].parameters())
    assert parts["block weights"] == params * 4
    assert parts["calibration activations"] == 2 * 4 * 64 * 64 * 4
    assert all(p.is_meta for p in disk.model.parameters())  # the estimate read no weight


def test_blockwise_perplexity_is_the_whole_models(model, whole):
    """Every window through block i before block i+1 is read: the same NLL as the whole model's forward."""
    from transformers import AutoTokenizer

    from lowbit.eval.perplexity import perplexity
    from lowbit.export.load import DiskCheckpoint
    from lowbit.models import load_model

    tok = AutoTokenizer.from_pretrained(model)
    for whole_model, disk in ((load_quantized(whole)[0], DiskCheckpoint(whole)), (load_model(str(model))[0],
                                                                                    DiskModel(model))):
        a = perplexity(whole_model, tok, "wikitext2", seqlen=128, windows=3, show_progress=False)
        b = perplexity(disk, tok, "wikitext2", seqlen=128, windows=3, show_progress=False)
        assert (a.tokens, a.windows) == (b.tokens, b.windows)
        assert b.nll == pytest.approx(a.nll, rel=1e-6)
    assert all(p.is_meta for p in disk.model.parameters())  # every block given back


def test_eval_onload_cli(whole):
    r = _cli("eval", str(whole), "--onload", "--ppl", "wikitext2", "--windows", "2", "--seqlen", "128", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    onloaded = json.loads(r.stdout.strip().splitlines()[-1])["perplexity"]["wikitext2"]
    r = _cli("eval", str(whole), "--ppl", "wikitext2", "--windows", "2", "--seqlen", "128", "--json", "--no-log")
    loaded = json.loads(r.stdout.strip().splitlines()[-1])["perplexity"]["wikitext2"]
    assert onloaded["ppl"] == pytest.approx(loaded["ppl"], rel=1e-6) and onloaded["tokens"] == loaded["tokens"]
    refused = _cli("eval", str(whole), "--onload", "--kl")
    assert refused.returncode != 0 and "--kl needs the whole model" in refused.stderr


@pytest.mark.slow
def test_scale_bench_holds_one_block_not_the_model(tmp_path):
    """bench/scale.py at its test shape (24 blocks of 22 MB, 0.56 GB): quantizing holds a few blocks' worth
    above what the imports take, however many blocks the model has, and the checkpoint evaluates block-wise."""
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, "bench/scale.py", "--shape", "ci", "--recipes", "rtn-w4g128",
                        "--work", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=1500,
                       cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    block, model_bytes = result["model"]["block_bytes"], result["model"]["bytes"]
    assert model_bytes > 20 * block
    for row in result["rows"]:
        above = (row["peak_mb"] - result["baseline_mb"]) * 2**20
        # one block and the float32/float64 work on its largest layer (measured: 8 blocks' worth)
        assert above < 12 * block, (row, block / 2**20)
        assert above < 0.5 * model_bytes
        assert row["eval_peak_mb"] * 2**20 < result["baseline_mb"] * 2**20 + 12 * block  # measured: 9
        assert row["eval_ppl_1x512"] > 1


def test_models_whose_files_do_not_hold_linears_are_refused(tmp_path):
    """GPT-2's Conv1D weights are stored transposed: onloading them into nn.Linear skeletons would be wrong."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.errors import LowbitError

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(tmp_path)
    with pytest.raises(LowbitError, match="nn.Linear layers.*run without --onload"):
        DiskModel(tmp_path)
