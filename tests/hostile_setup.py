"""A tiny model with a real (small, trained here) tokenizer, and a checkpoint of it, on disk.

The hostile-input and kill tests run the CLI as a user would, in subprocesses; with this model a
whole ``lowbit quantize`` takes seconds and needs neither the real model nor the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lowbit.data.sources import wikitext2_test_rows

VOCAB = 384


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 384 tokens trained on the first WikiText-2 rows (deterministic, ~1 s)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(wikitext2_test_rows()[:2000]), trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write_tiny_model(path: Path, layers: int = 2) -> Path:
    """A random Llama at a toy width whose context holds the protocol's 2048-token windows."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
