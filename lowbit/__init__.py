"""lowbit: post-training quantization of LLMs — one API, one CLI.

    model, tok = lowbit.load_model("smollm2-135m")
    calib = lowbit.data.calibration("c4", tok, n=128, seqlen=2048, seed=0)
    qmodel, report = lowbit.quantize(model, lowbit.recipes.get("gptq-w4"), calib)
    print(lowbit.eval.perplexity(qmodel, tok, "wikitext2"))
    lowbit.save(qmodel, "runs/gptq-w4", tok, report)
"""

from lowbit import data, eval, recipes
from lowbit.api import quantize
from lowbit.errors import LowbitError
from lowbit.export import save
from lowbit.models import load_model

__all__ = ["LowbitError", "data", "eval", "load_model", "quantize", "recipes", "save"]
__version__ = "0.1.0"
