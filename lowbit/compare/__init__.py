"""``lowbit compare``: recipes and peer toolkits under one calibration set and one protocol, as a report."""

from lowbit.compare.config import CompareConfig, WeightScheme
from lowbit.compare.runner import run_compare

__all__ = ["CompareConfig", "WeightScheme", "run_compare"]
