"""``lowbit compare | inspect | export | export-lora | recipes``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lowbit.cli.common import app, check_device, check_writable, parse_datasets, parse_size, torch_device
from lowbit.data.sources import check_data_available
from lowbit.errors import LowbitError


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

    check_device(device)
    cfg = CompareConfig(model=model, recipes=[r.strip() for r in recipes_.split(",") if r.strip()],
                        peers=[p.strip() for p in peers.split(",") if p.strip()], overrides=list(set_),
                        nsamples=nsamples, calib_seqlen=seqlen, seed=seed, datasets=parse_datasets(ppl),
                        windows=windows, eval_seqlen=eval_seqlen, kl=kl, kl_windows=kl_windows,
                        peer_scheme=peer_scheme, device=device).validate()
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

        memory = parse_size(row_memory, "--row-memory") if row_memory else None
        ray = RayExecutor(ray_address, row_cpus, row_gpus, memory)
        ray.check()
    check_data_available()
    if device is not None:
        torch_device(device)
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
    check_writable(out, "OUT")
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
    check_writable(out, "OUT")
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
    indent = sum(widths) + 2 * len(widths)
    for r in [head, *rows]:  # the method column wraps under itself, between its parts, past 120 characters
        method = [""]
        for part in r[-1].split(", "):
            if method[-1] and len(method[-1]) + len(part) + 3 > 120 - indent:  # ", " and a comma
                method[-1] += ","
                method.append("")
            method[-1] += (", " if method[-1] else "") + part
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + method[0])
        for more in method[1:]:
            typer.echo(" " * indent + more)
    typer.echo("\n`lowbit recipes NAME` prints one preset in full (description and YAML).")


def _recipe_row(rec) -> tuple[str, str, str, str, str]:
    """One line per preset, derived from its sections (nothing to keep in step with the YAML)."""
    w, a, t, h, sm, lr = rec.weights, rec.activations, rec.transform, rec.hessian, rec.smoothing, rec.lowrank
    weights = "float" if w.method == "none" else f"W{w.bits}" + (f"g{w.group_size}" if w.group_size else "")
    acts = "-" if not a.enabled else f"A{a.bits}" + (f" KV{a.kv_bits}" if a.kv_bits < 16 else "") + f" {a.granularity}"
    calib = f"{rec.calibration.nsamples}×{rec.calibration.seqlen}" if rec.needs_calibration else "none"
    parts = [f"rotated stream ({rec.rotation.kind})"] if rec.rotation.enabled else []
    parts += [{"ldlq": "LDLQ", "billm": "BiLLM"}.get(w.method, w.method.upper())]
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
    parts += [f"block-output tuning ×{rec.tuning.iters}"] if rec.tuning.enabled else []
    return rec.name, weights, acts, calib, ", ".join(parts)


