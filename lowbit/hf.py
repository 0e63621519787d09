"""How plain ``transformers`` meets a lowbit checkpoint: correctly, or with an error — never random weights.

A checkpoint's ``config.json`` is not the base model's (``transformers`` would build that model,
find none of its linear weights, fill them at random and only warn). It names model type
``lowbit`` and, through ``auto_map``, the classes below, by way of a two-line ``lowbit_hf.py``
beside it; the base model's config sits inside, under ``base_config``. So:

- ``AutoModelForCausalLM.from_pretrained(ckpt)`` stops with ``transformers``' error about custom
  code (it names the checkpoint folder, where ``lowbit_hf.py`` says what to do);
- with ``trust_remote_code=True`` and lowbit installed it returns what ``lowbit.load_model`` does
  (the packed model); without lowbit, ``transformers`` says ``pip install lowbit``;
- serving engines that read ``config.json`` find an architecture they do not know and stop.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from lowbit.export.hf_config import MODEL_TYPE


class LowbitConfig(PretrainedConfig):
    """``config.json`` of a lowbit checkpoint: the base model's config under ``base_config``."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.base_config = base_config or {}


class LowbitForCausalLM(PreTrainedModel):
    """Only a door: ``from_pretrained`` returns the base model class with lowbit's packed layers."""

    config_class = LowbitConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, **kwargs: Any):
        from lowbit.export.load import load_quantized

        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        return load_quantized(pretrained_model_name_or_path, dtype=None if dtype in (None, "auto") else dtype)[0]
