"""``lowbit quantize``: a model and a recipe to a checkpoint (whole, or block by block with ``--onload``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import typer

from lowbit import faults
from lowbit.cli.common import (
    app,
    check_device,
    check_windows,
    check_writable,
    log,
    parse_datasets,
    parse_size,
    ppl_table,
    torch_device,
)
from lowbit.data.sources import check_data_available
from lowbit.errors import LowbitError
from lowbit.models.resolve import resolve
from lowbit.phases import Phases


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
    eval_ppl: str = typer.Option("", "--eval", help="also report perplexity before/after, e.g. wikitext2,c4 or "
                                 "a .txt / .jsonl file"),
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
    rec = rec.with_overrides(calibration=dataclasses.replace(rec.calibration, **overrides))
    rec.validate()
    datasets = parse_datasets(eval_ppl)
    check_windows(windows)
    check_device(device)
    check_writable(out, "--out")
    if hessian_cache is not None:
        check_writable(hessian_cache, "--hessian-cache")
    exported = _export_target(out, export)
    torch_dtype = _dtype(dtype)
    limit = parse_size(max_memory, "--max-memory") if max_memory is not None else None
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



def _quantize_onloaded(ref, rec, out: Path, device: Optional[str], resume: bool, dtype, limit: Optional[int],
                       phases: Phases) -> None:
    """``lowbit quantize --onload``: block by block from the model's files, each block to OUT as it is done."""
    with phases("imports"):
        from lowbit.api import calibration_for, quantize_to_disk
        from lowbit.models.loading import load_tokenizer, model_folder
        from lowbit.models.onload import DiskModel, peak_need

        dev = torch_device(device)
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
        from lowbit.api import calibration_for, load_model
        from lowbit.atomic import atomic_write_text
        from lowbit.eval import perplexity
        from lowbit.export import save
        from lowbit.pipeline import quantize_model

        dev = torch_device(device)
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
            result = quantize_model(m, rec, calib, progress_dir=progress, resume=resume, hessian_cache=hessian_cache)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; finished blocks are kept in {progress}: rerun with --resume", err=True)
        raise typer.Exit(130)
    report = result.report
    if report.resumed_blocks:
        log.info("resumed %d finished blocks from %s", report.resumed_blocks, progress)
    with phases("save"):
        save(result, out, tok)  # replaces OUT whole: the finished blocks in OUT/.progress go with it
    typer.echo(f"saved {rec.name} checkpoint to {out} (quantization {report.total_seconds:.1f} s, "
               f"peak {report.peak_memory_mb:.0f} MB by its end)")
    _print_report(rec, report, out)
    if datasets:
        with phases("eval of the quantized model"):
            rows[rec.name] = {d: perplexity(m, tok, d, windows=windows).ppl for d in datasets}
        atomic_write_text(out / "eval.json", json.dumps({"windows": windows, "perplexity": rows}, indent=1))
        typer.echo(ppl_table(rows, datasets))


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



