"""``lowbit eval``: perplexity, KL to the full model and lm-eval tasks, of a model or a checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import app, check_device, check_windows, check_writable, parse_datasets, torch_device
from lowbit.data.sources import check_data_available, source_label
from lowbit.errors import LowbitError
from lowbit.models.resolve import resolve
from lowbit.phases import Phases
from lowbit.recipes.schema import MAX_SEQLEN


def _checkpoint_log_dir(model: str) -> Optional[Path]:
    """A lowbit checkpoint's own per-window log: its files never change, so its results stay valid."""
    from lowbit.models.resolve import CHECKPOINT_MARKER

    path = Path(model)
    return path / "eval-log" if (path / CHECKPOINT_MARKER).is_file() and os.access(path, os.W_OK) else None


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="checkpoint directory, alias, local dir, GGUF file or Hugging Face id"),
    ppl: Optional[str] = typer.Option(None, help="wikitext2, c4, ptb or .txt / .jsonl files, comma separated "
                                      "(default wikitext2,c4; none with --tasks)"),
    windows: Optional[int] = typer.Option(None, help="only the first N windows (default: full protocol)"),
    seqlen: int = typer.Option(2048, help="window length in tokens"),
    kl: bool = typer.Option(False, "--kl", help="also KL divergence to the unquantized base model"),
    kl_ref: Optional[str] = typer.Option(None, help="reference model for --kl (default: the checkpoint's base)"),
    tasks: Optional[str] = typer.Option(None, help="lm-evaluation-harness tasks, comma separated (extra 'eval')"),
    task_path: Optional[Path] = typer.Option(None, help="folder of local task YAMLs for --tasks"),
    limit: Optional[int] = typer.Option(None, help="only the first N documents of each task"),
    num_fewshot: Optional[int] = typer.Option(None, help="few-shot examples per task (default: the task's)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda if available)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object on stdout"),
    log: Optional[Path] = typer.Option(
        None, help="keep each finished window here, so that a rerun resumes and --windows N reads a longer "
                   "run's first N (default: DIR/eval-log for a lowbit checkpoint DIR)"),
    no_log: bool = typer.Option(False, "--no-log", help="keep no per-window log"),
    keep_dequantized: bool = typer.Option(
        False, "--keep-dequantized", help="rebuild each packed layer's weight once and keep it: faster on many "
                                          "windows, memory of the unquantized model; same numbers"),
    kernels: bool = typer.Option(
        False, "--kernels", help="bfloat16 activations, and PyTorch's CPU int4/int8 kernels for 4-bit and "
                                 "per-channel 8-bit packed layers (faster decoding; numbers to bfloat16 rounding)"),
    onload: bool = typer.Option(False, "--onload", help="read one block at a time from disk, every window through "
                                "it before the next (models larger than memory; perplexity only, no per-window log)"),
) -> None:
    """Perplexity (and KL to the full model) of MODEL under the GPTQ protocol; zero-shot tasks with --tasks."""
    phases = Phases()
    if onload:
        given = {"--kl": kl, "--tasks": tasks, "--kernels": kernels, "--keep-dequantized": keep_dequantized,
                 "--log": log}
        if clash := [flag for flag, value in given.items() if value]:
            raise LowbitError(f"--onload evaluates perplexity block by block; {clash[0]} needs the whole model")
        no_log = True
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    datasets = parse_datasets(ppl if ppl is not None else ("" if task_list else "wikitext2,c4"))
    check_windows(windows)
    if not 2 <= seqlen <= MAX_SEQLEN:
        raise LowbitError(f"--seqlen must be an integer from 2 to {MAX_SEQLEN}, got {seqlen}")
    if limit is not None and limit <= 0:
        raise LowbitError(f"--limit must be a positive integer, got {limit}")
    check_device(device)
    if log is not None:
        check_writable(log, "--log")
    if task_list:
        from lowbit.eval.harness import check_tasks

        check_tasks(task_list, task_path)  # before hours of perplexity, not after
    ref = resolve(model)
    if kl and kl_ref:
        resolve(kl_ref)
    if datasets:
        check_data_available()
    logs = None if no_log else (log or _checkpoint_log_dir(model))
    if logs is not None and datasets:
        typer.echo(f"per-window log: {logs} (a rerun reads finished windows from it; --no-log keeps none)", err=True)
    with contextlib.ExitStack() as held:
        if logs is not None:
            from lowbit.locks import run_lock

            held.enter_context(run_lock(logs, "--log"))
        result = _evaluate(ref, model, datasets, seqlen, windows, logs, kl, kl_ref, keep_dequantized, kernels,
                           task_list, task_path, limit, num_fewshot, device, phases, onload)
    typer.echo(phases.summary(), err=True)  # stderr: stdout stays one JSON object with --json
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    for d, r in result["perplexity"].items():
        extra = f"  KL {result['kl'][d]:.4f}" if "kl" in result else ""
        typer.echo(f"{d:10s} ppl {r['ppl']:10.3f}  ({r['windows']} windows, {r['tokens']} tokens){extra}")
    for task, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        typer.echo(f"{task:20s} {shown}")


