"""``lowbit compare`` / ``inspect`` / harness adapter, end to end on a tiny random Llama that uses
SmolLM2's real tokenizer (so the real WikiText-2 / C4 protocol runs, at 64-token windows)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit.recipes
from lowbit.compare import CompareConfig, WeightScheme, run_compare
from lowbit.compare.jobs import plan_jobs
from lowbit.compare.plots import pareto_front, spread_labels
from lowbit.compare.report import gap_ratios
from lowbit.data import data_dir
from lowbit.errors import LowbitError

needs_data = pytest.mark.skipif(data_dir() is None, reason="needs ../shared/data or LOWBIT_DATA")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2[1]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    smollm2[1].save_pretrained(path)
    return path


def _config(model: Path, **kw) -> CompareConfig:
    base = dict(model=str(model), recipes=["rtn-w4", "gptq-w4"], peers=["hqq", "llmcompressor-gptq"], nsamples=4,
                calib_seqlen=64, windows=2, eval_seqlen=64)
    return CompareConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def compared(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rows = run_compare(_config(tiny_dir), out, show_progress=False, jobs_at_once=2)  # two rows at a time
    return out, rows


def _md_table(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if not line.startswith("|---")]


@needs_data
def test_report_table_and_plots(compared):
    out, rows = compared
    table = _md_table((out / "report.md").read_text())
    head, body = table[0], table[1:]
    assert [r[0] for r in body] == ["fp", "rtn-w4", "gptq-w4", "hqq@w4g128", "llmcompressor-gptq@w4g128"]
    col = {h: i for i, h in enumerate(head)}
    for r in body[:3]:
        assert r[col["status"]] == "ok"
        float(r[col["wikitext2"]]), float(r[col["c4"]])  # numbers, not placeholders
        threads, at_once = r[col["threads / jobs"]].split(" / ")  # how its times were taken
        assert int(threads) >= 1 and at_once == "2"
    for r in body[1:3]:  # 4-bit codes + a float16 scale and a packed zero per row of 64 inputs
        assert float(r[col["eff. bits"]]) == pytest.approx(4 + (16 + 4) / 64, abs=0.05)
        assert float(r[col["KL"]]) >= 0 and float(r[col["ckpt MB"]]) > 0
    hqq = body[3][col["status"]]
    assert hqq == "ok" or hqq.startswith("unavailable: not installed")
    llmc = body[4][col["status"]]  # reported, not hidden: unavailable without its environment, else its own error
    if os.environ.get("LOWBIT_LLMCOMPRESSOR_PYTHON"):
        assert llmc == "ok" or "llm-compressor failed" in llmc  # groups of 128 do not divide 64 columns
    else:
        assert llmc.startswith("unavailable:") and "LOWBIT_LLMCOMPRESSOR_PYTHON" in llmc
    # the table's perplexities are the workers' results, rounded
    by_name = {r["name"]: r for r in rows}
    assert float(body[1][col["wikitext2"]]) == pytest.approx(by_name["rtn-w4"]["perplexity"]["wikitext2"], rel=1e-3)
    html = (out / "report.html").read_text()
    assert html.count("<tr>") == len(body) + 1 and "gptq-w4" in html
    for png in ("pareto.png", "layer_error.png", "block_time.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, png
        assert png in html
    assert "running" in (out / "compare.log").read_text()


@needs_data
def test_rerun_reuses_cache_and_a_changed_recipe_reruns(compared, tiny_dir):
    out, rows = compared
    ok = {r["name"] for r in rows if r["status"] == "ok"}  # an unavailable peer is tried again every time
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")
              if json.loads(p.read_text())["name"] in ok}
    again = run_compare(_config(tiny_dir), out, show_progress=False)
    assert ([r["perplexity"] for r in again if r["status"] == "ok"]
            == [r["perplexity"] for r in rows if r["status"] == "ok"])
    log = (out / "compare.log").read_text()
    assert log.count("reusing the cached result") >= 3  # fp, rtn-w4, gptq-w4 (hqq too when installed)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # the same rows with a different recipe key: every recipe row reruns, the full model does not
    changed = run_compare(_config(tiny_dir, peers=[], overrides=["weights.group_size=32"]), out, show_progress=False)
    gptq = next(r for r in changed if r["name"] == "gptq-w4")
    assert gptq["group_size"] == 32 and gptq["effective_bits"] > rows[2]["effective_bits"]
    assert (out / "runs" / "fp" / "result.json").stat().st_mtime_ns == mtimes[out / "runs" / "fp" / "result.json"]
    assert ((out / "runs" / "gptq-w4" / "result.json").stat().st_mtime_ns
            != mtimes[out / "runs" / "gptq-w4" / "result.json"])
    # only the evaluation changes: the recipe's stored blocks are evaluated again, not re-quantized
    fewer = run_compare(_config(tiny_dir, peers=[], overrides=["weights.group_size=32"], windows=1), out,
                        show_progress=False)
    again_gptq = next(r for r in fewer if r["name"] == "gptq-w4")
    assert again_gptq["resumed_blocks"] == 2 and again_gptq["layers"] == gptq["layers"]
    assert again_gptq["perplexity"] != gptq["perplexity"]


@needs_data
def test_rows_of_an_earlier_report_seed_a_new_one_only_where_the_key_holds(tiny_dir, tmp_path):
    cfg = _config(tiny_dir, recipes=["gptq-w4"], peers=[], windows=1)
    rows = run_compare(cfg, tmp_path / "first", show_progress=False)
    fresh = tmp_path / "fresh"
    again = run_compare(cfg, fresh, show_progress=False, reuse=[tmp_path / "first" / "results.json"])
    assert [(r["name"], r["perplexity"]) for r in again] == [(r["name"], r["perplexity"]) for r in rows]
    assert (fresh / "compare.log").read_text().count("reusing its row of an earlier report") == 2  # fp, gptq-w4
    assert sorted(p.name for p in (fresh / "runs" / "gptq-w4").iterdir()) == ["result.json"]  # nothing ran
    assert (tmp_path / "first" / "calibration.pt").exists() and not (fresh / "calibration.pt").exists()  # nor loaded
    # a changed recipe is not taken from the earlier report: it runs, and its key is its own
    changed = run_compare(_config(tiny_dir, recipes=["gptq-w4"], peers=[], windows=1,
                                  overrides=["weights.group_size=32"]),
                          tmp_path / "changed", show_progress=False, reuse=[tmp_path / "first" / "results.json"])
    assert changed[1]["group_size"] == 32 and changed[1]["key"] != rows[1]["key"]
    assert (tmp_path / "changed" / "compare.log").read_text().count("reusing its row of an earlier report") == 1  # fp


@needs_data
def test_output_adaptive_rows_run_one_gradient_pass_between_them(tiny_dir, tmp_path):
    """Two OAC rows side by side: one runs the gradient pass, the other waits for it and reads it."""
    rows = run_compare(_config(tiny_dir, recipes=["gptq-w2g64-oac", "oac-w2"], peers=[], windows=1, kl=False),
                       tmp_path, show_progress=False, jobs_at_once=2)
    passes = {r["name"]: r["hessian_pass"] for r in rows if r["kind"] == "recipe"}
    assert all(r["status"] == "ok" for r in rows)
    assert sorted(p["reused"] for p in passes.values()) == [False, True]
    assert (len({p["cache"] for p in passes.values()}) == 1
            and len(list((tmp_path / "hessians").glob("*.safetensors"))) == 1)


@needs_data
def test_inspect_reads_the_saved_checkpoint(compared):
    out, _ = compared
    ckpt = out / "runs" / "gptq-w4" / "checkpoint"
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "inspect", str(ckpt)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    layer_lines = [line for line in r.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(layer_lines) == 2 * 7
    assert "recipe gptq-w4" in r.stdout
    from lowbit.export.inspect import inspect_checkpoint

    s = inspect_checkpoint(ckpt)
    gptq = json.loads((out / "runs" / "gptq-w4" / "result.json").read_text())  # the row that wrote this checkpoint
    errors = {layer["name"]: layer["rel_output_error"] for layer in gptq["layers"]}
    assert {lay.name: lay.rel_output_error for lay in s.layers} == errors
    # stored bytes per weight: codes + scales + zeros (+ bias-free layers: nothing else)
    numel = sum(lay.shape[0] * lay.shape[1] for lay in s.layers)
    assert 8 * sum(lay.bytes for lay in s.layers) / numel == pytest.approx(gptq["effective_bits"], rel=0.02)


def test_plan_rejects_bad_input(tmp_path):
    with pytest.raises(LowbitError, match="unknown peer 'gptqmodel'"):
        plan_jobs(CompareConfig(model="x", recipes=[], peers=["gptqmodel"]))
    with pytest.raises(LowbitError, match=r"rows named twice: rtn-w4 \(from rtn-w4, rtn-w4\)$"):
        plan_jobs(CompareConfig(model="x", recipes=["rtn-w4", "rtn-w4"]))
    own = tmp_path / "mine.yaml"  # a recipe file labelled by its `name:`, clashing with a preset
    own.write_text((Path(lowbit.recipes.__file__).parent / "presets" / "rtn-w4.yaml").read_text())
    with pytest.raises(LowbitError, match=rf"rows named twice: rtn-w4 \(from rtn-w4, {re.escape(str(own))}\); "
                                          "a recipe file's row takes the file's `name:`"):
        plan_jobs(CompareConfig(model="x", recipes=["rtn-w4", str(own)]))
    with pytest.raises(LowbitError, match="unknown recipe"):
        plan_jobs(CompareConfig(model="x", recipes=["gptq-w9"]))
    for bad in ("w4g0", "4g128", "w9", "w4g-1"):
        with pytest.raises(LowbitError, match="weight scheme"):
            WeightScheme.parse(bad)
    assert WeightScheme.parse("W3G128") == WeightScheme(3, 128) and str(WeightScheme.parse("w2")) == "w2"
    # storage per weight, by hand: a 64×576 and a 64×1536 layer, 16-bit scale (+ 16-bit zero) per group
    layers = [torch.nn.Linear(576, 64), torch.nn.Linear(1536, 64)]
    g64 = (576 * (2 + 32 / 64) + 1536 * (2 + 32 / 64)) / (576 + 1536)
    assert WeightScheme(2, 64).mean_bits(layers) == pytest.approx(g64, rel=1e-12)
    per_row = (576 * (4 + 16 / 576) + 1536 * (4 + 16 / 1536)) / (576 + 1536)
    assert WeightScheme(4, None).mean_bits(layers, zero_point=False) == pytest.approx(per_row, rel=1e-12)
    with pytest.raises(LowbitError, match="nothing to compare"):
        CompareConfig(model="x", recipes=[]).validate()


def test_cache_key_follows_recipe_and_protocol():
    base = plan_jobs(CompareConfig(model="m", recipes=["gptq-w4"]))[1]
    proto = CompareConfig(model="m", recipes=[]).protocol()
    same = plan_jobs(CompareConfig(model="m", recipes=["gptq-w4"]))[1]
    assert base.key(proto) == same.key(proto)
    other = plan_jobs(CompareConfig(model="m", recipes=["gptq-w4"], overrides=["weights.damp=0.02"]))[1]
    assert other.key(proto) != base.key(proto)
    assert base.key({**proto, "windows": 3}) != base.key(proto)


def test_kl_windows_is_part_of_the_protocol_only_when_set():
    base = CompareConfig(model="m", recipes=["gptq-w4"])
    assert "kl_windows" not in base.protocol()  # caches written before the option existed stay valid
    capped = CompareConfig(model="m", recipes=["gptq-w4"], kl_windows=16)
    assert capped.protocol()["kl_windows"] == 16 and capped.kl_window_count() == 16
    assert CompareConfig(model="m", recipes=["x"], windows=8, kl_windows=16).kl_window_count() == 8
    assert base.kl_window_count() is None
    with pytest.raises(LowbitError, match="kl_windows must be a positive integer"):
        CompareConfig(model="m", recipes=["x"], kl_windows=0).validate()


def test_an_earlier_run_of_a_row_is_kept_only_where_it_still_holds(tmp_path):
    from lowbit.compare.runner import _resumable

    run = tmp_path / "row"

    def earlier(key: str, quant_key: str) -> None:
        for sub in ("progress", "eval"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        (run / "job.json").write_text(json.dumps({"key": key, "quant_key": quant_key}))

    earlier("k", "q")
    assert _resumable(run, "k", "q") and (run / "progress").exists() and (run / "eval").exists()
    assert _resumable(run, "k2", "q")  # the evaluation changed: quantized blocks stay, windows go
    assert (run / "progress").exists() and not (run / "eval").exists()
    earlier("k", "q")
    assert not _resumable(run, "k3", "q3")  # a changed recipe or calibration: its partial work is dropped
    assert not (run / "progress").exists() and not (run / "eval").exists()


def test_rows_side_by_side_share_the_cores(monkeypatch):
    from lowbit.compare.runner import _worker_env

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert _worker_env(2)["OMP_NUM_THREADS"] == "4" and "OMP_NUM_THREADS" not in _worker_env(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _worker_env(2)["OMP_NUM_THREADS"] == "3"  # the user's choice stands


def test_a_recipe_file_row_is_labelled_by_its_name_not_its_path(tmp_path):
    import yaml

    from lowbit import recipes

    path = tmp_path / "deep" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**recipes.get("gptq-w4").to_dict(), "name": "gptq-w4-mine"}))
    jobs = plan_jobs(CompareConfig(model="m", recipes=["rtn-w4", str(path)]))
    assert [j.name for j in jobs] == ["fp", "rtn-w4", "gptq-w4-mine"] and jobs[2].slug == "gptq-w4-mine"


def test_peer_cache_key_follows_its_environment_knobs(monkeypatch):
    """auto-round's iteration count comes from the environment; a row tuned for 10 iterations must
    not be reused for a run that asks for 200."""
    cfg = CompareConfig(model="m", recipes=[], peers=["autoround@w4g128"])
    proto = cfg.protocol()
    monkeypatch.delenv("LOWBIT_AUTOROUND_ITERS", raising=False)
    default = plan_jobs(cfg)[1]
    monkeypatch.setenv("LOWBIT_AUTOROUND_ITERS", "10")
    ten = plan_jobs(cfg)[1]
    assert ten.spec["env"] == {"LOWBIT_AUTOROUND_ITERS": "10"} and "env" not in default.spec
    assert ten.key(proto) != default.key(proto)
    monkeypatch.setenv("LOWBIT_AUTOROUND_ITERS", "200")
    assert plan_jobs(cfg)[1].key(proto) != ten.key(proto)
    monkeypatch.setenv("LOWBIT_AUTOROUND_ITERS", "50")  # auto-round's "light" recipe: 50 iterations at lr 5e-3
    light = plan_jobs(cfg)[1]
    monkeypatch.setenv("LOWBIT_AUTOROUND_LR", "5e-3")
    assert plan_jobs(cfg)[1].key(proto) != light.key(proto)


@pytest.mark.parametrize(("name", "raw"), [("LOWBIT_AUTOROUND_ITERS", "0"), ("LOWBIT_AUTOROUND_LR", "-1"),
                                           ("LOWBIT_AUTOROUND_LR", "fast")])
def test_autoround_knobs_refuse_bad_values(name, raw, monkeypatch):
    from lowbit.compare.peers import autoround_peer

    monkeypatch.setenv(name, raw)
    with pytest.raises(LowbitError, match=f"{name} must be a positive"):
        autoround_peer._iters(200) if name.endswith("ITERS") else autoround_peer._lr()


def test_pareto_front_and_gap_ratio():
    pts = [(4.2, 30.0), (3.2, 45.0), (4.5, 29.0), (4.3, 31.0), (2.2, 300.0), (3.3, 50.0)]
    assert pareto_front(pts) == [(2.2, 300.0), (3.2, 45.0), (4.2, 30.0), (4.5, 29.0)]
    rows = [{"name": "fp", "kind": "fp", "status": "ok", "perplexity": {"w": 20.0}},
            {"name": "a", "kind": "recipe", "status": "ok", "w_bits": 4, "a_bits": 16, "effective_bits": 4.1,
             "perplexity": {"w": 22.0}},
            {"name": "b", "kind": "recipe", "status": "ok", "w_bits": 4, "a_bits": 16, "effective_bits": 4.2,
             "perplexity": {"w": 21.0}},
            {"name": "big", "kind": "recipe", "status": "ok", "w_bits": 2, "a_bits": 16, "effective_bits": 2.96,
             "perplexity": {"w": 25.0}},  # 2-bit codes, but over the 2.3 budget: counts at 3.3 and 4.3 only
            {"name": "p", "kind": "peer", "status": "ok", "w_bits": 4, "a_bits": 16, "effective_bits": 4.25,
             "perplexity": {"w": 24.0}},
            {"name": "p2", "kind": "peer", "status": "ok", "w_bits": 2, "a_bits": 16, "effective_bits": 2.25,
             "perplexity": {"w": 40.0}},
            {"name": "q", "kind": "peer", "status": "failed: x", "w_bits": 4},
            {"name": "c", "kind": "recipe", "status": "ok", "w_bits": 4, "a_bits": 8, "effective_bits": 4.0,
             "perplexity": {"w": 20.5}}]
    by_budget = {g["budget"]: g for g in gap_ratios(rows, "w")}
    assert 2.3 not in by_budget  # no lowbit row within 2.3 bits: no ratio, rather than one against 2.96 bits
    assert (by_budget[3.3]["lowbit"], by_budget[3.3]["peer"]) == ("big", "p2")
    assert by_budget[3.3]["ratio"] == pytest.approx(5.0 / 20.0)
    assert (by_budget[4.3]["lowbit"], by_budget[4.3]["peer"]) == ("b", "p")
    assert by_budget[4.3]["ratio"] == pytest.approx(1.0 / 4.0)


def test_spread_labels_leaves_no_two_names_overlapping():
    # four 4-bit rows within a few pixels of each other (as in the SmolLM2 report), two far apart
    boxes = [(500.0, 100.0, 90.0, 10.0), (502.0, 103.0, 120.0, 10.0), (498.0, 99.0, 60.0, 10.0),
             (505.0, 101.0, 80.0, 10.0), (100.0, 100.0, 50.0, 10.0), (300.0, 400.0, 70.0, 10.0)]
    low = spread_labels(boxes)
    placed = [(x, y, w, h) for (x, _, w, h), y in zip(boxes, low)]
    for i, (x, y, w, h) in enumerate(placed):
        assert y >= boxes[i][1]  # names only move up from their point
        for px, py, pw, ph in placed[i + 1:]:
            assert not (x < px + pw and px < x + w and y < py + ph and py < y + h)
    assert low[4:] == [100.0, 400.0]  # a name that covers nothing stays beside its point
    assert max(low[:4]) - min(low[:4]) == pytest.approx(3 * 10.0, abs=3.0)  # stacked one above another


def test_compare_cli_errors_are_one_line(tmp_path):
    env = {**os.environ}
    for args, msg in ((["--peers", "nope"], "unknown peer 'nope'"), (["--peer-scheme", "w4g0"], "weight scheme"),
                      (["--nsamples", "0"], "nsamples must be a positive integer"),
                      (["--kl-windows", "0"], "kl_windows must be a positive integer"),
                      (["--jobs", "0"], "--jobs must be a positive integer"),
                      (["--reuse", str(tmp_path / "none.json")], "not a readable results.json")):
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", "compare", "x", "--recipes", "rtn-w4", "--report",
                            str(tmp_path), *args], capture_output=True, text=True, timeout=120, env=env)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and msg in errors[0], r.stderr


TASK_YAML = """task: lowbit_local_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
DOCS = [{"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Rome"], "answer": 0},
        {"question": "How many legs does a spider have?", "choices": ["six", "eight"], "answer": 1},
        {"question": "Which planet is closest to the Sun?", "choices": ["Mercury", "Venus", "Mars", "Earth"],
         "answer": 0}]


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), the harness's split: context tokens, then the rest of the whole."""
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def test_harness_scores_a_local_task_with_the_models_own_loglikelihoods(tmp_path, tiny_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    from lowbit.eval import evaluate_tasks
    from lowbit.models import load_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = tmp_path / "capitals.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "capitals.yaml").write_text(TASK_YAML.format(data=data))
    model, tok = load_model(tiny_dir)
    out = evaluate_tasks(model, tok, ["lowbit_local_capitals"], include_path=tasks, log_samples=True)
    samples = sorted(out["samples"]["lowbit_local_capitals"], key=lambda s: s["doc_id"])
    correct = 0
    for doc, sample in zip(DOCS, samples):
        ours = [_loglikelihood(model, tok, f"Question: {doc['question']}\nAnswer:", " " + c) for c in doc["choices"]]
        theirs = [r[0][0] for r in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct += int(max(range(len(ours)), key=ours.__getitem__) == doc["answer"])
    assert out["results"]["lowbit_local_capitals"]["acc,none"] == pytest.approx(correct / len(DOCS))
    with pytest.raises(LowbitError, match="unknown task"):
        evaluate_tasks(model, tok, ["no_such_task_xyz"], include_path=tasks)


def test_eval_cli_checks_tasks_before_loading_the_model(tmp_path):
    """A bad task name or folder is reported first (the model name here does not even exist)."""
    pytest.importorskip("lm_eval")
    for args, msg in ((["--tasks", "no_such_task_xyz", "--task-path", str(tmp_path)],
                       "unknown task(s) no_such_task_xyz"),
                      (["--tasks", "arc_easy", "--task-path", str(tmp_path / "missing")], "is not a directory")):
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "no-such-model-xyz", *args],
                           capture_output=True, text=True, timeout=300)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and msg in errors[0], r.stderr


