"""Evaluation and calibration text under GPTQ's exact protocol (WikiText-2, C4)."""

from lowbit.data.protocol import DATASETS, calibration, eval_windows
from lowbit.data.sources import c4_documents, data_dir, wikitext2_test_rows

__all__ = ["DATASETS", "c4_documents", "calibration", "data_dir", "eval_windows", "wikitext2_test_rows"]
