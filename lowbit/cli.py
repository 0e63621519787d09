"""``lowbit quantize | eval | compare | inspect | export-lora | recipes`` — the command line over the same API."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from lowbit import faults
from lowbit.data.sources import check_data_available, source_label
from lowbit.errors import LowbitError
from lowbit.models.resolve import resolve
from lowbit.phases import Phases
from lowbit.recipes.schema import MAX_SEQLEN

# Everything here validates its input before torch or transformers are imported (seconds of CPU
# and 500 MB), so that a typo costs a fraction of a second; heavy imports sit inside the commands.
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Post-training quantization of LLMs: GPTQ, QuIP, OAC, RPTQ, ASER and baselines.")
log = logging.getLogger("lowbit")
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
USER_FIXABLE_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"lowbit {version('lowbit')}")
        except PackageNotFoundError:  # run from a checkout that is not installed
            from lowbit import __version__

            typer.echo(f"lowbit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print lowbit's version and exit")) -> None:
    """Options that come before the command."""


def _datasets(spec: str) -> list[str]:
    """Named sets and text files, comma separated; each checked (a file: readable, of a known kind)."""
    from lowbit.data.sources import check_dataset

    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        check_dataset(n)
    return names


def _check_windows(windows: Optional[int]) -> None:
    if windows is not None and windows <= 0:
        raise LowbitError(f"--windows must be a positive integer, got {windows}")


def _check_device(name: Optional[str]) -> None:
    """The device's spelling, checked without torch; whether it exists is checked by :func:`_device`."""
    if name is not None and not DEVICE.fullmatch(name):
        raise LowbitError(f"unknown device '{name}' (cpu, cuda, cuda:N)")


def _device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"device '{name}' asked for, but no CUDA GPU is available")
    return dev


