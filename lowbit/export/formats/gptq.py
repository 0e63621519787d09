"""``--format gptq``: the GPTQ checkpoint layout (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx`` and
``quantize_config.json``) that ``transformers`` loads through optimum + GPTQModel, and vLLM serves.

``qweight`` packs each output column's unsigned codes along the input dimension (LSB-first int32 words,
the same stream as compressed-tensors' rows, transposed); ``scales`` are float16 ``(groups, out)``;
``g_idx`` gives each input column's group, so act-order and a smaller last group need nothing special.
Zero points are stored minus one (the original GPTQ "v1" convention) unless some zero point is 0,
which v1 cannot hold — then the file says ``checkpoint_format: gptq_v2`` (true zero points, which
GPTQModel reads). Layout: ``docs/experiments/2026-12-07-export-formats.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.export.formats.source import Source, refusal, symmetric, uniform_layers
from lowbit.grids.packing import pack_rows_int32
from lowbit.runtime import QuantLinear

NAME = "gptq"
BITS = (2, 3, 4, 8)


def check(src: Source) -> dict:
    """The one ``quantization_config`` every layer shares, or a one-line error."""
    layers = uniform_layers(src, NAME)
    shared = {(m.bits, m.group_size) for m in layers.values()}
    if len(shared) > 1:
        raise refusal(NAME, f"layers of different widths or group sizes ({sorted(shared, key=str)})",
                      list(src.layers), "use --format compressed-tensors or dense")
    (bits, group_size), = shared
    for name, m in layers.items():
        if bits not in BITS:
            raise refusal(NAME, f"{bits}-bit codes (GPTQ holds {', '.join(map(str, BITS))})", [name],
                          "use --format dense")
        if (m.in_features * bits) % 32 or (m.out_features * bits) % 32:
            raise refusal(NAME, f"a {m.out_features}×{m.in_features} layer at {bits} bits (rows and columns "
                          "must fill whole 32-bit words)", [name], "use --format compressed-tensors or dense")
    v1 = all(bool(torch.all(m.zero_points() >= 1)) for m in layers.values())
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size or -1,
            "desc_act": any(m.g_idx is not None for m in layers.values()),
            "sym": all(symmetric(m) for m in layers.values()),
            "checkpoint_format": "gptq" if v1 else "gptq_v2", "static_groups": False, "true_sequential": True,
            "damp_percent": 0.01, "pack_dtype": "int32", "meta": {"quantizer": ["lowbit:0.1.0"]}}


def layer_tensors(m: QuantLinear, v1: bool) -> dict[str, torch.Tensor]:
    qw = m.quantized()
    zero = qw.zero.round().to(torch.int64) - (1 if v1 else 0)
    tensors = {
        "qweight": pack_rows_int32(qw.codes.to(torch.int64), m.bits).t().contiguous(),  # packed along inputs
        "qzeros": pack_rows_int32(zero.t().contiguous(), m.bits),
        "scales": qw.scale.t().to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }
    if m.bias is not None:
        tensors["bias"] = m.bias.detach().to(torch.float16)
    return tensors


def write(src: Source, out: Path) -> None:
    from lowbit.export.formats.hf_folder import write_hf_folder

    config = check(src)
    v1 = config["checkpoint_format"] == "gptq"
    tensors = src.float_tensors()
    for name, m in src.layers.items():
        for key, value in layer_tensors(m, v1).items():
            tensors[f"{name}.{key}"] = value
    write_hf_folder(src, out, tensors, {"quantization_config": config})
    (out / "quantize_config.json").write_text(json.dumps(config, indent=2) + "\n")
