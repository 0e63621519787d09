"""Quality of a (quantized) model: perplexity and KL divergence under the standard protocol."""

from lowbit.eval.perplexity import PerplexityResult, kl_divergence, perplexity

__all__ = ["PerplexityResult", "kl_divergence", "perplexity"]
