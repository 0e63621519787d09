"""``lowbit quantize | eval | compare | inspect | export-lora | recipes`` — the command line over the same API."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from lowbit.data.sources import check_data_available
from lowbit.errors import LowbitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training quantization of LLMs.")
log = logging.getLogger("lowbit")


def _datasets(spec: str) -> list[str]:
    from lowbit.data import DATASETS

    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in DATASETS:
            raise LowbitError(f"unknown dataset '{n}' (known: {', '.join(DATASETS)})")
    return names


def _check_windows(windows: Optional[int]) -> None:
    if windows is not None and windows <= 0:
        raise LowbitError(f"--windows must be a positive integer, got {windows}")


def _device(name: Optional[str]):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LowbitError(f"unknown device '{name}' (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LowbitError(f"device '{name}' asked for, but no CUDA GPU is available")
    return dev


def _ppl_table(rows: dict[str, dict[str, float]], datasets: list[str]) -> str:
    head = "model".ljust(24) + "".join(f"{d:>12s}" for d in datasets)
    lines = [head] + [name.ljust(24) + "".join(f"{vals[d]:12.3f}" for d in datasets) for name, vals in rows.items()]
    return "\n".join(lines)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="alias (smollm2-135m, gemma3-270m), local dir or Hugging Face id"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="preset name or YAML/TOML file"),
    out: Path = typer.Option(..., "--out", "-o", help="output directory for the packed checkpoint"),
    nsamples: Optional[int] = typer.Option(None, help="calibration samples (recipe default: 128)"),
    seqlen: Optional[int] = typer.Option(None, help="calibration sample length in tokens"),
    seed: Optional[int] = typer.Option(None, help="calibration sampling seed"),
    sampling: Optional[str] = typer.Option(None, help="documents (GPTQ) or concat"),
    resume: bool = typer.Option(False, help="continue an interrupted run from its last finished block"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe key, e.g. --set weights.act_order=false"),
    eval_ppl: str = typer.Option("", "--eval", help="also report perplexity before/after, e.g. wikitext2,c4"),
    windows: Optional[int] = typer.Option(None, help="evaluate only the first N windows (quick protocol)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 … (default: cuda if available)"),
    hessian_cache: Optional[Path] = typer.Option(
        None, help="directory where OAC's output-adaptive Hessians are kept and reused by later runs on "
                   "the same model and calibration set (the gradient pass then runs once for all of them)"),
) -> None:
    """Quantize MODEL with a recipe and write a packed checkpoint to OUT."""
    from lowbit import recipes
    from lowbit.api import calibration_for
    from lowbit.eval import perplexity
    from lowbit.export import save
    from lowbit.models import load_model
    from lowbit.pipeline import quantize_model

    rec = recipes.apply_overrides(recipes.get(recipe), set_)
    overrides = {k: v for k, v in dict(nsamples=nsamples, seqlen=seqlen, seed=seed, sampling=sampling).items() if v is not None}
    rec.calibration = dataclasses.replace(rec.calibration, **overrides)
    rec.validate()
    datasets = _datasets(eval_ppl)
    _check_windows(windows)
    dev = _device(device)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"--out {out} exists and is not a directory")
    if hessian_cache is not None and hessian_cache.exists() and not hessian_cache.is_dir():
        raise LowbitError(f"--hessian-cache {hessian_cache} exists and is not a directory")
    if datasets or rec.needs_calibration:
        check_data_available()

    m, tok = load_model(model)
    m.to(dev)
    rows: dict[str, dict[str, float]] = {}
    if datasets:
        rows["full precision"] = {d: perplexity(m, tok, d, windows=windows).ppl for d in datasets}
    calib = calibration_for(rec, tok, m) if rec.needs_calibration else None
    progress = out / ".progress"
    try:
        report = quantize_model(m, rec, calib, progress_dir=progress, resume=resume, hessian_cache=hessian_cache)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted; finished blocks are kept in {progress}: rerun with --resume", err=True)
        raise typer.Exit(130)
    if report.resumed_blocks:
        log.info("resumed %d finished blocks from %s", report.resumed_blocks, progress)
    save(m, out, tok, report)
    shutil.rmtree(progress, ignore_errors=True)
    typer.echo(f"saved {rec.name} checkpoint to {out} ({report.total_seconds:.1f} s, peak {report.peak_memory_mb:.0f} MB)")
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
    if datasets:
        rows[rec.name] = {d: perplexity(m, tok, d, windows=windows).ppl for d in datasets}
        (out / "eval.json").write_text(json.dumps({"windows": windows, "perplexity": rows}, indent=1))
        typer.echo(_ppl_table(rows, datasets))


def _checkpoint_log_dir(model: str) -> Optional[Path]:
    """A lowbit checkpoint's own per-window log: its files never change, so its results stay valid."""
    from lowbit.models.loading import CHECKPOINT_MARKER

    path = Path(model)
    return path / "eval-log" if (path / CHECKPOINT_MARKER).is_file() and os.access(path, os.W_OK) else None


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="checkpoint directory, alias, local dir or Hugging Face id"),
    ppl: Optional[str] = typer.Option(None, help="datasets, comma separated (default wikitext2,c4; none with --tasks)"),
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
) -> None:
    """Perplexity (and KL to the full model) of MODEL under the GPTQ protocol; zero-shot tasks with --tasks."""
    from lowbit.eval import evaluate_tasks, kl_divergence, perplexity
    from lowbit.models import load_model

    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    datasets = _datasets(ppl if ppl is not None else ("" if task_list else "wikitext2,c4"))
    _check_windows(windows)
    if seqlen < 2:
        raise LowbitError(f"--seqlen must be at least 2, got {seqlen}")
    if limit is not None and limit <= 0:
        raise LowbitError(f"--limit must be a positive integer, got {limit}")
    dev = _device(device)
    if datasets:
        check_data_available()
    if task_list:
        from lowbit.eval.harness import check_tasks

        check_tasks(task_list, task_path)  # before hours of perplexity, not after
    if log is not None and log.exists() and not log.is_dir():
        raise LowbitError(f"--log {log} exists and is not a directory")
    logs = None if no_log else (log or _checkpoint_log_dir(model))
    m, tok = load_model(model)
    m.to(dev)
    if keep_dequantized:
        from lowbit.runtime import keep_dequantized as keep

        keep(m)
    result: dict = {"model": model, "seqlen": seqlen, "perplexity": {}}
    for d in datasets:
        r = perplexity(m, tok, d, seqlen=seqlen, windows=windows, log=logs / f"{d}-{seqlen}.nll.json" if logs else None)
        result["perplexity"][d] = {"ppl": r.ppl, "tokens": r.tokens, "windows": r.windows}
    if kl and datasets:
        ref_name = kl_ref or getattr(m, "lowbit_source", None)
        if not ref_name:
            raise LowbitError("--kl needs --kl-ref: this model records no base model")
        ref, _ = load_model(ref_name)
        ref.to(m.device)
        result["kl"] = {d: kl_divergence(m, ref, tok, d, seqlen=seqlen, windows=windows,
                                         log=logs / f"{d}-{seqlen}.kl.json" if logs else None) for d in datasets}
    if task_list:
        out = evaluate_tasks(m, tok, task_list, include_path=task_path, limit=limit, num_fewshot=num_fewshot)
        result["tasks"] = out["results"]
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


