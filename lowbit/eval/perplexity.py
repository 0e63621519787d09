"""Perplexity over non-overlapping windows, and KL divergence to a reference model.

Every window contributes ``seqlen - 1`` predicted tokens; ``ppl = exp(Σ nll / Σ tokens)``,
which equals GPTQ's ``exp(mean window loss)`` because all windows have the same length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lowbit.data import eval_windows
from lowbit.errors import LowbitError
from lowbit.eval.window_log import WindowLog
from lowbit.models.fingerprint import model_digest
from lowbit.models.onload import DiskModel


@dataclass
class PerplexityResult:
    dataset: str
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _check_seqlen(model: nn.Module, seqlen: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise LowbitError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens; pass a smaller --seqlen")


def _eval_windows_for(model: nn.Module, tok: PreTrainedTokenizerBase, dataset: str, seqlen: int,
                      windows: int | None, bos: str) -> torch.Tensor:
    """The protocol's windows for this model (its context limit and BOS rule applied)."""
    _check_seqlen(model, seqlen)
    return eval_windows(dataset, tok, seqlen, windows, _model_type(model), bos)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, desc: str = "ppl", show_progress: bool = False,
               log: str | Path | None = None) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over token windows ``(n, seqlen)`` and its count.

    ``log``: a file that keeps each finished window's sum, so that a rerun skips them (only this
    model's: the log is keyed by ``model_digest``).
    """
    dev = _device(model)
    done = WindowLog(log, windows, f"nll:{model_digest(model)}" if log is not None else "nll")
    start = len(done.values)
    for i in tqdm(range(start, windows.shape[0]), desc=desc, unit="win", disable=not show_progress,
                  initial=start, total=windows.shape[0]):
        ids = windows[i : i + 1].to(dev)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        done.add(float(F.cross_entropy(logits, ids[0, 1:], reduction="sum")))
    return float(sum(done.values)), windows.shape[0] * (windows.shape[1] - 1)


@torch.no_grad()
def window_nll_onloaded(disk: DiskModel, windows: torch.Tensor, desc: str = "ppl",
                        show_progress: bool = False) -> tuple[float, int]:
    """:func:`window_nll` of a model read block by block (``models.onload``): every window passes block ``i``
    before block ``i+1`` is read, so memory holds one block and every window's hidden states."""
    from lowbit.pipeline.capture import capture_block_inputs, logits_after_blocks, run_block

    ids = windows.to(disk.device)
    with disk.onloaded(None):
        hidden, kwargs = capture_block_inputs(disk.model, disk.blocks, ids)
    for b in tqdm(range(len(disk.blocks)), desc=desc, unit="block", disable=not show_progress):
        with disk.onloaded(b) as block:
            hidden = run_block(block, hidden, kwargs[b])
    nll = 0.0
    with disk.onloaded(None):
        for i in range(ids.shape[0]):
            logits = logits_after_blocks(disk.model, disk.blocks, ids[i : i + 1], hidden[i : i + 1])[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[i, 1:], reduction="sum"))
    return nll, windows.shape[0] * (windows.shape[1] - 1)


@torch.no_grad()
def window_kl(model: nn.Module, reference: nn.Module, windows: torch.Tensor, show_progress: bool = False,
              log: str | Path | None = None) -> float:
    """Mean per-token ``KL(p_reference ‖ p_model)`` of next-token distributions, in nats."""
    label = f"kl:{model_digest(model)}:{model_digest(reference)}" if log is not None else "kl"
    done = WindowLog(log, windows, label)
    start = len(done.values)
    for i in tqdm(range(start, windows.shape[0]), desc="kl", unit="win", disable=not show_progress,
                  initial=start, total=windows.shape[0]):
        ids = windows[i : i + 1]
        logp_ref = F.log_softmax(reference(ids.to(_device(reference)), use_cache=False).logits[0].float(), -1)
        logp = F.log_softmax(model(ids.to(_device(model)), use_cache=False).logits[0].float(), -1).to(logp_ref.device)
        done.add(float(F.kl_div(logp, logp_ref, log_target=True, reduction="sum")))
    return float(sum(done.values)) / windows.numel()


def perplexity(
    model: nn.Module | DiskModel,
    tok: PreTrainedTokenizerBase,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    windows: int | None = None,
    bos: str = "auto",
    show_progress: bool = True,
    log: str | Path | None = None,
) -> PerplexityResult:
    """``log``: keep finished windows in this file and skip them on a rerun (see ``WindowLog``).

    ``model`` read block by block from disk (a :class:`DiskModel`): the same numbers, no per-window log."""
    if isinstance(model, DiskModel):
        wins = _eval_windows_for(model.model, tok, dataset, seqlen, windows, bos)
        nll, tokens = window_nll_onloaded(model, wins, f"ppl {dataset}", show_progress)
    else:
        wins = _eval_windows_for(model, tok, dataset, seqlen, windows, bos)
        nll, tokens = window_nll(model, wins, f"ppl {dataset}", show_progress, log)
    return PerplexityResult(dataset, math.exp(nll / tokens), nll / tokens, tokens, wins.shape[0], seqlen)


def kl_divergence(
    model: nn.Module,
    reference: nn.Module,
    tok: PreTrainedTokenizerBase,
    dataset: str = "wikitext2",
    seqlen: int = 2048,
    windows: int | None = None,
    bos: str = "auto",
    show_progress: bool = True,
    log: str | Path | None = None,
) -> float:
    """KL of ``model`` to ``reference`` on the evaluation windows of ``dataset``."""
    wins = _eval_windows_for(model, tok, dataset, seqlen, windows, bos)
    return window_kl(model, reference, wins, show_progress, log)
