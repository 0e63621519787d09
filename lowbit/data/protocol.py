"""GPTQ's evaluation and calibration protocol, with the two choices it leaves open made explicit.

* Evaluation: WikiText-2 test rows joined with ``"\\n\\n"``; C4 validation documents joined with
  ``" "`` (first 1100, capped at 256 windows); one tokenization of the whole text, cut into
  non-overlapping ``seqlen`` windows (the tail is dropped).
* Calibration: ``random.seed(seed)``, then per sample a random C4 train document longer than
  ``seqlen`` tokens and a random window inside it (``sampling="documents"``, GPTQ's), or a random
  window of all train documents joined with ``"\\n\\n"`` (``sampling="concat"``; only 33 of the
  local documents are long enough for GPTQ's rule with SmolLM2's tokenizer).
* BOS: ``bos="auto"`` keeps GPTQ's single tokenization except for models that need a BOS at the
  start of every window to behave (Gemma), which get ``[BOS] + (seqlen-1)`` tokens per window.
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedTokenizerBase

from lowbit.data.sources import (
    NAMED,
    SAMPLING,
    c4_documents,
    check_dataset,
    file_rows,
    is_jsonl,
    jsonl_documents,
    ptb_rows,
    text_file,
    wikitext2_test_rows,
)
from lowbit.errors import LowbitError

C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256
BOS_PER_WINDOW_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def bos_per_window(tok: PreTrainedTokenizerBase, model_type: str | None, bos: str = "auto") -> bool:
    if bos not in ("auto", "always", "never"):
        raise LowbitError(f"bos must be auto, always or never, got '{bos}'")
    if bos == "auto":
        return model_type in BOS_PER_WINDOW_MODEL_TYPES and tok.bos_token_id is not None
    return bos == "always"


def eval_text(dataset: str) -> str:
    """The text a set's windows are cut from; a .txt file is read as WikiText-2 is, a .jsonl as C4 is."""
    if dataset == "wikitext2":
        return "\n\n".join(wikitext2_test_rows())
    if dataset == "c4":
        return " ".join(c4_documents("validation")[:C4_EVAL_DOCS])
    if dataset == "ptb":
        return " ".join(ptb_rows())  # GPTQ's: the test sentences joined by spaces
    check_dataset(dataset)
    path = text_file(dataset)
    if is_jsonl(dataset):
        return " ".join(jsonl_documents(path)[:C4_EVAL_DOCS])
    return "\n\n".join(file_rows(path))


def _windows(ids: torch.Tensor, seqlen: int, with_bos: bool, bos_id: int | None) -> torch.Tensor:
    body = seqlen - 1 if with_bos else seqlen
    n = ids.numel() // body
    win = ids[: n * body].reshape(n, body)
    if with_bos:
        win = torch.cat([torch.full((n, 1), bos_id, dtype=win.dtype), win], dim=1)
    return win


def eval_windows(
    dataset: str,
    tok: PreTrainedTokenizerBase,
    seqlen: int = 2048,
    windows: int | None = None,
    model_type: str | None = None,
    bos: str = "auto",
) -> torch.Tensor:
    """Token windows ``(n, seqlen)`` for perplexity; ``windows`` keeps only the first N."""
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2, got {seqlen}")
    with_bos = bos_per_window(tok, model_type, bos)
    ids = tok(eval_text(dataset), return_tensors="pt", add_special_tokens=not with_bos).input_ids[0]
    win = _windows(ids, seqlen, with_bos, tok.bos_token_id)
    if win.shape[0] == 0:
        raise LowbitError(f"the {dataset} text holds {ids.numel()} tokens, fewer than one window of {seqlen}")
    if dataset == "c4" or is_jsonl(dataset):
        win = win[:C4_EVAL_WINDOWS]
    if windows is not None:
        if windows <= 0:
            raise LowbitError(f"windows must be a positive integer, got {windows}")
        win = win[:windows]
    return win


def calibration(
    dataset: str,
    tok: PreTrainedTokenizerBase,
    n: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sampling: str = "documents",
    model_type: str | None = None,
    bos: str = "auto",
) -> torch.Tensor:
    """``n`` calibration windows ``(n, seqlen)`` of C4 train (or WikiText-2 test, for ablations)."""
    if n <= 0 or seqlen < 2:
        raise LowbitError(f"calibration needs n >= 1 and seqlen >= 2, got n={n}, seqlen={seqlen}")
    if sampling not in SAMPLING:
        raise LowbitError(f"unknown calibration sampling '{sampling}' (known: {', '.join(SAMPLING)})")
    with_bos = bos_per_window(tok, model_type, bos)
    body = seqlen - 1 if with_bos else seqlen
    if dataset == "c4":
        docs = list(c4_documents("train"))
    elif dataset == "wikitext2":
        docs = ["\n\n".join(wikitext2_test_rows())]
        sampling = "concat"
    elif dataset not in NAMED and is_jsonl(dataset):  # documents, sampled as GPTQ samples C4's
        check_dataset(dataset, "calibration dataset")
        docs = list(jsonl_documents(text_file(dataset)))
    elif dataset not in NAMED and text_file(dataset) is not None:  # one text, windows anywhere in it
        check_dataset(dataset, "calibration dataset")
        docs = ["\n\n".join(file_rows(text_file(dataset)))]
        sampling = "concat"
    else:
        raise LowbitError(f"unknown calibration dataset '{dataset}' (known: c4, wikitext2, or a .txt / .jsonl file)")
    random.seed(seed)
    samples = []
    if sampling == "documents":
        cache: dict[int, list[int]] = {}  # lazily: the hub's full shard has ~356k documents

        def encoded(i: int) -> list[int]:
            if i not in cache:
                cache[i] = tok(docs[i], add_special_tokens=not with_bos).input_ids
            return cache[i]

        for _ in range(n):
            for _attempt in range(100 * len(docs)):  # GPTQ's rejection loop: same random stream
                i = random.randint(0, len(docs) - 1)
                if len(encoded(i)) > body:
                    break
            else:
                raise LowbitError(f"no {dataset} document is longer than {body} tokens; use sampling='concat'")
            j = random.randint(0, len(encoded(i)) - body - 1)
            samples.append(encoded(i)[j : j + body])
    else:
        enc = tok(docs, add_special_tokens=not with_bos).input_ids
        sep = tok("\n\n", add_special_tokens=False).input_ids
        stream: list[int] = []
        for e in enc:
            stream += e + sep
        if len(stream) <= body:
            raise LowbitError(f"{dataset} holds only {len(stream)} tokens, fewer than seqlen={seqlen}")
        for _ in range(n):
            j = random.randint(0, len(stream) - body - 1)
            samples.append(stream[j : j + body])
    out = torch.tensor(samples, dtype=torch.long)
    if with_bos:
        out = torch.cat([torch.full((n, 1), tok.bos_token_id, dtype=torch.long), out], dim=1)
    return out
