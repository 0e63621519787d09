"""``lowbit compare``: recipes and peer toolkits under one calibration set and one protocol, as a report."""

from lowbit.compare.config import CompareConfig, WeightScheme

__all__ = ["CompareConfig", "WeightScheme", "run_compare"]


def __getattr__(name: str):  # the runner needs torch: imported when a comparison really runs
    if name == "run_compare":
        from lowbit.compare.runner import run_compare

        return run_compare
    raise AttributeError(f"module 'lowbit.compare' has no attribute {name!r}")