def _check_writable(path: Path, flag: str) -> None:
    """An output folder (or the nearest folder above it that exists) must be a folder we may write."""
    if path.exists() and not path.is_dir():
        raise LowbitError(f"{flag} {path} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LowbitError(f"{flag} {path}: cannot write in {existing}")


def _ppl_table(rows: dict[str, dict[str, float]], datasets: list[str]) -> str:
    head = "model".ljust(24) + "".join(f"{d:>12s}" for d in datasets)
    lines = [head] + [name.ljust(24) + "".join(f"{vals[d]:12.3f}" for d in datasets) for name, vals in rows.items()]
    return "\n".join(lines)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="alias (smollm2-135m, gemma3-270m), local dir, GGUF file or Hugging Face id"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="preset name or YAML/TOML file"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory for the packed checkpoint"),
    nsamples: Optional[int] = typer.Option(None, help="calibration samples (recipe default: 128)"),
    seqlen: Optional[int] = typer.Option(None, help="calibration sample length in tokens"),
    seed: Optional[int] = typer.Option(None, help="calibration sampling seed"),
    sampling: Optional[str] = typer.Option(None, help="documents (GPTQ) or concat"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last finished block"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the lowbit checkpoint that OUT holds"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set weights.act_order=false"),
    eval_ppl: str = typer.Option("", "--eval", help="also report perplexity before/after, e.g. wikitext2,c4 or a .txt / .jsonl file"),
    windows: Optional[int] = typer.Option(None, help="evaluate only the first N windows (quick protocol)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda if available)"),
    hessian_cache: Optional[Path] = typer.Option(
        None, help="directory where OAC's output-adaptive Hessians are kept and reused by later runs on "
                   "the same model and calibration set (the gradient pass then runs once for all of them)"),
    export: Optional[str] = typer.Option(None, "--export", help="also export the checkpoint to OUT-FORMAT: "
                                         "compressed-tensors, gptq, gguf or dense (see `lowbit export`)"),
    onload: bool = typer.Option(False, "--onload", help="read one block at a time from the model's safetensors "
                                "files and write each to OUT when done: models larger than memory"),
    dtype: Optional[str] = typer.Option(None, help="dtype the weights are held in: float32, bfloat16 or float16 "
                                        "(default: float32; with --onload, the files' own)"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="with --onload: refuse, before any work, "
                                             "a model one block of which needs more than this (e.g. 4GB)"),
) -> None:
    """Quantize MODEL with a recipe and write a packed checkpoint to OUT."""
    from lowbit import recipes
    from lowbit.atomic import recover
    from lowbit.export.folder import check_replaceable, holds_checkpoint
    from lowbit.locks import run_lock

    phases = Phases()
    rec = recipes.apply_overrides(recipes.get(recipe), set_)
    given = dict(nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling)
    overrides = {k: v for k, v in given.items() if v is not None}
    rec.calibration = dataclasses.replace(rec.calibration, **overrides)
    rec.validate()
    datasets = _datasets(eval_ppl)
    _check_windows(windows)
    _check_device(device)
    _check_writable(out, "--out")
    if hessian_cache is not None:
        _check_writable(hessian_cache, "--hessian-cache")
    exported = _export_target(out, export)
    torch_dtype = _dtype(dtype)
    limit = _size(max_memory, "--max-memory") if max_memory is not None else None
    if limit is not None and not onload:
        raise LowbitError("--max-memory applies to --onload (one block at a time); add --onload")
    if onload and datasets:
        raise LowbitError("--eval needs the whole model in memory; with --onload, evaluate the checkpoint with "
                          "`lowbit eval OUT --onload`")
    if onload and hessian_cache is not None:
        raise LowbitError("--hessian-cache is for OAC's gradient pass, which --onload does not run")
    ref = resolve(model)
    if datasets or rec.needs_calibration:
        check_data_available()
    with run_lock(out):
        recover(out)  # a save killed between its two renames: the previous checkpoint goes back in place
        check_replaceable(out)
        if holds_checkpoint(out) and not overwrite:
            raise LowbitError(f"--out {out} holds a lowbit checkpoint: pass --overwrite to replace it "
                              "(its evaluation results go with it)")
        if onload:
            _quantize_onloaded(ref, rec, out, device, resume, torch_dtype, limit, phases)
        else:
            _quantize(ref, rec, out, datasets, windows, device, resume, hessian_cache, phases, torch_dtype)
        if exported is not None:
            from lowbit.export.formats import export_checkpoint

            with phases("export"):
                try:
                    export_checkpoint(out, exported, export)
                except LowbitError as exc:
                    raise LowbitError(f"the checkpoint is saved in {out}; its export failed: {exc}") from None
            typer.echo(f"exported it as {export} to {exported}")
    typer.echo(phases.summary())


def _export_target(out: Path, fmt: Optional[str]) -> Optional[Path]:
    """Where ``--export FORMAT`` writes (``OUT-FORMAT``), checked before any work."""
    if fmt is None:
        return None
    from lowbit.export.formats import format_module

    format_module(fmt)
    target = out.with_name(f"{out.name}-{fmt}")
    if target.exists():
        raise LowbitError(f"--export writes to {target}, which exists: move it away or export with `lowbit export`")
    return target


DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: Optional[str]):
    """``--dtype``'s torch dtype (imported only when one is named)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise LowbitError(f"--dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    import torch

    return getattr(torch, name)


def _size(text: str, flag: str) -> int:
    """``4GB``, ``512MB``, ``2.5G`` or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m or float(m.group(1)) <= 0:
        raise LowbitError(f"{flag} must be a size such as 4GB or 512MB, got '{text}'")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def _quantize_onloaded(ref, rec, out: Path, device: Optional[str], resume: bool, dtype, limit: Optional[int],
                       phases: Phases) -> None:
    """``lowbit quantize --onload``: block by block from the model's files, each block to OUT as it is done."""
    with phases("imports"):
        from lowbit.api import calibration_for, quantize_to_disk
        from lowbit.models.loading import load_tokenizer, model_folder
        from lowbit.models.onload import DiskModel, peak_need

        dev = _device(device)
    with phases("load"):
        folder, source = model_folder(ref)
        disk = DiskModel(folder, dtype=dtype, device=dev)
        tok = load_tokenizer(folder)
    c = rec.calibration
    parts = disk.memory_need(c.nsamples if rec.needs_calibration else 0, c.seqlen)
    need = peak_need(parts)
    typer.echo(f"onloading one block at a time in {str(disk.dtype).removeprefix('torch.')}: about "
               f"{need / 2**30:.2f} GB at most (" + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items()) + ")")
    if limit is not None and need > limit:
        raise LowbitError(f"one block needs about {need / 2**30:.2f} GB, more than --max-memory "
                          f"{limit / 2**30:.2f} GB (block weights {parts['block weights'] / 2**30:.2f} GB, "
                          f"calibration activations {parts['calibration activations'] / 2**30:.2f} GB): fewer "
                          "--nsamples or a shorter --seqlen lower the second")
    with phases("calibration set"):
        calib = calibration_for(rec, tok, disk.model) if rec.needs_calibration else None
    faults.reach("calibration")
    try:
        with phases("quantization and save"):
            report = quantize_to_disk(folder, rec, out, calib=calib, tokenizer=tok, dtype=dtype, device=dev,
                                      resume=resume, source_name=source, disk=disk)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; finished blocks are kept in {out / '.progress'}: rerun with --resume", err=True)
        raise typer.Exit(130)
    typer.echo(f"saved {rec.name} checkpoint to {out} block by block (quantization {report.total_seconds:.1f} s, "
               f"peak {report.peak_memory_mb:.0f} MB)")
    _print_report(rec, report, out)


