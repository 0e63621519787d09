"""The ``config.json`` a lowbit checkpoint carries for ``transformers`` (see ``lowbit.hf``): model type
``lowbit``, the base model's config nested, and the two-line module that hands loading to lowbit."""

from __future__ import annotations

import json
from typing import Any

from transformers import PretrainedConfig
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
        raise ValueError("no known base model type in it "
                         f"({data.get('model_type') if isinstance(data, dict) else data!r})")
    return CONFIG_MAPPING[data["model_type"]].from_dict(data)
