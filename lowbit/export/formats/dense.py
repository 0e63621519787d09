"""``--format dense``: the dequantized float model as a plain Hugging Face checkpoint.

Loads anywhere and saves no memory: the last resort for what no serving format expresses (SpQR outliers,
binary layers, QuIP's Kronecker transforms). Every packed layer becomes the float weight lowbit's own
reference path computes with (transforms undone, low-rank branches added). Activation quantizers do not
travel: the consumer runs activations in float, which is said when the export is written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowbit.export.formats.source import Source, layer_bias, refusal
from lowbit.runtime import BinaryLinear

NAME = "dense"
log = logging.getLogger("lowbit")


def check(src: Source) -> None:
    plain = src.plain_linears()
    odd = [n for n in src.layers if n not in plain]
    if odd:
        raise refusal(NAME, "layers that transformers does not build as nn.Linear (GPT-2 Conv1D, fused experts)",
                      odd, "load it with lowbit.load_model")
    norms = (src.meta.get("activations") or {}).get("reordered_norms") or {}
    if norms:
        raise refusal(NAME, "RPTQ's reordered channels", sorted(norms), "load it with lowbit.load_model")


def write(src: Source, out: Path) -> None:
    from lowbit.export.formats.hf_folder import write_hf_folder

    check(src)
    quantizers = (src.meta.get("activations") or {}).get("quantizers") or {}
    if quantizers:
        log.warning("%d activation quantizers of %s are not part of a dense export: its activations run in float",
                    len(quantizers), src.recipe_name)
    tensors = src.float_tensors()
    for name, m in src.layers.items():
        with torch.no_grad():
            weight = m.dense_weight() if isinstance(m, BinaryLinear) else m.quantized().weight()
        tensors[f"{name}.weight"] = weight.to(src.dtype).contiguous()
        bias = layer_bias(m)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().to(src.dtype)
    write_hf_folder(src, out, tensors, {})
