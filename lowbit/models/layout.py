"""The named parts of a decoder block that activation quantization and channel reordering touch.

Two families cover the required models: Llama-style (Llama, Qwen2, Mistral, Gemma-3: RMSNorm,
q/k/v/o, gated MLP, RoPE) and OPT (LayerNorm, q/k/v/out_proj, fc1/fc2, learned positions).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class BlockLayout:
    attn_norm: str  # its output feeds q/k/v (RPTQ's R1)
    q: str
    k: str
    v: str
    o: str  # its input is the attention output (R3)
    mlp_norm: str  # its output feeds the MLP's first linears (R4)
    mlp_in: tuple[str, ...]  # gate/up or fc1: their outputs, elementwise, feed ``down`` (R5)
    down: str
    attention: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool  # q/k dimensions pair up inside a head: no permutation of q/k rows

    @property
    def group(self) -> int:
        """Query heads per K/V head (grouped-query attention)."""
        return self.heads // self.kv_heads


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def block_layout(block: nn.Module, config) -> BlockLayout:
    cfg = _text_config(config)
    names = dict(block.named_modules())
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if "self_attn.o_proj" in names and "mlp.down_proj" in names:
        mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in names else "post_attention_layernorm"
        return BlockLayout("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                           "self_attn.o_proj", mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj",
                           "self_attn", heads, kv_heads, head_dim, rope=True)
    if "self_attn.out_proj" in names and "fc1" in names:
        if not getattr(cfg, "do_layer_norm_before", True):
            raise LowbitError("activation quantization needs pre-norm blocks; this OPT model normalises after each block")
        return BlockLayout("self_attn_layer_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                           "self_attn.out_proj", "final_layer_norm", ("fc1",), "fc2", "self_attn",
                           heads, kv_heads, head_dim, rope=False)
    raise LowbitError(f"activation quantization does not know the block layout of {type(block).__name__} "
                      "(supported: Llama/Qwen2/Mistral/Gemma-3-style and OPT blocks)")
