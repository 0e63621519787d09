"""RPTQ's channel clustering: KMeans on each channel's (max, min) point, and the permutation that
makes every cluster a contiguous slice of channels."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans


def cluster_labels(lo: torch.Tensor, hi: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Labels ``0..k'-1`` (``k' = min(k, distinct points)``), numbered by increasing cluster
    width so that the numbering — and the permutation built from it — is canonical."""
    points = np.stack([hi.double().numpy(), lo.double().numpy()], axis=1)
    k = min(k, len(np.unique(points, axis=0)))
    if k <= 1:
        return torch.zeros(len(points), dtype=torch.int64)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)
    width = km.cluster_centers_[:, 0] - km.cluster_centers_[:, 1]
    rank = np.empty(k, dtype=np.int64)
    rank[np.lexsort((km.cluster_centers_[:, 0], width))] = np.arange(k)
    return torch.from_numpy(rank[km.labels_])


def head_labels(lo: torch.Tensor, hi: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Clusters inside each head separately; ``lo``/``hi`` are ``(heads, head_dim)``."""
    return torch.stack([cluster_labels(lo[h], hi[h], k, seed) for h in range(lo.shape[0])])


def permutation_from_labels(labels: torch.Tensor) -> torch.Tensor:
    """New channel ``i`` is old channel ``perm[i]``; stable, so channels keep their order inside a cluster.
    For ``(heads, head_dim)`` labels the permutation stays inside each head (flattened index)."""
    if labels.dim() == 1:
        return torch.sort(labels, stable=True).indices
    d = labels.shape[-1]
    return torch.cat([torch.sort(row, stable=True).indices + h * d for h, row in enumerate(labels)])
