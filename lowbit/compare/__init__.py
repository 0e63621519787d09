"""``lowbit compare``: recipes and peer toolkits under one calibration set and one protocol, as a report."""

from lowbit.compare.config import CompareConfig, WeightScheme
from lowbit.lazy import lazy_attributes

__all__ = ["CompareConfig", "WeightScheme", "run_compare"]
# the runner needs torch: imported when a comparison really runs
__getattr__, __dir__ = lazy_attributes(__name__, {"run_compare": ("lowbit.compare.runner", "run_compare")})
