"""Sources of curvature for rounding: layer-wise ``XᵀX`` now, output-adaptive later."""

from lowbit.hessians.conditioning import condition_hessian, robust_cholesky_inverse, robust_udu
from lowbit.hessians.layerwise import HessianAccumulator

__all__ = ["HessianAccumulator", "condition_hessian", "robust_cholesky_inverse", "robust_udu"]