def _evaluate_onloaded(ref, model: str, datasets: list[str], seqlen: int, windows: Optional[int], dev,
                       phases: Phases) -> dict:
    """``lowbit eval --onload``: perplexity with one block in memory at a time."""
    from lowbit.eval import perplexity

    with phases("load"):
        if ref.kind == "checkpoint":
            from lowbit.export.load import DiskCheckpoint, checkpoint_tokenizer

            disk = DiskCheckpoint(ref.path, device=dev)
            tok = checkpoint_tokenizer(ref.path, disk.meta)
            if tok is None:
                raise LowbitError(f"{ref.path} has no tokenizer and its base model's cannot be found")
        else:
            from lowbit.models.loading import load_tokenizer, model_folder
            from lowbit.models.onload import DiskModel

            folder, _ = model_folder(ref)
            disk, tok = DiskModel(folder, device=dev), load_tokenizer(folder)
    result: dict = {"model": model, "seqlen": seqlen, "perplexity": {}}
    for d in datasets:
        with phases(f"{d} perplexity"):
            r = perplexity(disk, tok, d, seqlen=seqlen, windows=windows)
        result["perplexity"][d] = {"ppl": r.ppl, "tokens": r.tokens, "windows": r.windows}
    return result


def _base_model(ref, m) -> str | None:
    """The model a checkpoint was quantized from (its lowbit_config.json says), or a float model's own source."""
    from lowbit.export.load import checkpoint_meta
    from lowbit.models.source import source_of

    return checkpoint_meta(m).get("base_model") if ref.kind == "checkpoint" else source_of(m)


def _evaluate(ref, model: str, datasets: list[str], seqlen: int, windows: Optional[int], logs: Optional[Path],
              kl: bool, kl_ref: Optional[str], keep_dequantized: bool, kernels: bool, task_list: list[str],
              task_path: Optional[Path], limit: Optional[int], num_fewshot: Optional[int],
              device: Optional[str], phases: Phases, onload: bool = False) -> dict:
    """The work of ``lowbit eval`` once its input is known to be good (and its log is ours)."""
    with phases("imports"):  # torch and transformers: seconds, counted like the rest
        from lowbit.api import load_model
        from lowbit.eval import evaluate_tasks, kl_divergence, perplexity

        dev = torch_device(device)
    if onload:
        return _evaluate_onloaded(ref, model, datasets, seqlen, windows, dev, phases)
    with phases("load"):
        import torch

        m, tok = load_model(ref, dtype=torch.bfloat16 if kernels else None)  # the CPU kernels' fast inputs
        m.to(dev)
        if keep_dequantized:
            from lowbit.runtime import keep_dequantized as keep

            keep(m)
        if kernels:
            from lowbit.runtime.build import use_kernels

            chosen = list(use_kernels(m).values())
            typer.echo("back-ends: " + ", ".join(f"{b} {chosen.count(b)}" for b in sorted(set(chosen))) + " layers",
                       err=True)
    result: dict = {"model": model, "seqlen": seqlen, "perplexity": {}}
    # windows computed by kernels differ from the reference path's by float rounding: a log of their own
    backend = ".kernels" if kernels else ""
    for d in datasets:
        with phases(f"{d} perplexity"):
            r = perplexity(m, tok, d, seqlen=seqlen, windows=windows,
                           log=logs / f"{source_label(d)}-{seqlen}{backend}.nll.json" if logs else None)
        result["perplexity"][d] = {"ppl": r.ppl, "tokens": r.tokens, "windows": r.windows}
    if kl and datasets:
        ref_name = kl_ref or _base_model(ref, m)
        if not ref_name:
            raise LowbitError("--kl needs --kl-ref: this model records no base model")
        with phases("KL"):
            base, _ = load_model(ref_name)
            base.to(m.device)
            result["kl"] = {d: kl_divergence(m, base, tok, d, seqlen=seqlen, windows=windows,
                                             log=logs / f"{source_label(d)}-{seqlen}{backend}.kl.json"
                                             if logs else None)
                             for d in datasets}
    if task_list:
        with phases("tasks"):
            out = evaluate_tasks(m, tok, task_list, include_path=task_path, limit=limit, num_fewshot=num_fewshot)
        result["tasks"] = out["results"]
    return result


