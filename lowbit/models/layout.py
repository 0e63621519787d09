"""The named parts of a decoder block that activation quantization and channel reordering touch.

Families: Llama-style (Llama, Mistral, Qwen2/3, Gemma-3: RMSNorm, q/k/v/o, gated MLP, RoPE), OPT
(LayerNorm, q/k/v/out_proj, fc1/fc2, learned positions), Phi-3 (fused ``qkv_proj`` and
``gate_up_proj``), GPT-2 (fused ``c_attn``, after its ``Conv1D`` became ``nn.Linear``) and
mixture-of-experts MLPs (many down projections). Fused or many-expert blocks are not
``separable``: their quantizers sit where they do in the others, but smoothing and reordering,
which rescale or permute q/k/v and gate/up one by one, are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lowbit.errors import LowbitError
from lowbit.models.linearize import LinearExperts


@dataclass(frozen=True)
class BlockLayout:
    attn_norm: str  # its output feeds q/k/v (RPTQ's R1)
    q: str
    k: str
    v: str
    o: str  # its input is the attention output (R3)
    mlp_norm: str  # its output feeds the MLP's first linears (R4)
    mlp_in: tuple[str, ...]  # gate/up or fc1: their outputs, elementwise, feed ``down`` (R5)
    down: tuple[str, ...]  # one, or one per expert (and a shared expert's)
    attention: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool  # q/k dimensions pair up inside a head: no permutation of q/k rows
    separable: bool = True  # q/k/v and gate/up are separate linears, one MLP: smoothing and reordering apply

    @property
    def group(self) -> int:
        """Query heads per K/V head (grouped-query attention)."""
        return self.heads // self.kv_heads


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _moe_mlp(names: dict[str, nn.Module]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(mlp_in, down)`` of a mixture-of-experts MLP whose experts are ``nn.Linear`` (see ``models.linearize``)."""
    experts = names.get("mlp.experts")
    if not isinstance(experts, LinearExperts):
        return None
    shared = [f"mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")
              if f"mlp.shared_expert.{p}" in names]
    mlp_in = tuple(f"mlp.experts.{e}.gate_up_proj" for e in range(len(experts))) + tuple(shared[:-1])
    down = tuple(f"mlp.experts.{e}.down_proj" for e in range(len(experts))) + tuple(shared[-1:])
    return mlp_in, down


def block_layout(block: nn.Module, config) -> BlockLayout:
    cfg = _text_config(config)
    names = dict(block.named_modules())
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    shape = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    if "self_attn.o_proj" in names:
        mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in names else "post_attention_layernorm"
        if "self_attn.qkv_proj" in names and "mlp.gate_up_proj" in names:  # Phi-3
            qkv = "self_attn.qkv_proj"
            return BlockLayout("input_layernorm", qkv, qkv, qkv, "self_attn.o_proj", mlp_norm, ("mlp.gate_up_proj",),
                               ("mlp.down_proj",), "self_attn", **shape, rope=True, separable=False)
        moe = _moe_mlp(names)
        if "self_attn.q_proj" in names and (moe or "mlp.down_proj" in names):
            mlp_in, down = moe or (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
            return BlockLayout("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                               "self_attn.o_proj", mlp_norm, mlp_in, down, "self_attn", **shape, rope=True,
                               separable=moe is None)
    if "self_attn.out_proj" in names and "fc1" in names:
        if not getattr(cfg, "do_layer_norm_before", True):
            raise LowbitError("activation quantization needs pre-norm blocks; "
                              "this OPT model normalises after each block")
        return BlockLayout("self_attn_layer_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                           "self_attn.out_proj", "final_layer_norm", ("fc1",), ("fc2",), "self_attn", **shape,
                           rope=False)
    if "attn.c_attn" in names and isinstance(names["attn.c_attn"], nn.Linear) and "mlp.c_fc" in names:  # GPT-2
        qkv = "attn.c_attn"
        return BlockLayout("ln_1", qkv, qkv, qkv, "attn.c_proj", "ln_2", ("mlp.c_fc",), ("mlp.c_proj",), "attn",
                           **shape, rope=False, separable=False)
    raise LowbitError(f"activation quantization does not know the block layout of {type(block).__name__} "
                      "(supported: Llama/Mistral/Qwen/Gemma-3-style, mixture-of-experts, Phi-3, GPT-2 and OPT blocks)")