def test_a_peer_whose_package_is_missing_is_unavailable_before_it_runs(monkeypatch, tmp_path):
    """The adapters import their toolkit lazily: a missing one is found before any work, and its row says
    how to install it (a clean `.[dev]` install has no peers)."""
    import dataclasses

    from lowbit.compare import peers

    fake = dataclasses.replace(peers.PEERS["hqq"], package="no_such_toolkit_xyz", requirement="xyz==1.0")
    monkeypatch.setitem(peers.PEERS, "hqq", fake)
    with pytest.raises(peers.PeerUnavailable, match=r"not installed \(no_such_toolkit_xyz\): pip install 'xyz==1.0'"):
        peers.run_peer("hqq", None, None, None, WeightScheme(4, 32), tmp_path)  # no model: nothing may run


@pytest.mark.skipif(not os.environ.get("LOWBIT_LLMCOMPRESSOR_PYTHON"),
                    reason="needs LOWBIT_LLMCOMPRESSOR_PYTHON: a Python with llmcompressor "
                           "(it pins an older transformers)")
@pytest.mark.parametrize("variant", ["llmcompressor-gptq", "llmcompressor-rtn", "llmcompressor-quip"])
def test_llmcompressor_peer_runs_in_its_own_environment(variant, tiny_dir, tmp_path):
    """The peer's effective weights come back on its grid (GPTQ/RTN: at most 2^bits levels per group;
    QuIP's are rotated off it) and close to the originals; a width its groups do not divide fails loudly."""
    from lowbit.compare.peers import decoder_linears, run_peer
    from lowbit.models import load_model

    model, tok = load_model(tiny_dir)
    before = {n: m.weight.clone() for n, m in decoder_linears(model).items()}
    calib = torch.randint(0, len(tok), (4, 32), generator=torch.Generator().manual_seed(0))
    extra = run_peer(variant, model, tok, calib, WeightScheme(4, 32), tmp_path / variant)
    assert extra["effective_bits"] == pytest.approx(4.5) and extra["peer_version"] != "?"
    for name, m in decoder_linears(model).items():
        rel = float((m.weight - before[name]).norm() / before[name].norm())
        assert 0 < rel < 0.25, name
        levels = max(len(torch.unique(g)) for g in m.weight.reshape(m.weight.shape[0], -1, 32).reshape(-1, 32))
        assert (levels <= 16) == (variant != "llmcompressor-quip"), name
    with pytest.raises(RuntimeError, match="llm-compressor failed: .*divisible"):
        run_peer(variant, load_model(tiny_dir)[0], tok, calib, WeightScheme(4, 48), tmp_path / "ragged")


