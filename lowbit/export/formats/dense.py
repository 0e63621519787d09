"""``--format dense``: the dequantized float model as a plain Hugging Face checkpoint.

Loads anywhere and saves no memory: the last resort for what no serving format expresses (SpQR outliers,
binary layers, QuIP's Kronecker transforms, RPTQ). Every packed layer becomes the float weight lowbit's own
reference path computes with (transforms undone, low-rank branches added, RPTQ's channel order undone).
Activation quantizers do not travel: the consumer runs activations in float, which is said when the export is
written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowbit.export.formats.source import LINEARIZED, Source, refusal
from lowbit.runtime import BinaryLinear
from lowbit.runtime.build import layer_bias

NAME = "dense"
log = logging.getLogger("lowbit")


def check(src: Source) -> None:
    odd = src.linearized()
    if odd:
        raise refusal(NAME, LINEARIZED, odd, "load it with lowbit.load_model")


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
    _undo_reordering(src, tensors)
    write_hf_folder(src, out, tensors, {})


def _undo_reordering(src: Source, tensors: dict[str, torch.Tensor]) -> None:
    """RPTQ's reordered norms put back in the original channel order, in place in ``tensors``.

    A reordered norm computes ``norm(x)[perm]`` (its weights stored permuted) and the linears it feeds take
    their input columns in that order, ``W[:, perm]``; with float activations the two cancel, so the plain
    model gets ``weight[argsort(perm)]`` and ``W'[:, argsort(perm)]``. (RPTQ's other permutations, of v rows
    and o columns, were folded into weights alone and already cancel.)"""
    from lowbit.models import find_blocks
    from lowbit.models.layout import block_layout
    from lowbit.surgery.reorder import ReorderedNorm

    path, blocks = find_blocks(src.model)
    for i, block in enumerate(blocks):
        layout = block_layout(block, src.model.config)
        for norm_name, consumers in ((layout.attn_norm, (layout.q, layout.k, layout.v)),
                                     (layout.mlp_norm, layout.mlp_in)):
            norm = block.get_submodule(norm_name)
            if not isinstance(norm, ReorderedNorm):
                continue
            inv = torch.argsort(norm.perm)
            at = f"{path}.{i}.{norm_name}."
            del tensors[f"{at}perm"]
            for key in [k for k in tensors if k.startswith(f"{at}norm.")]:
                value = tensors.pop(key)
                tensors[at + key.removeprefix(f"{at}norm.")] = value[inv] if value.shape == inv.shape else value
            for name in consumers:
                key = f"{path}.{i}.{name}.weight"
                tensors[key] = tensors[key][:, inv].contiguous()
