"""Shared fixtures: tiny randomly initialised models for speed, the real SmolLM2 for end-to-end."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0, layers: int = 2) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=64)
    return OPTForCausalLM(cfg).eval()


def tiny_qwen2(seed: int = 0, layers: int = 2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0, layers: int = 3) -> Gemma3ForCausalLM:
    """Sliding-window and full-attention layers get different masks and RoPE: kwargs per block."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           sliding_window=8, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


ARCHITECTURES = [tiny_llama, tiny_opt, tiny_qwen2, tiny_gemma3]

# the families of the architecture matrix (tests/test_families.py): one tiny config each, shared sizes
_SIZES = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # inside the tiny vocabulary
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(intermediate_size=96, num_key_value_heads=2, sliding_window=16)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=96, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(intermediate_size=96, num_key_value_heads=2, head_dim=16)),  # q/k norms
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                        layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(intermediate_size=96, num_key_value_heads=2)),  # fused qkv_proj, gate_up_proj
    "gpt2": ("GPT2Config", dict(n_inner=128)),  # Conv1D, fused c_attn
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=48, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64,
                                         decoder_sparse_step=1)),
}


def tiny_family(family: str, seed: int = 0):
    """A random-weight causal LM of ``family`` (a key of ``FAMILY_CONFIGS``), a few kB of weights."""
    import transformers

    config_name, extra = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, config_name)(**_SIZES, **_TOKENS, **extra)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def interrupt_rounding_in_block(monkeypatch, block: int) -> None:
    """Make the pipeline die (as Ctrl-C would) when it starts rounding a layer of ``block``."""
    from lowbit.pipeline import stages

    real_round = stages.round_weight

    def interrupted(w, h, spec, name, **kwargs):
        if f".layers.{block}." in name:
            raise KeyboardInterrupt
        return real_round(w, h, spec, name, **kwargs)

    monkeypatch.setattr(stages, "round_weight", interrupted)


def full_and_resumed(recipe, calib_ids, progress_dir, monkeypatch, layers: int = 3, block: int = 2):
    """The same tiny Llama quantized in one go, and interrupted in ``block`` then resumed: both results."""
    from lowbit.pipeline import quantize_model

    full = quantize_model(tiny_llama(layers=layers), recipe, calib_ids, show_progress=False)
    with monkeypatch.context() as m:
        interrupt_rounding_in_block(m, block)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(tiny_llama(layers=layers), recipe, calib_ids, progress_dir=progress_dir, show_progress=False)
    resumed = quantize_model(tiny_llama(layers=layers), recipe, calib_ids, progress_dir=progress_dir, resume=True,
                             show_progress=False)
    assert resumed.report.resumed_blocks == block
    return full, resumed


@pytest.fixture
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (6, 32), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (dequantized from its GGUF once, then cached as safetensors)."""
    from lowbit.models import load_model

    return load_model("smollm2-135m")


def pytest_collection_modifyitems(items) -> None:
    """Every test that needs the real model (the ``smollm2`` fixture, directly or through another
    fixture) is ``slow``: ``pytest -m "not slow"`` is the quick tier for iteration, CI runs all."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
