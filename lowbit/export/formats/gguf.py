"""``--format gguf``: a llama.cpp model file whose quantized linears are lowbit's own codes.

GGUF's Q4_0 / Q4_1 / Q8_0 blocks are 32 weights along a row with one float16 step (and for Q4_1 a float16
minimum). lowbit's groups of 32 — or of any multiple of 32, or one per row — map onto them block by block:
symmetric 4-bit → Q4_0 (``d·(q − 8)``, the same floats as lowbit's), asymmetric 4-bit → Q4_1
(``d·q + m`` with ``m = −d·zero`` rounded to float16: within float16 rounding), symmetric 8-bit → Q8_0
(``d·(q − 128)``, exact). Other widths need llama.cpp's 256-weight K-quants, whose codes lowbit does not
produce.

Everything else comes from the source model's own GGUF file: its metadata and tokenizer, and every tensor
lowbit did not quantize, copied as stored (after checking that lowbit's copy of it is unchanged). llama.cpp
stores a Llama model's q/k rows in an interleaved rotary order; those layers' rows are permuted to match.
Block layouts checked against ``gguf.quants`` (``docs/experiments/2026-12-07-export-formats.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.errors import LowbitError
from lowbit.export.formats.source import Source, refusal, symmetric, uniform_layers
from lowbit.grids import natural_group_index
from lowbit.runtime import QuantLinear

NAME = "gguf"
BLOCK = 32
PERMUTED_QK = {"llama"}  # llama.cpp's converter interleaves the rotary halves of q/k rows for these
# A permuted or misnamed layer is off by about the weight itself (relative error ~1.4); 4- and 8-bit
# rounding by far less (< 0.2 even at 4 bits per channel).
MAX_REL_ERROR = 0.5


@dataclass(frozen=True)
class Block:
    """How one layer goes into GGUF: its block type and the row order llama.cpp expects."""

    kind: str  # Q4_0 | Q4_1 | Q8_0
    rows: torch.Tensor  # GGUF row r is lowbit's row rows[r]


def source_gguf(src: Source) -> Path:
    """The GGUF file the checkpoint was quantized from, or a one-line error."""
    from lowbit.models.aliases import ALIASES

    base = src.meta.get("base_model")
    if base in ALIASES:
        return ALIASES[base].gguf_path()
    if base and Path(base).is_file() and Path(base).suffix.lower() == ".gguf":
        return Path(base)
    raise LowbitError(f"--format gguf copies metadata, tokenizer and unquantized tensors from the source model's "
                      f"GGUF file, and {src.path} came from {base!r}: convert that model to GGUF with llama.cpp's "
                      "convert_hf_to_gguf.py and quantize the .gguf file, or use --format compressed-tensors")


def block_kind(name: str, m: QuantLinear) -> str:
    sym = symmetric(m)
    advice = ("quantize with the rtn-q4_0 or gptq-q4_0 preset (symmetric 4-bit, groups of 32), "
              "or use --format compressed-tensors")
    if m.g_idx is not None:
        raise refusal(NAME, "act-order group indices (g_idx)", [name], advice)
    if m.in_features % BLOCK or (m.group_size is not None and m.group_size % BLOCK):
        raise refusal(NAME, f"groups that are not whole blocks of {BLOCK} weights ({m.in_features} columns, groups of "
                      f"{m.group_size})", [name], advice)
    if m.bits == 4:
        return "Q4_0" if sym else "Q4_1"
    if m.bits == 8 and sym:
        return "Q8_0"
    raise refusal(NAME, f"{m.bits}-bit {'symmetric' if sym else 'asymmetric'} codes", [name], advice)


def qk_rows(n_rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's row order for a Llama q or k projection: within each head, the rotary halves
    ``[x0 … x(d/2-1) | y0 … y(d/2-1)]`` become pairs ``x0 y0 x1 y1 …``."""
    return torch.arange(n_rows).view(heads, 2, n_rows // heads // 2).transpose(1, 2).reshape(-1)


def encode(m: QuantLinear, block: Block) -> np.ndarray:
    """The layer's GGUF bytes, ``(rows, in/32 · block bytes)`` uint8: lowbit's codes, unchanged."""
    qw = m.quantized()
    codes = qw.codes[block.rows].to(torch.int64)
    per_block = natural_group_index(m.in_features, m.group_size)[::BLOCK]
    scale = qw.scale[block.rows][:, per_block]
    rows, n_blocks = scale.shape
    d = scale.to(torch.float16).view(torch.uint8).view(rows, n_blocks, 2)
    q = codes.view(rows, n_blocks, BLOCK)
    if block.kind == "Q8_0":
        parts = [d, (q - 128).to(torch.int8).view(torch.uint8)]
    else:  # low nibble: weight j, high nibble: weight j + 16
        nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
        parts = [d, nibbles]
        if block.kind == "Q4_1":
            zero = qw.zero[block.rows][:, per_block]
            m_min = (-scale * zero).to(torch.float16).view(torch.uint8).view(rows, n_blocks, 2)
            parts = [d, m_min, nibbles]
    return torch.cat(parts, dim=2).reshape(rows, -1).numpy()


def plan(src: Source, reader) -> dict[str, tuple[str, Block]]:
    """GGUF tensor name → (lowbit layer, how to encode it), checked against the source file."""
    import gguf

    layers = uniform_layers(src, NAME)
    arch = _arch(reader)
    cfg = src.model.config
    names = gguf.get_tensor_name_map(_model_arch(arch), cfg.num_hidden_layers)
    present = {t.name for t in reader.tensors}
    out = {}
    for name, m in layers.items():
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target is None or target not in present:
            raise refusal(NAME, "a layer the source GGUF file does not hold", [name], "use --format dense")
        rows = torch.arange(m.out_features)
        if arch in PERMUTED_QK and name.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if name.endswith("q_proj") else cfg.num_key_value_heads
            rows = qk_rows(m.out_features, heads)
        out[target] = (name, Block(block_kind(name, m), rows))
    return out


def _arch(reader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def _model_arch(arch: str):
    import gguf

    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise LowbitError(f"the gguf package does not know the architecture '{arch}': upgrade it (pip install -U gguf)")


def check(src: Source) -> None:
    import gguf

    plan(src, gguf.GGUFReader(str(source_gguf(src))))


def _check_unchanged(src: Source, reader) -> None:
    """GGUF names of the source tensors lowbit left as they were (compared with the source model as
    ``transformers`` reads it): those are copied as stored; a changed one (a folded smoothing scale)
    cannot be, and is refused."""
    import gguf

    from lowbit.models import load_model

    base, _ = load_model(src.meta["base_model"])
    names = gguf.get_tensor_name_map(_model_arch(_arch(reader)), src.model.config.num_hidden_layers)
    mine = src.float_tensors()
    theirs = base.state_dict()
    changed = []
    for key, value in mine.items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            continue
        if key not in theirs or not torch.equal(theirs[key].to(value.dtype), value):
            changed.append(key)
    if changed:
        raise refusal(NAME, "float tensors the recipe changed (smoothing or a transform folded into them)", changed,
                      "GGUF export copies those from the source file: use --format dense")


def write(src: Source, out: Path) -> None:
    import gguf

    path = source_gguf(src)
    reader = gguf.GGUFReader(str(path))
    layers = plan(src, reader)
    _check_unchanged(src, reader)
    arch = _arch(reader)
    target = out / f"{path.stem.split('.')[0]}-{src.recipe_name}.gguf"
    writer = gguf.GGUFWriter(str(target), arch)
    # the file's "mostly" type names its smallest block kind: llama.cpp only prints it
    kinds = {block.kind for _, block in layers.values()}
    smallest = next(k for k in ("Q4_0", "Q4_1", "Q8_0") if k in kinds)
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{smallest}")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", gguf.Keys.General.FILE_TYPE):
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    writer.add_file_type(file_type)
    for tensor in reader.tensors:
        if tensor.name in layers:
            name, block = layers[tensor.name]
            data = encode(src.layers[name], block)
            weight = _decode(data, block.kind)
            _check_close(tensor, weight, name)
            writer.add_tensor(tensor.name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, block.kind))
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _decode(data: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, kind))


def _check_close(tensor, weight: np.ndarray, name: str) -> None:
    """The exported layer against the source file's own: a wrong row order or name is far off."""
    import gguf

    ref = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
    rel = float(np.linalg.norm(weight - ref) / max(np.linalg.norm(ref), 1e-12))
    if rel > MAX_REL_ERROR:
        raise LowbitError(f"--format gguf: {name} comes out {rel:.2f} away from the source file's {tensor.name} "
                          "(relative error): its layout is not one this exporter knows; use --format dense")