def _quantize(ref, rec, out: Path, datasets: list[str], windows: Optional[int], device: Optional[str],
              resume: bool, hessian_cache: Optional[Path], phases: Phases, dtype=None) -> None:
    """The work of ``lowbit quantize`` once its input is known to be good and OUT is ours."""
    with phases("imports"):  # torch and transformers: seconds, counted like the rest
        from lowbit.api import calibration_for
        from lowbit.atomic import atomic_write_text
        from lowbit.eval import perplexity
        from lowbit.export import save
        from lowbit.models import load_model
        from lowbit.pipeline import quantize_model

        dev = _device(device)
    with phases("load"):
        m, tok = load_model(ref, dtype=dtype)
        m.to(dev)
    rows: dict[str, dict[str, float]] = {}
    if datasets:
        with phases("eval of the full model"):
            rows["full precision"] = {d: perplexity(m, tok, d, windows=windows).ppl for d in datasets}
    with phases("calibration set"):
        calib = calibration_for(rec, tok, m) if rec.needs_calibration else None
    faults.reach("calibration")
    progress = out / ".progress"
    try:
        with phases("quantization"):
            report = quantize_model(m, rec, calib, progress_dir=progress, resume=resume, hessian_cache=hessian_cache)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; finished blocks are kept in {progress}: rerun with --resume", err=True)
        raise typer.Exit(130)
    if report.resumed_blocks:
        log.info("resumed %d finished blocks from %s", report.resumed_blocks, progress)
    with phases("save"):
        save(m, out, tok, report)  # replaces OUT whole: the finished blocks in OUT/.progress go with it
    typer.echo(f"saved {rec.name} checkpoint to {out} (quantization {report.total_seconds:.1f} s, "
               f"peak {report.peak_memory_mb:.0f} MB by its end)")
    _print_report(rec, report, out)
    if datasets:
        with phases("eval of the quantized model"):
            rows[rec.name] = {d: perplexity(m, tok, d, windows=windows).ppl for d in datasets}
        atomic_write_text(out / "eval.json", json.dumps({"windows": windows, "perplexity": rows}, indent=1))
        typer.echo(_ppl_table(rows, datasets))


def _print_report(rec, report, out: Path) -> None:
    if report.hessian_pass:
        hp = report.hessian_pass
        typer.echo(f"output-adaptive Hessian pass: {hp['seconds']:.1f} s, peak {hp['peak_memory_mb']:.0f} MB"
                   + (f" (an earlier run's, read from {hp['cache']})" if hp.get("reused") else ""))
    if report.activation_quantizers:
        a = rec.activations
        typer.echo(f"activations: {a.bits}-bit, KV cache {a.kv_bits}-bit, {a.granularity} ranges"
                   f"{' (reordered)' if a.reorder and a.granularity == 'cluster' else ''}; "
                   f"{report.activation_quantizers} quantizers calibrated in {report.activation_seconds:.1f} s")
    if report.layers:
        typer.echo(f"largest relative layer errors (all layers in {out / 'report.json'}):\n{report.worst()}")


