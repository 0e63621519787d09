"""llm-compressor on one model, in *its own* Python environment; writes each decoder linear's
effective weight. Imports nothing from lowbit on purpose: llm-compressor 0.14 pins
``transformers<=5.17``, older than lowbit's, so it runs in a separate environment (see
``llmcompressor_peer``) and hands back plain tensors.

    python llmcompressor_script.py MODEL_DIR CALIB.pt OUT.safetensors --variant gptq --bits 4 --group-size 128

The effective weight is what the quantized layer computes, read off by feeding it the identity:
``W_eff = (layer(I) − layer(0))ᵀ``. It folds in whatever llm-compressor does around the weight
(fake quantization, fused and online Hadamard rotations), so lowbit's evaluation needs nothing of
llm-compressor's runtime.
"""

from __future__ import annotations

import argparse
import json

import torch


def _scheme(bits: int, group_size: int | None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                               strategy="group" if group_size else "channel", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _recipe(variant: str, bits: int, group_size: int | None) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups = _scheme(bits, group_size)
    if variant == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    gptq = GPTQModifier(config_groups=groups, ignore=["lm_head"])  # its defaults: act-order "static", damp 0.01
    if variant == "gptq":
        return [gptq]
    if variant == "quip":
        from llmcompressor.modifiers.transform import QuIPModifier

        return [QuIPModifier(transform_type="random-hadamard", ignore="lm_head"), gptq]
    raise SystemExit(f"unknown variant {variant}")


@torch.no_grad()
def effective_weights(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith(prefix):
            eye = torch.eye(m.in_features, dtype=m.weight.dtype, device=m.weight.device)
            out[name] = (m(eye) - m(torch.zeros_like(eye))).T.float().cpu().contiguous()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("calib")
    p.add_argument("out")
    p.add_argument("--variant", choices=["gptq", "rtn", "quip"], required=True)
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--prefix", default="model.layers.")
    args = p.parse_args()

    import llmcompressor
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ids = torch.load(args.calib)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, processor=AutoTokenizer.from_pretrained(args.model_dir), dataset=data,
            recipe=_recipe(args.variant, args.bits, args.group_size), num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    weights = effective_weights(model, args.prefix)
    save_file(weights, args.out, metadata={"llmcompressor": llmcompressor.__version__,
                                           "args": json.dumps(vars(args))})


if __name__ == "__main__":
    main()
