"""Evaluation and calibration text under GPTQ's exact protocol (WikiText-2, C4)."""

from lowbit.data.sources import DATASETS, SAMPLING, c4_documents, data_dir, wikitext2_test_rows
from lowbit.lazy import lazy_attributes

__all__ = ["DATASETS", "SAMPLING", "c4_documents", "calibration", "data_dir", "eval_windows", "wikitext2_test_rows"]

# the protocol needs torch and a tokenizer: loaded on first use
__getattr__, __dir__ = lazy_attributes(__name__, {"calibration": ("lowbit.data.protocol", "calibration"),
                                                  "eval_windows": ("lowbit.data.protocol", "eval_windows")})
