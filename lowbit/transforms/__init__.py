"""Matrix maths applied to a layer before rounding: seeded orthogonal transforms and QuIP's incoherence processing
(rescale, rotate, undo), and the low-rank reconstruction of the rounding error (ASER, LoRC)."""

from lowbit.transforms.incoherence import Incoherence, incoherence, layer_seed
from lowbit.transforms.orthogonal import RandomHadamard, RandomKronecker, make_orthogonal

__all__ = ["Incoherence", "RandomHadamard", "RandomKronecker", "incoherence", "layer_seed", "make_orthogonal"]
