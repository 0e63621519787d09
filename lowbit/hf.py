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

import json
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_TYPE = "lowbit"

# written beside config.json; transformers imports it (trust_remote_code=True), and refuses with
# "requires the following packages …: lowbit" where lowbit is not installed
ENTRY_MODULE = "lowbit_hf"
ENTRY_SOURCE = '''"""A lowbit checkpoint (packed quantized layers). Load it with lowbit installed (pip install lowbit):

    lowbit.load_model(path)  or  AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
"""
from lowbit.hf import LowbitConfig, LowbitForCausalLM  # noqa: F401
'''


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


def entry_config(base: PretrainedConfig) -> dict[str, Any]:
    """The ``config.json`` a checkpoint gets for ``base``."""
    return {"model_type": MODEL_TYPE, "architectures": ["LowbitForCausalLM"],
            "auto_map": {"AutoConfig": f"{ENTRY_MODULE}.LowbitConfig",
                         "AutoModelForCausalLM": f"{ENTRY_MODULE}.LowbitForCausalLM"},
            "base_config": json.loads(base.to_json_string(use_diff=True))}  # what base.save_pretrained writes


def base_config(config_json: dict[str, Any]) -> PretrainedConfig:
    """The base model's config from a checkpoint's ``config.json`` (format 2: nested; format 1: itself)."""
    data = config_json.get("base_config") if config_json.get("model_type") == MODEL_TYPE else config_json
    if not isinstance(data, dict) or data.get("model_type") not in CONFIG_MAPPING:
        raise ValueError(f"no known base model type in it ({data.get('model_type') if isinstance(data, dict) else data!r})")
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)
