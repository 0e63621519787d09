"""Bad input and damaged files, as a hostile (or unlucky) user gives them: each case must end with a
non-zero exit, exactly one ``error:`` line and no traceback, and leave every existing file as it was.

Cases that fail before a model loads take a fraction of a second; the others use a tiny random
model with a small tokenizer trained here (``hostile_setup``), never the real model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # run in the sandbox: ./model (tiny model), ./ckpt (a checkpoint of it), ./data
    message: str  # what the one error line must say
    setup: Callable[[Path], None] | None = None  # damages or prepares files in the sandbox
    env: dict[str, str] = field(default_factory=dict)  # "{sandbox}" is replaced by the sandbox's path
    exit_code: int = 2


def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def setup(box: Path) -> None:
        (box / rel).parent.mkdir(parents=True, exist_ok=True)
        (box / rel).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda box: (box / rel).unlink()


def _truncate(rel: str, keep: int) -> Callable[[Path], None]:
    def setup(box: Path) -> None:
        data = (box / rel).read_bytes()
        (box / rel).write_bytes(data[:keep])
    return setup


def _edit_config(**changes) -> Callable[[Path], None]:
    def setup(box: Path) -> None:
        path = box / "ckpt" / "lowbit_config.json"
        meta = json.loads(path.read_text())
        for key, value in changes.items():
            if value is None:
                meta.pop(key)
            else:
                meta[key] = value
        path.write_text(json.dumps(meta))
    return setup


def _data_folder(wiki: bytes | None = None, c4: bytes | None = None) -> Callable[[Path], None]:
    """A LOWBIT_DATA folder of the user's, with the files given (and good copies of the others)."""
    from lowbit.data.sources import EMBEDDED

    def setup(box: Path) -> None:
        shutil.copytree(EMBEDDED, box / "data")
        if wiki is not None:
            (box / "data" / "wikitext-2-raw" / "wiki.test.raw").write_bytes(wiki)
        if c4 is not None:
            (box / "data" / "c4" / "c4-validation.00000-of-00008.head.jsonl").write_bytes(c4)
    return setup


def _gguf_of(arch: str) -> Callable[[Path], None]:
    """A valid GGUF file of one tiny tensor whose architecture is ``arch``."""
    def setup(box: Path) -> None:
        import numpy as np
        from gguf import GGUFWriter

        writer = GGUFWriter(str(box / "m.gguf"), arch)
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return setup


def _stale_swap(box: Path) -> None:
    """What a kill between the two renames of a save leaves: no checkpoint, the old one set aside."""
    (box / "ckpt").rename(box / ".ckpt.old-4242")


Q = ("quantize", "./model", "--recipe")
E = ("eval", "./ckpt", "--windows", "1", "--ppl", "wikitext2")
DATA = {"LOWBIT_DATA": "{sandbox}/data"}

