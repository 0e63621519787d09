"""Quality of a (quantized) model: perplexity and KL divergence under the standard protocol, and
zero-shot tasks through lm-evaluation-harness."""

from lowbit.eval.harness import evaluate_tasks
from lowbit.eval.perplexity import PerplexityResult, kl_divergence, perplexity

__all__ = ["PerplexityResult", "evaluate_tasks", "kl_divergence", "perplexity"]
