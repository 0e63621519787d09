"""Models larger than memory: a random-weight Llama at a real shape, quantized and evaluated block by block.

Writes a Llama-architecture model with random bfloat16 weights at the shape of Llama-2-7B (hidden 4096, 32
blocks, intermediate 11008, vocab 32000; sharded safetensors, 13.5 GB) and a 32000-token BPE tokenizer trained
on WikiText-2: random values at real shapes measure memory and time, not quality. Then, for each recipe,
``lowbit quantize --onload`` (``--nsamples 4 --seqlen 512``) and ``lowbit eval --onload`` of one 512-token
window, each under ``/usr/bin/time -v`` for its peak resident memory. Recorded per row: peak memory, wall
time, time per block (the run's report), bytes written, the window's perplexity.

Rows are written to ``bench/results/scale-SHAPE.{json,md}`` as they land; a rerun skips finished rows and
resumes an interrupted quantization (``--resume``). The model and checkpoints live under ``runs/scale``.

    OMP_NUM_THREADS=1 python bench/scale.py --shape 7b
    # the tests' size
    OMP_NUM_THREADS=1 python bench/scale.py --shape ci --work runs/scale-ci --out runs/scale-ci/ci.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, blocks, intermediate, heads, kv heads, vocab
    "7b": (4096, 32, 11008, 32, 32, 32000),
    "1b": (2048, 22, 5632, 32, 4, 32000),  # TinyLlama-1.1B
    "ci": (1024, 24, 2816, 16, 4, 4096),  # the slow test tier's: 0.55 GB, 24 blocks of 23 MB
}
NSAMPLES, SEQLEN = 4, 512
MAX_SHARD = 2 * 2**30


def _config(shape: str):
    from transformers import LlamaConfig

    hidden, blocks, inter, heads, kv, vocab = SHAPES[shape]
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=blocks, intermediate_size=inter, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")


def _tokenizer(vocab: int):
    """A byte-level BPE of ``vocab`` tokens trained on WikiText-2 (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data.sources import wikitext2_test_rows

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(wikitext2_test_rows(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_model(shape: str, folder: Path) -> Path:
    """The random model, shard by shard (one block's tensors at a time in memory); a finished folder is kept."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(shape)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    n = 0

    def flush() -> None:
        nonlocal shard, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, folder / f".{name}.tmp", metadata={"format": "pt"})
        os.replace(folder / f".{name}.tmp", folder / name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, n = {}, n + 1

    for key, size in shapes.items():
        if key.endswith("norm.weight"):
            shard[key] = torch.ones(size, dtype=torch.bfloat16)
        else:
            shard[key] = (torch.randn(size, generator=gen) * 0.02).to(torch.bfloat16)
        if sum(t.numel() * 2 for t in shard.values()) >= MAX_SHARD:
            flush()
    if shard:
        flush()
    config.save_pretrained(folder)
    _tokenizer(config.vocab_size).save_pretrained(folder)
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=1))
    return folder


def _time_v(argv: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """``python ARGV`` under ``/usr/bin/time -v``: the result, wall seconds and peak resident MB."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, *argv], check=False, capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    return r, wall, int(m.group(1)) / 1024 if m else float("nan")


def timed(args: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """``lowbit ARGS`` under ``/usr/bin/time -v``."""
    return _time_v(["-m", "lowbit.cli", *args])


def baseline_mb() -> float:
    """Peak resident memory of a process that imports what ``lowbit quantize`` does and holds no weight."""
    return _time_v(["-c", "import torch, transformers, lowbit.api, lowbit.cli, lowbit.export.write, "
                          "lowbit.models.onload"])[2]


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def run_row(model: Path, recipe: str, ckpt: Path) -> dict:
    from lowbit.pipeline.resume import VERSION as RESUME_VERSION

    quant = ["quantize", str(model), "--recipe", recipe, "--out", str(ckpt), "--onload", "--nsamples", str(NSAMPLES),
             "--seqlen", str(SEQLEN)]
    manifest = ckpt / ".progress" / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("version", 1) == RESUME_VERSION:
        quant.append("--resume")  # an interrupted run: its finished blocks are kept (another version's: afresh)
    r, wall, peak = timed(quant)
    if r.returncode:
        raise SystemExit(f"quantize {recipe} failed:\n{r.stderr[-3000:]}")
    report = json.loads((ckpt / "report.json").read_text())
    e, eval_wall, eval_peak = timed(["eval", str(ckpt), "--onload", "--ppl", "wikitext2", "--windows", "1",
                                     "--seqlen", str(SEQLEN), "--json"])
    if e.returncode:
        raise SystemExit(f"eval {recipe} failed:\n{e.stderr[-3000:]}")
    ppl = json.loads(e.stdout.strip().splitlines()[-1])["perplexity"]["wikitext2"]["ppl"]
    blocks = report["block_seconds"]
    return {"recipe": recipe, "peak_mb": round(peak), "wall_s": round(wall, 1),
            "quant_s": round(report["total_seconds"], 1), "capture_s": round(report.get("capture_seconds", 0.0), 1),
            "block_s_mean": round(sum(blocks) / len(blocks), 2), "block_s_max": round(max(blocks), 2),
            "written_mb": round(_bytes(ckpt) / 2**20), "resumed_blocks": report.get("resumed_blocks", 0),
            "eval_peak_mb": round(eval_peak), "eval_s": round(eval_wall, 1), "eval_ppl_1x512": round(ppl, 1)}


def _table(result: dict) -> str:
    m = result["model"]
    lines = [f"# Block-by-block quantization at the {result['shape']} shape (random bfloat16 weights)", "",
             f"Model: hidden {m['hidden']}, {m['blocks']} blocks, intermediate {m['intermediate']}, "
             f"vocab {m['vocab']}; {m['params'] / 1e9:.2f}B parameters, {m['bytes'] / 2**30:.2f} GB of bfloat16 in "
             f"safetensors shards; one block {m['block_bytes'] / 2**20:.0f} MB. Calibration {NSAMPLES} x {SEQLEN} "
             f"tokens of C4; evaluation: one {SEQLEN}-token WikiText-2 window, block by block. "
             f"Machine: {result['machine']}. A process that only imports torch, transformers and lowbit peaks at "
             f"{result['baseline_mb']} MB.", "",
             "| recipe | peak RSS (MB) | peak / model | wall (s) | s per block (mean / max) | written (MB) "
             "| eval peak (MB) | eval (s) | ppl of the window |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['recipe']} | {r['peak_mb']} | {r['peak_mb'] * 2**20 / m['bytes']:.2f} | {r['wall_s']} | "
                     f"{r['block_s_mean']} / {r['block_s_max']} | {r['written_mb']} | {r['eval_peak_mb']} | "
                     f"{r['eval_s']} | {r['eval_ppl_1x512']} |")
    lines += ["", "Random weights: the perplexity only shows that the packed checkpoint reloads and runs, "
              "not its quality.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    ap.add_argument("--recipes", default="rtn-w4g128,gptq-w4g128")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "scale")
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default bench/results/scale-SHAPE.json)")
    args = ap.parse_args()
    out = args.out or REPO / "bench" / "results" / f"scale-{args.shape}.json"
    model = write_model(args.shape, args.work / f"model-{args.shape}")
    hidden, blocks, inter, _, _, vocab = SHAPES[args.shape]
    files = list(model.glob("*.safetensors"))
    from lowbit.models.onload import DiskModel

    disk = DiskModel(model)
    params = sum(p.numel() for p in disk.model.parameters())
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(shape=args.shape, machine=f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS="
                  f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, no GPU",
                  model={"hidden": hidden, "blocks": blocks, "intermediate": inter, "vocab": vocab, "params": params,
                         "bytes": sum(p.stat().st_size for p in files), "block_bytes": disk.block_bytes()})
    result.setdefault("rows", [])
    result.setdefault("baseline_mb", round(baseline_mb()))
    for recipe in args.recipes.split(","):
        if any(r["recipe"] == recipe for r in result["rows"]):
            continue
        row = run_row(model, recipe, args.work / f"ckpt-{args.shape}-{recipe}")
        result["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(_table(result))
        print(json.dumps(row), flush=True)
    print(_table(result))


if __name__ == "__main__":
    main()
