"""The quantized-layer format: what a quantized layer stores, declared once (:mod:`lowbit.format.spec`, which
needs no torch), and the one codec between a rounding's result and those tensors (:mod:`lowbit.format.codec`)."""

from lowbit.format.spec import LayerSpec, TensorDecl, groups_key

__all__ = ["LayerSpec", "TensorDecl", "groups_key"]