def _checkpoint_log_dir(model: str) -> Optional[Path]:
    """A lowbit checkpoint's own per-window log: its files never change, so its results stay valid."""
    from lowbit.models.resolve import CHECKPOINT_MARKER

    path = Path(model)
    return path / "eval-log" if (path / CHECKPOINT_MARKER).is_file() and os.access(path, os.W_OK) else None


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="checkpoint directory, alias, local dir, GGUF file or Hugging Face id"),
    ppl: Optional[str] = typer.Option(None, help="wikitext2, c4, ptb or .txt / .jsonl files, comma separated (default wikitext2,c4; none with --tasks)"),
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
    datasets = _datasets(ppl if ppl is not None else ("" if task_list else "wikitext2,c4"))
    _check_windows(windows)
    if not 2 <= seqlen <= MAX_SEQLEN:
        raise LowbitError(f"--seqlen must be an integer from 2 to {MAX_SEQLEN}, got {seqlen}")
    if limit is not None and limit <= 0:
        raise LowbitError(f"--limit must be a positive integer, got {limit}")
    _check_device(device)
    if log is not None:
        _check_writable(log, "--log")
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


def _evaluate(ref, model: str, datasets: list[str], seqlen: int, windows: Optional[int], logs: Optional[Path],
              kl: bool, kl_ref: Optional[str], keep_dequantized: bool, kernels: bool, task_list: list[str],
              task_path: Optional[Path], limit: Optional[int], num_fewshot: Optional[int],
              device: Optional[str], phases: Phases, onload: bool = False) -> dict:
    """The work of ``lowbit eval`` once its input is known to be good (and its log is ours)."""
    with phases("imports"):  # torch and transformers: seconds, counted like the rest
        from lowbit.eval import evaluate_tasks, kl_divergence, perplexity
        from lowbit.models import load_model

        dev = _device(device)
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
        ref_name = kl_ref or getattr(m, "lowbit_source", None)
        if not ref_name:
            raise LowbitError("--kl needs --kl-ref: this model records no base model")
        with phases("KL"):
            base, _ = load_model(ref_name)
            base.to(m.device)
            result["kl"] = {d: kl_divergence(m, base, tok, d, seqlen=seqlen, windows=windows,
                                             log=logs / f"{source_label(d)}-{seqlen}{backend}.kl.json" if logs else None)
                             for d in datasets}
    if task_list:
        with phases("tasks"):
            out = evaluate_tasks(m, tok, task_list, include_path=task_path, limit=limit, num_fewshot=num_fewshot)
        result["tasks"] = out["results"]
    return result