CASES = [
    # -- flags and recipes: refused before torch is imported --------------------------------------------------
    Case("unknown-recipe", (*Q, "gptq-w9", "--out", "o"), "unknown recipe 'gptq-w9'"),
    Case("nsamples-zero", (*Q, "gptq-w4", "--out", "o", "--nsamples", "0"), "nsamples must be a positive integer"),
    Case("nsamples-huge", (*Q, "gptq-w4", "--out", "o", "--nsamples", "1000000000"), "at most 100000"),
    Case("nsamples-negative", (*Q, "gptq-w4", "--out", "o", "--nsamples", "-5"), "nsamples must be a positive"),
    Case("nsamples-text", (*Q, "gptq-w4", "--out", "o", "--nsamples", "many"), "'many' is not a valid integer"),
    Case("no-such-command", ("quantise", "./model"), "No such command 'quantise'"),
    Case("missing-argument", ("quantize",), "Missing argument 'MODEL'"),
    Case("seqlen-one", (*Q, "gptq-w4", "--out", "o", "--seqlen", "0"), "calibration.seqlen must be"),
    Case("seed-negative", (*Q, "gptq-w4", "--out", "o", "--seed", "-1"), "calibration.seed must be"),
    Case("sampling-unknown", (*Q, "gptq-w4", "--out", "o", "--sampling", "random"), "calibration.sampling must be"),
    Case("eval-unknown-set", (*Q, "rtn-w4", "--out", "o", "--eval", "ptx"), "unknown dataset 'ptx'"),
    Case("windows-zero", (*Q, "rtn-w4", "--out", "o", "--eval", "wikitext2", "--windows", "0"),
         "--windows must be a positive integer"),
    Case("device-unknown", (*Q, "rtn-w4", "--out", "o", "--device", "tpu9"), "unknown device 'tpu9'"),
    Case("set-act-bits", (*Q, "rptq-w4a4", "--out", "o", "--set", "activations.bits=9"), "activations.bits must be"),
    Case("set-energy-and-rank", (*Q, "aser-w4a8", "--out", "o", "--set", "lowrank.energy=0.9"),
         "either rank or energy"),
    Case("set-unknown-key", (*Q, "rptq-w4a4", "--out", "o", "--set", "activations.cluster=4"),
         "unknown recipe key 'cluster' in activations"),
    Case("set-inf", (*Q, "gptq-w4", "--out", "o", "--set", "weights.damp=.inf"), "weights.damp must be a number"),
    Case("set-nan", (*Q, "gptq-w4", "--out", "o", "--set", "weights.damp=.nan"), "weights.damp must be a number"),
    Case("set-bits-float", (*Q, "gptq-w4", "--out", "o", "--set", "weights.bits=4.0"), "weights.bits must be"),
    Case("set-name-number", (*Q, "gptq-w4", "--out", "o", "--set", "name=5"), "name must be a string"),
    Case("set-group-bool", (*Q, "gptq-w4", "--out", "o", "--set", "weights.group_size=true"), "group_size must be"),
    Case("set-seed-negative", (*Q, "quip-w4", "--out", "o", "--set", "transform.seed=-3"), "transform.seed must be"),
    Case("set-no-equals", (*Q, "gptq-w4", "--out", "o", "--set", "weights.bits"), "is not of the form"),
    Case("set-bad-yaml", (*Q, "gptq-w4", "--out", "o", "--set", "weights.bits=[4"), "cannot read the value"),
    Case("set-huge-value", (*Q, "gptq-w4", "--out", "o", "--set", "weights.bits=" + "9" * 100_000),
         "cannot read the value"),
    Case("set-skip-not-list", (*Q, "gptq-w4", "--out", "o", "--set", "pipeline.skip=mlp"), "pipeline.skip must be"),
    Case("recipe-file-bad-yaml", (*Q, "r.yaml", "--out", "o"), "cannot parse recipe file",
         _write("r.yaml", "weights: {bits: 4\n")),
    Case("recipe-file-binary", (*Q, "r.yaml", "--out", "o"), "is not UTF-8 text",
         _write("r.yaml", b"\xff\xfe\x00\x01")),
    Case("recipe-file-list", (*Q, "r.yaml", "--out", "o"), "must hold a mapping", _write("r.yaml", "- a\n- b\n")),
    Case("recipe-file-unknown-key", (*Q, "r.yaml", "--out", "o"), "unknown recipe key 'groupsize'",
         _write("r.yaml", "weights: {bits: 4, groupsize: 128}\n")),
    Case("recipe-file-inf", (*Q, "r.yaml", "--out", "o"), "must be a number",
         _write("r.yaml", "weights: {damp: .inf}\n")),
    Case("recipe-file-huge-nsamples", (*Q, "r.yaml", "--out", "o"), "at most 100000",
         _write("r.yaml", "calibration: {nsamples: 1000000000}\n")),
    Case("eval-seqlen-one", ("eval", "./model", "--seqlen", "1"), "--seqlen must be an integer from 2"),
    Case("eval-limit-zero", ("eval", "./model", "--tasks", "arc_easy", "--limit", "0"), "--limit must be a positive"),
    Case("compare-jobs-zero", ("compare", "./model", "--recipes", "rtn-w4", "--report", "r", "--jobs", "0"),
         "--jobs must be a positive integer"),
    Case("compare-bad-peer", ("compare", "./model", "--peers", "nope", "--report", "r"), "unknown peer"),
    # -- paths ---------------------------------------------------------------------------------------------------
    Case("out-is-file", (*Q, "rtn-w4", "--out", "f.txt"), "--out f.txt exists and is not a directory",
         _write("f.txt", "keep me")),
    Case("out-under-file", (*Q, "rtn-w4", "--out", "f.txt/o"), "cannot write in f.txt", _write("f.txt", "keep me")),
    Case("out-foreign-folder", (*Q, "rtn-w4", "--out", "notes"), "holds files that are not a lowbit checkpoint",
         _write("notes/todo.txt", "keep me")),
    Case("out-holds-checkpoint", (*Q, "rtn-w4", "--out", "ckpt"), "holds a lowbit checkpoint: pass --overwrite"),
    Case("hessian-cache-is-file", (*Q, "oac-w2", "--out", "o", "--hessian-cache", "f.txt"),
         "--hessian-cache f.txt exists and is not a directory", _write("f.txt", "x")),
    Case("log-is-file", ("eval", "./ckpt", "--log", "f.txt"), "--log f.txt exists and is not a directory",
         _write("f.txt", "x")),
    Case("model-missing-path", ("eval", "./no/such/dir"), "model path './no/such/dir' does not exist"),
    Case("model-folder-no-config", ("eval", "empty"), "no config.json", _write("empty/readme.txt", "x")),
    Case("model-is-file", ("eval", "f.txt"), "is not a directory with a Hugging Face model", _write("f.txt", "x")),
    Case("model-path-partly-exists", ("eval", "ckpt/nope"), "model path 'ckpt/nope' does not exist"),
    Case("inspect-missing", ("inspect", "./no/such"), "is not a lowbit checkpoint"),
    Case("export-lora-missing", ("export-lora", "./no/such", "o"), "is not a lowbit checkpoint"),
    Case("lowbit-data-missing", ("eval", "./model", "--windows", "1"), "is not a folder",
         env={"LOWBIT_DATA": "{sandbox}/nope"}),
    Case("lock-held", (*Q, "rtn-w4", "--out", "locked"), "--out locked is in use by pid 4242",
         env={"LOWBIT_TEST_HOLD_LOCK": "locked"}),
    # -- damaged checkpoints --------------------------------------------------------------------------------------
    Case("tensors-truncated", E, "is damaged or truncated", _truncate("ckpt/model.safetensors", 5000)),
    Case("tensors-truncated-inspect", ("inspect", "ckpt"), "cannot be read", _truncate("ckpt/model.safetensors", 100)),
    Case("tensors-empty", E, "is damaged or truncated", _write("ckpt/model.safetensors", b"")),
    Case("tensors-garbage", E, "is damaged or truncated", _write("ckpt/model.safetensors", os.urandom(4096))),
    Case("tensors-missing", E, "has no model.safetensors", _remove("ckpt/model.safetensors")),
    Case("config-not-json", E, "lowbit_config.json is damaged (not JSON)", _write("ckpt/lowbit_config.json", "{bad")),
    Case("config-not-json-inspect", ("inspect", "ckpt"), "is damaged (not JSON)",
         _write("ckpt/lowbit_config.json", "{bad")),
    Case("config-a-list", E, "is damaged (not a JSON object)", _write("ckpt/lowbit_config.json", "[1, 2]")),
    Case("config-no-layers", E, "no 'layers' table", _edit_config(layers=None)),
    Case("config-future-version", E, "unsupported lowbit checkpoint version 99", _edit_config(format_version=99)),
    Case("config-dtype-not-a-dtype", E, "unknown dtype 'Tensor'", _edit_config(dtype="Tensor")),
    Case("config-unknown-layer", E, "tensors do not match its config",
         _edit_config(layers={"model.nope": {"bits": 4, "shape": [4, 4]}})),
    Case("config-layer-no-shape-inspect", ("inspect", "ckpt"), "is damaged",
         _edit_config(layers={"model.layers.0.mlp.up_proj": {"bits": 4}})),
    Case("partial-checkpoint", E, "holds a partial lowbit checkpoint", _remove("ckpt/lowbit_config.json")),
    Case("partial-checkpoint-out", (*Q, "rtn-w4", "--out", "ckpt"), "holds a lowbit checkpoint: pass --overwrite",
         _remove("ckpt/lowbit_config.json")),
    Case("hf-config-damaged", E, "config.json cannot be read", _write("ckpt/config.json", "{bad")),
    Case("report-damaged-inspect", ("inspect", "ckpt"), "report.json is damaged", _write("ckpt/report.json", "[")),
    Case("interrupted-swap", E, "the previous checkpoint is in .ckpt.old-4242", _stale_swap),
    Case("gguf-unknown-architecture", ("eval", "m.gguf", "--windows", "1"), "GGUF architecture 'nosucharch' is not",
         _gguf_of("nosucharch")),
    Case("gguf-not-gguf", ("eval", "m.gguf", "--windows", "1"), "is not a readable GGUF model file",
         _write("m.gguf", b"GGUF" + os.urandom(64))),
    Case("lora-without-branches", ("export-lora", "ckpt", "adapter"), "no low-rank"),
    # -- damaged text, resume state, nothing to do ------------------------------------------------------------------
    Case("data-wiki-binary", ("eval", "./model", "--windows", "1", "--ppl", "wikitext2"), "is not UTF-8 text",
         _data_folder(wiki=b"\xff\xfe\x00" * 100), DATA),
    Case("data-wiki-short", ("eval", "./model", "--windows", "1", "--ppl", "wikitext2"),
         "fewer than one window of 2048", _data_folder(wiki=b" = Tiny = \n"), DATA),
    Case("data-c4-no-text", ("eval", "./model", "--windows", "1", "--ppl", "c4"), "not JSON lines with a 'text'",
         _data_folder(c4=b'{"txt": "x"}\n'), DATA),
    Case("data-c4-truncated", ("eval", "./model", "--windows", "1", "--ppl", "c4"), "not JSON lines with a 'text'",
         _data_folder(c4=b'{"text": "cut'), DATA),
    Case("data-wiki-missing", ("eval", "./model", "--windows", "1", "--ppl", "wikitext2"), "no wikitext-2-raw",
         lambda box: (_data_folder()(box), (box / "data" / "wikitext-2-raw" / "wiki.test.raw").unlink()), DATA),
    Case("ppl-file-missing", ("eval", "./model", "--ppl", "mine.txt"), "dataset file mine.txt does not exist"),
    Case("ppl-file-empty", ("eval", "./model", "--ppl", "mine.txt"), "holds no text", _write("mine.txt", "")),
    Case("ppl-file-binary", ("eval", "./model", "--ppl", "mine.txt"), "is not UTF-8 text",
         _write("mine.txt", b"\xff\xfe\x00" * 50)),
    Case("ppl-jsonl-no-text", ("eval", "./model", "--ppl", "mine.jsonl"), "not JSON lines with a 'text' field",
         _write("mine.jsonl", '{"body": "x"}\n')),
    Case("ppl-file-short", ("eval", "./model", "--ppl", "mine.txt", "--windows", "1"), "fewer than one window",
         _write("mine.txt", "a few words only\n")),
    Case("ppl-unknown-kind", ("eval", "./model", "--ppl", "mine.csv"), "unknown dataset 'mine.csv'",
         _write("mine.csv", "a,b\n")),
    Case("ppl-ptb-missing", ("eval", "./model", "--ppl", "ptb"), "ptb is read from a data folder"),
    Case("calibration-file-binary", (*Q, "gptq-w4", "--out", "o", "--set", "calibration.dataset=c.jsonl"),
         "is not UTF-8 text", _write("c.jsonl", b"\xff\x00" * 40)),
    Case("resume-manifest-damaged", (*Q, "gptq-w4", "--out", "o", "--nsamples", "2", "--seqlen", "64", "--resume"),
         "resume state", _write("o/.progress/manifest.json", "{not json")),
    Case("resume-manifest-list", (*Q, "gptq-w4", "--out", "o", "--nsamples", "2", "--seqlen", "64", "--resume"),
         "resume state", _write("o/.progress/manifest.json", "[]")),
    Case("skip-every-layer", (*Q, "rtn-w4", "--out", "o", "--set", "pipeline.skip=['.*']"),
         "matches every linear layer"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny model, and an RTN checkpoint of it written by the CLI."""
    from hostile_setup import write_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model = write_tiny_model(root / "model")
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(model), "--recipe", "rtn-w4",
                        "--out", str(root / "ckpt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return model, root / "ckpt"


def _hold_lock(box: Path, name: str):
    """Another process's lock on ``name``, as a running ``lowbit quantize`` would hold it."""
    from filelock import FileLock

    from lowbit.locks import lock_path

    lock = FileLock(str(lock_path(box / name)))
    lock.acquire()
    holder = lock_path(box / name)
    holder.with_name(holder.name + ".holder").write_text(json.dumps(
        {"pid": 4242, "host": "elsewhere", "since": "05:00:00", "command": "lowbit quantize"}))
    return lock


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_and_changes_nothing(case: Case, tiny, tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    (box / "model").symlink_to(tiny[0], target_is_directory=True)
    shutil.copytree(tiny[1], box / "ckpt")
    if case.setup is not None:
        case.setup(box)
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_DATA"}
    env.update({k: v.replace("{sandbox}", str(box)) for k, v in case.env.items() if not k.startswith("LOWBIT_TEST")})
    lock = _hold_lock(box, case.env["LOWBIT_TEST_HOLD_LOCK"]) if "LOWBIT_TEST_HOLD_LOCK" in case.env else None
    before = _snapshot(box)
    try:
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", *case.args], cwd=box, env=env, capture_output=True,
                           text=True, timeout=300)
    finally:
        if lock is not None:
            lock.release()
    errors = [line for line in r.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert r.returncode == case.exit_code, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if case.message:
        assert len(errors) == 1 and case.message in errors[0], r.stderr[-2000:]
    after = _snapshot(box)
    assert {k: v for k, v in after.items() if k in before} == before  # no existing file changed or went away
    new = set(after) - set(before)
    assert all(Path(n).name.startswith(".") and ".lock" in n for n in new), new  # at most a lock's own file


def test_the_corpus_is_large_and_covers_each_kind():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_nothing_is_unpickled():
    """Files in a report or run folder may come from anyone: no pickle, no ``torch.load(weights_only=False)``."""
    sources = {p: p.read_text() for p in (REPO / "lowbit").rglob("*.py")}
    assert not [p for p, text in sources.items() if "weights_only=False" in text or "pickle.load" in text]


def test_random_states_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np
    import torch

    from lowbit.compare.peers.autoround_resume import load_rng_states, save_rng_states, set_rng_states

    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_rng_states(tmp_path / "rng.safetensors")
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist())
    set_rng_states(load_rng_states(tmp_path / "rng.safetensors"))
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(2).tolist()) == first


def test_inspect_reads_a_checkpoint_without_torch(tiny):
    code = ("import sys\nfrom lowbit.export.inspect import inspect_checkpoint\n"
            f"table = inspect_checkpoint({str(tiny[1])!r}).table()\n"
            "print('rtn-w4' in table, 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["True", "False", "False"], r.stdout + r.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB filesystem (tmpfs): a checkpoint does not fit. Needs root (CI and the dev machines are)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_full_disk_is_one_line_and_leaves_nothing(tiny, small_disk):
    (small_disk / "keep.txt").write_text("an earlier file")
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(tiny[0]), "--recipe", "rtn-w4",
                        "--out", str(small_disk / "ckpt")], capture_output=True, text=True, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(errors) == 1 and "No space left on device" in errors[0], r.stderr[-2000:]
    assert set(p.name for p in small_disk.iterdir()) <= {"keep.txt", ".ckpt.lock", "ckpt"}  # no .ckpt.new-* left
    if (small_disk / "ckpt").exists():  # only the finished blocks, for --resume once there is room
        assert [p.name for p in (small_disk / "ckpt").iterdir()] == [".progress"]
    assert (small_disk / "keep.txt").read_text() == "an earlier file"


def test_read_only_disk_is_refused_before_the_model_loads(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        code = ("import sys\nfrom lowbit import cli\nsys.argv = ['lowbit', 'quantize', 'smollm2-135m', '--recipe', "
                f"'rtn-w4', '--out', {str(mount / 'ckpt')!r}]\ntry:\n    cli.main()\nexcept SystemExit as e:\n"
                "    print(e.code, 'torch' in sys.modules)")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert r.stdout.split() == ["2", "False"] and f"cannot write in {mount}" in r.stderr, r.stdout + r.stderr
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