@app.command("compare")
def compare_cmd(
    model: str = typer.Argument(..., help="alias (smollm2-135m, gemma3-270m), local dir or Hugging Face id"),
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
) -> None:
    """Run recipes and peers under one calibration set and protocol; write DIR/report.md and report.html."""
    from lowbit.compare import CompareConfig, run_compare

    if device is not None:
        _device(device)
    cfg = CompareConfig(model=model, recipes=[r.strip() for r in recipes_.split(",") if r.strip()],
                        peers=[p.strip() for p in peers.split(",") if p.strip()], overrides=list(set_),
                        nsamples=nsamples, calib_seqlen=seqlen, seed=seed, datasets=_datasets(ppl), windows=windows,
                        eval_seqlen=eval_seqlen, kl=kl, kl_windows=kl_windows, peer_scheme=peer_scheme, device=device).validate()
    if not cfg.datasets:
        raise LowbitError("--ppl needs at least one dataset")
    if jobs <= 0:
        raise LowbitError(f"--jobs must be a positive integer, got {jobs}")
    check_data_available()
    try:
        rows = run_compare(cfg, report, jobs_at_once=jobs, reuse=reuse)
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


@app.command("export-lora")
def export_lora_cmd(
    checkpoint: Path = typer.Argument(..., help="a lowbit checkpoint whose recipe has a lowrank branch"),
    out: Path = typer.Argument(..., help="directory for adapter_config.json + adapter_model.safetensors"),
) -> None:
    """Write the checkpoint's low-rank error branches as a PEFT LoRA adapter."""
    from lowbit.export import export_lora, load_quantized
    from lowbit.models.loading import CHECKPOINT_MARKER

    if not (checkpoint / CHECKPOINT_MARKER).exists():
        raise LowbitError(f"{checkpoint} is not a lowbit checkpoint (no {CHECKPOINT_MARKER})")
    model, _ = load_quantized(checkpoint)
    export_lora(model, out)
    typer.echo(f"wrote a LoRA adapter for {checkpoint} to {out}")


@app.command("recipes")
def list_recipes() -> None:
    """List the preset recipes."""
    from lowbit import recipes

    for name in recipes.presets():
        typer.echo(f"{name:16s} {recipes.get(name).description}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except LowbitError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
