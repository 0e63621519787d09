"""Zero-shot tasks through lm-evaluation-harness, on any model lowbit can load (checkpoints included).

The harness gets our in-memory model wrapped in its ``HFLM`` (so a quantized checkpoint is scored
as it runs, not re-loaded by the harness); ``include_path`` adds task YAMLs from a local folder,
which is how offline tests and private tasks work.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from lowbit.errors import LowbitError


def check_tasks(tasks: list[str], include_path: str | Path | None = None):
    """The harness's task manager, once the harness, the task folder and every task name are known to
    be there — so that the CLI can say what is wrong before it loads and evaluates a model."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LowbitError("zero-shot tasks need lm-evaluation-harness: pip install 'lowbit[eval]'") from None
    if include_path is not None and not Path(include_path).is_dir():
        raise LowbitError(f"task path {include_path} is not a directory")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LowbitError(f"unknown task(s) {', '.join(unknown)} (lm-eval knows {len(manager.all_tasks)} tasks; "
                          "local YAMLs via --task-path)")
    return manager


def evaluate_tasks(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    log_samples: bool = False,
) -> dict:
    """The harness's results dict: ``results`` (metrics per task), and ``samples`` if ``log_samples``."""
    manager = check_tasks(tasks, include_path)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                          log_samples=log_samples, bootstrap_iters=0)
    if out is None:
        raise LowbitError("lm-evaluation-harness returned no results")
    return out