@app.command("compare")
def compare_cmd(
    model: str = typer.Argument(..., help="alias (smollm2-135m, gemma3-270m), local dir, GGUF file or Hugging Face id"),
    recipes_: str = typer.Option("", "--recipes", help="lowbit recipes, comma separated (presets or YAML/TOML files)"),
    peers: str = typer.Option("", help="peer toolkits, e.g. hqq,autoround@w3g128 (extra 'peers')"),
    peer_scheme: str = typer.Option("w4g128", help="weight format of a peer named without @scheme"),
    report: Path = typer.Option(..., "--report", help="report directory (results are cached there)"),
    nsamples: int = typer.Option(128, help="calibration samples, the same for every row"),
    seqlen: int = typer.Option(2048, help="calibration sample length in tokens"),
    seed: int = typer.Option(0, help="calibration sampling seed"),
    ppl: str = typer.Option("wikitext2,c4", help="evaluation datasets"),
    windows: Optional[int] = typer.Option(None, help="only the first N windows (default: full protocol)"),
    eval_seqlen: int = typer.Option(2048, help="evaluation window length"),
    kl: bool = typer.Option(True, help="KL to the full model on the first dataset"),
    kl_windows: Optional[int] = typer.Option(None, help="KL on the first N windows only (default: as --windows)"),
    set_: list[str] = typer.Option([], "--set", help="override a key in every recipe"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda if available)"),
    jobs: int = typer.Option(1, help="rows run side by side, one process each, sharing the cores' threads"),
    reuse: list[Path] = typer.Option([], "--reuse", help="an earlier report's results.json: its rows whose "
                                     "recipe and protocol are unchanged are taken from it, not run again"),
    executor: str = typer.Option("local", help="local (processes here, --jobs at once) or ray (each row a Ray "
                                 "task; the report directory on a file system every node sees)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to join (default: RAY_ADDRESS, else a "
                                              "new local cluster)"),
    row_cpus: int = typer.Option(1, help="with --executor ray: CPUs (and threads) each row declares"),
    row_gpus: float = typer.Option(0.0, help="with --executor ray: GPUs each row declares"),
    row_memory: Optional[str] = typer.Option(None, help="with --executor ray: memory each row declares, e.g. 8GB"),
) -> None:
    """Run recipes and peers under one calibration set and protocol; write DIR/report.md and report.html."""
    from lowbit.compare import CompareConfig

    _check_device(device)
    cfg = CompareConfig(model=model, recipes=[r.strip() for r in recipes_.split(",") if r.strip()],
                        peers=[p.strip() for p in peers.split(",") if p.strip()], overrides=list(set_),
                        nsamples=nsamples, calib_seqlen=seqlen, seed=seed, datasets=_datasets(ppl), windows=windows,
                        eval_seqlen=eval_seqlen, kl=kl, kl_windows=kl_windows, peer_scheme=peer_scheme, device=device).validate()
    if not cfg.datasets:
        raise LowbitError("--ppl needs at least one dataset")
    if jobs <= 0:
        raise LowbitError(f"--jobs must be a positive integer, got {jobs}")
    if executor not in ("local", "ray"):
        raise LowbitError(f"--executor must be local or ray, got '{executor}'")
    if row_cpus <= 0 or row_gpus < 0:
        raise LowbitError("--row-cpus must be a positive integer and --row-gpus not negative")
    ray = None
    if executor == "ray":
        from lowbit.compare.runner import RayExecutor

        ray = RayExecutor(ray_address, row_cpus, row_gpus, _size(row_memory, "--row-memory") if row_memory else None)
        ray.check()
    check_data_available()
    if device is not None:
        _device(device)
    from lowbit.compare import run_compare
    from lowbit.locks import run_lock

    try:
        with run_lock(report, "--report"):
            rows = run_compare(cfg, report, jobs_at_once=jobs, reuse=reuse, executor=ray)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; finished rows are cached in {report}: rerun the same command to continue", err=True)
        raise typer.Exit(130)
    failed = [r for r in rows if r.get("status") != "ok"]
    typer.echo((report / "report.md").read_text())
    typer.echo(f"report: {report / 'report.md'}, {report / 'report.html'}"
               + (f" ({len(failed)} row(s) not ok: see the status column)" if failed else ""))


@app.command("inspect")
def inspect_cmd(checkpoint: Path = typer.Argument(..., help="a lowbit checkpoint directory")) -> None:
    """What a saved checkpoint holds: recipe, per-layer bits, sizes and errors."""
    from lowbit.export.inspect import inspect_checkpoint

    typer.echo(inspect_checkpoint(checkpoint).table())


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="a lowbit checkpoint directory"),
    out: Path = typer.Argument(..., help="a new directory for the exported model"),
    fmt: str = typer.Option(..., "--format", "-f", help="compressed-tensors | gptq | gguf | dense"),
) -> None:
    """Write a checkpoint in a format other tools serve: compressed-tensors (transformers, vLLM), GPTQ
    (transformers + GPTQModel, vLLM), GGUF (llama.cpp) or dense (plain float weights, loads anywhere)."""
    from lowbit.export.formats import export_checkpoint, format_module

    format_module(fmt)  # an unknown format is named before the checkpoint is read
    _check_writable(out, "OUT")
    written = export_checkpoint(checkpoint, out, fmt)
    size = sum(p.stat().st_size for p in written.rglob("*") if p.is_file())
    typer.echo(f"wrote {checkpoint} as {fmt} to {written} ({size / 2**20:.1f} MB)")


