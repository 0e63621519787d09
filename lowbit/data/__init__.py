"""Evaluation and calibration text under GPTQ's exact protocol (WikiText-2, C4)."""

from lowbit.data.sources import DATASETS, SAMPLING, c4_documents, data_dir, wikitext2_test_rows

__all__ = ["DATASETS", "SAMPLING", "c4_documents", "calibration", "data_dir", "eval_windows", "wikitext2_test_rows"]


def __getattr__(name: str):  # the protocol needs torch and a tokenizer: loaded on first use
    if name in ("calibration", "eval_windows"):
        from lowbit.data import protocol

        return getattr(protocol, name)
    raise AttributeError(f"module 'lowbit.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
