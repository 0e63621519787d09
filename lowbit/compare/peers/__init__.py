"""Peer toolkits run inside a comparison on the same model, calibration samples and evaluation.

Each peer module exposes ``quantize(model, tok, calib, scheme, run_dir) -> dict`` that quantizes
``model``'s decoder linears in place (weights as the peer would serve them, dequantized so that
lowbit's evaluation runs unchanged) and returns what it wants in the row (version, notes). A peer
that is not installed, or cannot run here, raises :class:`PeerUnavailable` and its row says why.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.compare.config import WeightScheme
from lowbit.errors import LowbitError


class PeerUnavailable(Exception):
    """The peer cannot run in this environment (not installed, or incompatible)."""


@dataclass(frozen=True)
class Peer:
    module: str
    requirement: str
    description: str
    env: tuple[str, ...] = ()  # environment variables that change the peer's numbers (part of its cache key)
    package: str | None = None  # the peer's own import name, looked for before a row loads anything of it

    def settings(self) -> dict[str, str]:
        """The peer's environment knobs as set now, so that a row run with other settings is not reused."""
        return {k: os.environ[k] for k in self.env if os.environ.get(k, "").strip()}


AUTOROUND_ITERS_ENV = "LOWBIT_AUTOROUND_ITERS"  # auto-round's iterations per block (its default: 200)
AUTOROUND_LR_ENV = "LOWBIT_AUTOROUND_LR"  # its learning rate (default: 1/iters)

PEERS: dict[str, Peer] = {
    "hqq": Peer("lowbit.compare.peers.hqq_peer", "hqq==0.2.8.post1",
                "HQQ: calibration-free half-quadratic optimisation of scales and zeros", package="hqq"),
    "autoround": Peer("lowbit.compare.peers.autoround_peer", "auto-round==0.16.1",
                      "Intel auto-round: sign-gradient tuning of rounding offsets and clipping, block by block",
                      env=(AUTOROUND_ITERS_ENV, AUTOROUND_LR_ENV), package="auto_round"),
    "llmcompressor-gptq": Peer("lowbit.compare.peers.llmcompressor_peer", "llmcompressor==0.14.0.1",
                               "llm-compressor GPTQModifier"),
    "llmcompressor-rtn": Peer("lowbit.compare.peers.llmcompressor_peer", "llmcompressor==0.14.0.1",
                              "llm-compressor QuantizationModifier (round to nearest)"),
    "llmcompressor-quip": Peer("lowbit.compare.peers.llmcompressor_peer", "llmcompressor==0.14.0.1",
                               "llm-compressor Hadamard transform (QuIP-style) + GPTQModifier"),
}


def check_peer(name: str) -> Peer:
    if name not in PEERS:
        raise LowbitError(f"unknown peer '{name}' (known: {', '.join(PEERS)})")
    return PEERS[name]


def run_peer(name: str, model: nn.Module, tok, calib: torch.Tensor | None, scheme: WeightScheme,
             run_dir: Path) -> dict:
    peer = check_peer(name)
    # the adapters import their peer lazily, so a missing package is looked for here, not met mid-run
    missing = peer.package if peer.package and importlib.util.find_spec(peer.package) is None else None
    try:
        module = importlib.import_module(peer.module)
    except ImportError as exc:
        missing = exc.name
    if missing:
        raise PeerUnavailable(f"not installed ({missing}): pip install '{peer.requirement}' "
                              "or pip install 'lowbit[peers]'")
    extra = module.quantize(model, tok, calib, scheme, run_dir, variant=name)
    return {"peer_requirement": peer.requirement, **extra}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears lowbit quantizes (every ``nn.Linear`` inside the decoder blocks), by full name."""
    from lowbit.models import block_linears, find_blocks

    path, blocks = find_blocks(model)
    return {f"{path}.{i}.{n}": m for i, b in enumerate(blocks) for n, m in block_linears(b).items()}
