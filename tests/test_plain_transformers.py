"""A lowbit checkpoint met by plain ``transformers``: an error, or (trusting lowbit's code) the right model —
never the base model with its quantized weights initialised at random."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import lowbit


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_llama()
    model_q = lowbit.quantize(model, "rtn-w4", show_progress=False)
    path = tmp_path_factory.mktemp("ckpt")
    lowbit.save(model_q, path)
    return path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def test_plain_transformers_refuses_a_lowbit_checkpoint(checkpoint):
    with pytest.raises(ValueError, match="contains custom code"):
        AutoModelForCausalLM.from_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "lowbit" and config["base_config"]["model_type"] == "llama"
    assert "lowbit.load_model" in (checkpoint / "lowbit_hf.py").read_text()  # where the error points


def test_trusting_lowbits_code_gives_lowbits_model(checkpoint):
    ours, _ = lowbit.load_model(checkpoint)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    assert type(theirs) is type(ours)
    assert torch.equal(_logits(theirs, IDS), _logits(ours, IDS))  # the same packed layers, the same numbers


def test_without_lowbit_transformers_says_to_install_it(checkpoint, tmp_path):
    """lowbit hidden from the import system (as on a machine without it): transformers' own check names it."""
    script = f"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "lowbit" or name.startswith("lowbit."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
except ImportError as exc:
    print("ImportError:", exc)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False,
                       cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert "ImportError:" in r.stdout and "pip install lowbit" in r.stdout, r.stdout + r.stderr[-2000:]


def test_a_format_1_checkpoint_still_loads(checkpoint, tmp_path):
    """Format 1 kept the base model's config.json itself."""
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(checkpoint, old)
    meta = json.loads((old / "lowbit_config.json").read_text())
    (old / "lowbit_config.json").write_text(json.dumps({**meta, "format_version": 1}))
    (old / "config.json").write_text(json.dumps(json.loads((old / "config.json").read_text())["base_config"]))
    (old / "lowbit_hf.py").unlink()
    model, _ = lowbit.load_model(old)
    assert torch.equal(_logits(model, IDS), _logits(lowbit.load_model(checkpoint)[0], IDS))


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "gptq-w4g128", "quip-w4", "spqr-w2", "oac-w1", "aser-w4a8",
                                    "rptq-w4a4kv4"])
def test_a_loaded_checkpoint_saves_again_to_the_same_tensors(recipe, tmp_path, calib_ids):
    """``lowbit.save`` on a model loaded from a checkpoint (not only in the process that quantized it) writes
    the same tensors and layer table, and the copy loads to the same logits."""
    from conftest import tiny_llama
    from safetensors.torch import load_file

    model = tiny_llama()
    model_q = lowbit.quantize(model, recipe, calib_ids, show_progress=False)
    lowbit.save(model_q, tmp_path / "a")
    loaded, _ = lowbit.load_model(tmp_path / "a")
    lowbit.save(loaded, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = [json.loads((tmp_path / d / "lowbit_config.json").read_text()) for d in "ab"]
    assert meta[0]["layers"] == meta[1]["layers"] and meta[0]["activations"] == meta[1]["activations"]
    ids = calib_ids[:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(lowbit.load_model(tmp_path / "b")[0](ids).logits, loaded(ids).logits, atol=0, rtol=0)


def test_float_tensors_are_stored_in_the_narrowest_exact_dtype(tmp_path):
    """A bfloat16 model quantized in float32: its embedding and norms go to the checkpoint as bfloat16 (half the
    bytes) and come back as the same float32 values; tensors that need float32 keep it."""
    from conftest import tiny_llama
    from safetensors.torch import load_file

    from lowbit.export.write import narrowest

    model = tiny_llama().to(torch.bfloat16).float()  # a bfloat16 source, held in float32 as lowbit loads it
    model_q = lowbit.quantize(model, "rtn-w4", show_progress=False)
    lowbit.save(model_q, tmp_path / "c")
    stored = load_file(tmp_path / "c" / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    loaded, _ = lowbit.load_model(tmp_path / "c")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    odd = torch.tensor([1.0, 1.0 + 2**-12, 3.0])  # needs float32's mantissa
    assert narrowest(odd).dtype == torch.float32 and narrowest(torch.tensor([0.5, 2.0**-20])).dtype == torch.bfloat16
