"""HQQ (Badri & Shaji 2023): per-group min/max grid refined by HQQ's proximal optimiser, no data.

Uses ``hqq.core.quantize.Quantizer`` exactly as ``HQQLinear`` does (``axis=1``, zero rounded at
4 bits as in ``BaseQuantizeConfig``) and writes the dequantized weights back. HQQ groups the
flattened weight, so on a width that the group size does not divide (576 with 128), its groups
run across row ends: that is HQQ's own behaviour and is kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit.compare.config import WeightScheme
from lowbit.compare.peers import PeerUnavailable, decoder_linears


@torch.no_grad()
def fake_quantize(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """``w`` quantized and dequantized by HQQ (float32, ``w``'s shape)."""
    from hqq.core.quantize import Quantizer

    if scheme.bits not in Quantizer.SUPPORTED_BITS:
        raise PeerUnavailable(f"HQQ supports {Quantizer.SUPPORTED_BITS} bits, not {scheme.bits}")
    group = scheme.group_size or w.shape[1]
    if w.numel() % group:
        raise PeerUnavailable(f"HQQ needs the group size to divide the weight's size ({tuple(w.shape)}, {group})")
    codes, meta = Quantizer.quantize(w.float(), nbits=scheme.bits, channel_wise=True, group_size=group,
                                     optimize=True, round_zero=scheme.bits == 4, axis=1, bitpack=False,
                                     device=str(w.device))
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(codes, meta).reshape(w.shape)


@torch.no_grad()
def quantize(model: nn.Module, tok, calib, scheme: WeightScheme, run_dir: Path, variant: str = "hqq") -> dict:
    import hqq

    for lin in decoder_linears(model).values():
        lin.weight.copy_(fake_quantize(lin.weight.data, scheme).to(lin.weight.dtype))
    return {"peer_version": getattr(hqq, "__version__", "?")}