@app.command("export-lora")
def export_lora_cmd(
    checkpoint: Path = typer.Argument(..., help="a lowbit checkpoint whose recipe has a lowrank branch"),
    out: Path = typer.Argument(..., help="directory for adapter_config.json + adapter_model.safetensors"),
) -> None:
    """Write the checkpoint's low-rank error branches as a PEFT LoRA adapter."""
    from lowbit.models.resolve import CHECKPOINT_MARKER

    if not (checkpoint / CHECKPOINT_MARKER).exists():
        raise LowbitError(f"{checkpoint} is not a lowbit checkpoint (no {CHECKPOINT_MARKER})")
    _check_writable(out, "OUT")
    from lowbit.export import export_lora, load_quantized

    model, _ = load_quantized(checkpoint)
    export_lora(model, out)
    typer.echo(f"wrote a LoRA adapter for {checkpoint} to {out}")


@app.command("recipes")
def list_recipes(
    name: Optional[str] = typer.Argument(None, help="a preset: print its full description and YAML"),
) -> None:
    """The preset recipes as a table; with NAME, one preset in full."""
    import textwrap

    import yaml

    from lowbit import recipes

    if name is not None:
        rec = recipes.get(name)
        typer.echo(textwrap.fill(f"{rec.name}: {rec.description}", width=100) + "\n")
        typer.echo(yaml.safe_dump(rec.to_dict(), sort_keys=False, allow_unicode=True).rstrip())
        return
    rows = [_recipe_row(recipes.get(n)) for n in recipes.presets()]
    head = ("recipe", "weights", "activations", "calibration", "method")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    typer.echo("\n`lowbit recipes NAME` prints one preset in full (description and YAML).")


def _recipe_row(rec) -> tuple[str, str, str, str, str]:
    """One line per preset, derived from its sections (nothing to keep in step with the YAML)."""
    w, a, t, h, sm, lr = rec.weights, rec.activations, rec.transform, rec.hessian, rec.smoothing, rec.lowrank
    weights = "float" if w.method == "none" else f"W{w.bits}" + (f"g{w.group_size}" if w.group_size else "")
    acts = "-" if not a.enabled else f"A{a.bits}" + (f" KV{a.kv_bits}" if a.kv_bits < 16 else "") + f" {a.granularity}"
    calib = f"{rec.calibration.nsamples}×{rec.calibration.seqlen}" if rec.needs_calibration else "none"
    parts = [{"ldlq": "LDLQ", "billm": "BiLLM"}.get(w.method, w.method.upper())]
    parts += [f"incoherence ({t.incoherence})"] if t.incoherence != "none" else []
    parts += ["OAC Hessian"] if h.source == "output_adaptive" else []
    parts += ["act-order"] if w.act_order else []
    parts += ["clip search"] if w.clip_search else []
    parts += [f"greedy ×{w.greedy_passes}"] if w.greedy_passes else []
    parts += [f"{w.outlier_fraction:.0%} outliers"] if w.outlier_fraction else []
    parts += [f"smoothing α={sm.alpha}"] if sm.alpha is not None else []
    parts += [f"{sm.outliers} outlier columns"] if sm.outliers else []
    parts += [("whitened " if lr.whiten else "") + "low-rank"] if lr.enabled else []
    parts += ["reordered clusters"] if a.enabled and a.granularity == "cluster" and a.reorder else []
    return rec.name, weights, acts, calib, ", ".join(parts)


def _one_line(message: str, limit: int = 500) -> str:
    """A message may quote what the user gave (a huge --set value): one line, and not a screenful."""
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def main() -> None:
    # lowbit's own messages once, on stderr; other libraries keep their own logging set-up
    # (a root handler here printed every hub warning twice)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        code = app(standalone_mode=False)  # usage errors come back to us, to be printed as one line
    except click.UsageError as exc:
        hint = f" (see: lowbit {exc.ctx.info_name if exc.ctx and exc.ctx.parent else ''} --help)".replace("  ", " ")
        typer.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except LowbitError as exc:
        typer.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in USER_FIXABLE_OS_ERRORS:
            raise
        typer.echo(f"error: {exc.strerror}: {exc.filename or 'a file lowbit writes'} (free space or choose another "
                   "folder; nothing was left half-written)", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
