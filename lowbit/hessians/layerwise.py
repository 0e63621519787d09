"""Layer-wise Hessian ``H = 2·XᵀX / n`` accumulated from a linear layer's inputs."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Running ``XᵀX`` in float64 so that 128×2048 tokens of large activations do not lose bits.

    ``skip_first_tokens`` drops the first positions of every sequence: attention-sink tokens can
    carry almost all input energy of a layer and then dominate ``XᵀX`` (see MODELS.md).
    """

    def __init__(self, n_features: int, skip_first_tokens: int = 0, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(n_features, n_features, dtype=torch.float64, device=device)
        self.count = 0
        self.skip_first_tokens = skip_first_tokens

    def add(self, x: torch.Tensor) -> None:
        """Add inputs shaped ``(..., seq, features)`` or ``(tokens, features)``."""
        if x.dim() >= 3 and self.skip_first_tokens:
            x = x[..., self.skip_first_tokens :, :]
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.sum += (x.T @ x).to(torch.float64)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2·XᵀX / n`` in float64 (zeros if nothing was seen)."""
        return self.sum * (2.0 / max(self.count, 1))
