"""lowbit: post-training quantization of LLMs — one API, one CLI.

    model, tok = lowbit.load_model("smollm2-135m")
    calib = lowbit.data.calibration("c4", tok, n=128, seqlen=2048, seed=0)
    result = lowbit.quantize(model, lowbit.recipes.get("gptq-w4"), calib)
    print(lowbit.eval.perplexity(result.model, tok, "wikitext2"))
    lowbit.save(result, "runs/gptq-w4", tok)
"""

from lowbit.errors import LowbitError
from lowbit.lazy import lazy_attributes

__all__ = ["LowbitError", "data", "eval", "load_model", "quantize", "recipes", "save"]
__version__ = "0.1.0"

# Imported on first use, so that ``lowbit --help`` and bad-input errors do not wait for torch and
# transformers (several seconds) to load.
__getattr__, __dir__ = lazy_attributes(__name__, {
    "data": ("lowbit.data", None), "eval": ("lowbit.eval", None), "recipes": ("lowbit.recipes", None),
    "quantize": ("lowbit.api", "quantize"), "save": ("lowbit.export", "save"),
    "load_model": ("lowbit.api", "load_model")})
