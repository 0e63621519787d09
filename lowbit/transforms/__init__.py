"""Rewrites of a layer's weights and Hessian before rounding (QuIP's incoherence processing)."""

from lowbit.transforms.incoherence import Incoherence, incoherence, layer_seed
from lowbit.transforms.orthogonal import RandomHadamard, RandomKronecker, make_orthogonal

__all__ = ["Incoherence", "RandomHadamard", "RandomKronecker", "incoherence", "layer_seed", "make_orthogonal"]