def test_autoround_peer_resumes_a_killed_run_to_the_same_weights(tiny_dir, tmp_path, monkeypatch, caplog):
    """Killed after its first block, the row continues at the second and ends with exactly the
    weights of an uninterrupted run: the first block's weights come back (auto-round alone would
    leave them in float) and so does the random state that orders the second block's batches (two
    batches of 8 here, so the order matters). A rerun after tuning finished reuses its weights; a
    state that does not hold (a chain file cut short) starts afresh."""
    pytest.importorskip("auto_round")
    from auto_round.utils.resume import ResumeState

    from lowbit.compare.peers import decoder_linears, run_peer
    from lowbit.models import load_model

    monkeypatch.setenv("LOWBIT_AUTOROUND_ITERS", "30")
    monkeypatch.setenv("LOWBIT_AUTOROUND_LR", "5e-3")  # its "light" learning rate: the weights move
    tok = load_model(tiny_dir)[1]
    calib = torch.randint(0, len(tok), (16, 32), generator=torch.Generator().manual_seed(0))
    extras = []

    def weights(run_dir: Path) -> dict[str, torch.Tensor]:
        model = load_model(tiny_dir)[0]
        extras.append(run_peer("autoround", model, tok, calib, WeightScheme(4, 32), run_dir))
        return {n: m.weight.detach().clone() for n, m in decoder_linears(model).items()}

    whole = weights(tmp_path / "whole")
    assert extras[-1]["earlier_seconds"] == 0.0
    monkeypatch.setenv("LOWBIT_AUTOROUND_ITERS", "1")
    one_step = weights(tmp_path / "one-step")
    assert any(not torch.equal(whole[n], one_step[n]) for n in whole if ".layers.1." in n)  # tuning moved them
    monkeypatch.setenv("LOWBIT_AUTOROUND_ITERS", "30")

    mark = ResumeState.mark_block_done

    def killed_after_first(self, name, *args):
        mark(self, name, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(ResumeState, "mark_block_done", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        weights(tmp_path / "killed")
    state = tmp_path / "killed/progress/autoround"
    assert (state / "blocks/model.layers.0.safetensors").exists()
    tuned, heard = [], []
    monkeypatch.setattr(ResumeState, "mark_block_done",
                        lambda self, name, *a: (tuned.append(name), mark(self, name, *a)))
    listener = logging.Handler()
    listener.emit = lambda record: heard.append(record.getMessage())
    logging.getLogger("autoround").addHandler(listener)  # auto-round's logger does not propagate
    try:
        with caplog.at_level(logging.INFO, logger="lowbit.compare.peers.autoround_peer"):
            resumed = weights(tmp_path / "killed")
    finally:
        logging.getLogger("autoround").removeHandler(listener)
    assert tuned == ["model.layers.1"]  # the first block was not tuned again
    assert any("resuming after 1/2" in m for m in heard)  # auto-round's own resume line stays
    assert not any("have meta/empty weights" in m for m in heard)  # its warning that would be untrue here
    assert "restored the tuned weights and random state of 1 finished block(s)" in caplog.text
    assert extras[-1]["earlier_seconds"] > 0  # the killed run's first block counts in the row's time
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert not (state / "blocks").exists() and (state / "final.safetensors").exists()

    again = weights(tmp_path / "killed")  # stopped while evaluating: the tuning is not redone
    assert tuned == ["model.layers.1"] and extras[-1]["reused_tuning"]
    assert all(torch.equal(whole[n], again[n]) for n in whole)

    monkeypatch.setattr(ResumeState, "mark_block_done", killed_after_first)  # a chain file cut short
    with pytest.raises(KeyboardInterrupt):
        weights(tmp_path / "cut")
    (chain,) = (tmp_path / "cut/progress/autoround/auto-round/group_0").glob("resume_input_ids_*.pt")
    chain.write_bytes(chain.read_bytes()[:100])
    tuned.clear()
    monkeypatch.setattr(ResumeState, "mark_block_done",
                        lambda self, name, *a: (tuned.append(name), mark(self, name, *a)))
    afresh = weights(tmp_path / "cut")
    assert tuned == ["model.layers.0", "model.layers.1"] and extras[-1]["earlier_seconds"] == 0.0
    assert all(torch.equal(whole[n], afresh[n]) for n in whole)
