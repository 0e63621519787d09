"""Bad input fails fast with one line on stderr and exit code 2, before any model is loaded."""

import os
import subprocess
import sys

import pytest


def _lowbit(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=timeout)


BAD_INPUTS = [
    (["quantize", "smollm2-135m", "--recipe", "gptq-w9", "--out", "x"], "unknown recipe 'gptq-w9'"),
    (["quantize", "smollm2-135m", "--recipe", "gptq-w4", "--out", "x", "--nsamples", "0"],
     "nsamples must be a positive"),
    (["quantize", "smollm2-135m", "--recipe", "gptq-w4", "--out", "x", "--eval", "ptx"], "unknown dataset 'ptx'"),
    (["eval", "smollm2-135m", "--windows", "0"], "--windows must be a positive integer"),
    (["eval", "./no/such/dir"], "model path './no/such/dir' does not exist"),
    (["eval", "tests/no-such-checkpoint"], "model path 'tests/no-such-checkpoint' does not exist"),
    (["eval", "lowbit"], "model path 'lowbit' is not a directory with a Hugging Face model (no config.json)"),
    (["eval", "pyproject.toml"], "model path 'pyproject.toml' is not a directory with a Hugging Face model"),
    (["quantize", "smollm2-135m", "--recipe", "rtn-w4", "--out", "pyproject.toml"],
     "--out pyproject.toml exists and is not a directory"),
    (["quantize", "smollm2-135m", "--recipe", "rtn-w4", "--out", "pyproject.toml/x"], "cannot write in pyproject.toml"),
    (["recipes", "gptq-w9"], "unknown recipe 'gptq-w9'"),
    (["eval", "smollm2-135m", "--device", "tpu9"], "unknown device 'tpu9'"),
    (["quantize", "smollm2-135m", "--recipe", "rptq-w4a4", "--out", "x", "--set", "activations.bits=9"],
     "activations.bits must be an integer from 2 to 8, or 16"),
    (["quantize", "smollm2-135m", "--recipe", "aser-w4a8", "--out", "x", "--set", "lowrank.energy=0.9"],
     "either rank or energy"),
    (["quantize", "smollm2-135m", "--recipe", "rptq-w4a4", "--out", "x", "--set", "activations.cluster=4"],
     "unknown recipe key 'cluster' in activations"),
    (["export-lora", "./no/such/dir", "out"], "is not a lowbit checkpoint"),
    (["inspect", "./no/such/dir"], "is not a lowbit checkpoint"),
    (["quantize", "smollm2-135m", "--recipe", "spqr-w2", "--out", "x", "--set", "weights.outlier_fraction=0.7"],
     "weights.outlier_fraction must be a number in [0, 0.5)"),
    (["quantize", "smollm2-135m", "--recipe", "billm-w1", "--out", "x", "--set", "weights.bits=2"],
     "weights.method billm binarizes"),
    (["quantize", "smollm2-135m", "--recipe", "oac-w2", "--out", "x", "--hessian-cache", "pyproject.toml"],
     "--hessian-cache pyproject.toml exists and is not a directory"),
    (["eval", "smollm2-135m", "--log", "pyproject.toml"], "--log pyproject.toml exists and is not a directory"),
]  # bench/cli_errors.py times these


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_is_one_line_error(args, message):
    r = _lowbit(*args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_errors_come_before_torch_is_imported():
    """Validation, model resolution and data checks cost a fraction of a second, not torch's import."""
    code = ("import sys\nfrom lowbit import cli\nsys.argv = ['lowbit', 'quantize', 'smollm2-135m', '--recipe', "
            "'gptq-w4', '--out', 'x', '--nsamples', '0']\ntry:\n    cli.main()\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["2", "False", "False"], r.stdout + r.stderr


def test_missing_lowbit_data_folder_is_an_error(tmp_path):
    env = {**os.environ, "LOWBIT_DATA": str(tmp_path / "nope")}
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "smollm2-135m", "--windows", "1"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and f"LOWBIT_DATA={tmp_path / 'nope'} is not a folder" in r.stderr, r.stderr


def test_help_renders_switches_and_argument_names():
    for args in (["--help"], ["quantize", "--help"], ["eval", "--help"], ["compare", "--help"]):
        r = _lowbit(*args)
        assert r.returncode == 0, r.stderr
        assert "<bool>" not in r.stdout and "{model}" not in r.stdout and "Usage:" in r.stdout, r.stdout
    assert "[OPTIONS] MODEL" in _lowbit("eval", "--help").stdout


def test_version():
    from lowbit import __version__

    r = _lowbit("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lowbit {__version__}"


def test_recipes_table_and_one_recipe_in_full():
    from lowbit import recipes

    r = _lowbit("recipes")
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and lines[0].split() == ["recipe", "weights", "activations", "calibration", "method"]
    rows = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith(("`", " "))}
    assert set(rows) == set(recipes.presets())
    assert max(len(line) for line in lines) <= 120
    assert rows["gptq-w3g128"].split()[1:4] == ["W3g128", "-", "128×2048"]
    assert rows["rtn-w4"].split()[1:4] == ["W4", "-", "none"]
    full = _lowbit("recipes", "quip-w3")
    assert full.returncode == 0
    data = __import__("yaml").safe_load(full.stdout.split("\n\n", 1)[1])
    assert data == recipes.get("quip-w3").to_dict()  # the YAML printed is the recipe itself


def test_bad_recipe_file_key(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("weights: {bits: 4, groupsize: 128}\n")
    r = _lowbit("quantize", "smollm2-135m", "--recipe", str(f), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown recipe key 'groupsize' in weights" in r.stderr


def test_unknown_model_name(tmp_path, monkeypatch):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "no-such-model-xyz", "--windows", "1"],
                       capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "unknown model 'no-such-model-xyz'" in r.stderr, r.stderr


def test_model_folder_without_a_tokenizer_is_one_line(tmp_path):
    from conftest import tiny_llama

    tiny_llama().save_pretrained(tmp_path)  # weights and config only, as a training script often leaves them
    r = _lowbit("quantize", str(tmp_path), "--recipe", "rtn-w4", "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and "has no tokenizer that loads" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_non_causal_lm_is_refused(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37)).save_pretrained(tmp_path)
    r = _lowbit("eval", str(tmp_path), "--windows", "1")
    assert r.returncode == 2 and "is not a causal language model" in r.stderr, r.stderr


def _as_printed(*args: str) -> str:
    """``lowbit ARGS`` as a user sees it at 100 columns (the program named ``lowbit``, not ``python -m``)."""
    r = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'lowbit'; from lowbit.cli import main; main()",
                        *args], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "100",
                                                                                "NO_COLOR": "1"})
    assert r.returncode == 0, r.stderr
    return "\n".join(line.rstrip() for line in r.stdout.strip("\n").splitlines())


@pytest.mark.parametrize("args", [["--help"], ["quantize", "--help"], ["recipes"]])
def test_readme_shows_the_commands_as_they_print(args):
    """``LOWBIT_UPDATE_README=1`` writes the program's output into README.md instead of comparing."""
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "README.md"
    readme = path.read_text()
    block = re.compile(rf"(```console\n\$ lowbit {re.escape(' '.join(args))}\n)(.*?)(\n```)", re.S)
    if os.environ.get("LOWBIT_UPDATE_README"):
        path.write_text(block.sub(lambda m: m.group(1) + _as_printed(*args) + m.group(3), readme))
        return
    assert block.search(readme).group(2) == _as_printed(*args)
