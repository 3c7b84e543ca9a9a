"""LLaMA-style causal LMs from a transformers ``LlamaConfig``, randomly initialised.

The shapes are ``config.PRESETS`` (GaLore and the SWAN/SinkGD papers on C4); the vocabulary is our
corpus's BPE, so parameter counts are smaller than the papers' (they use a 32k T5 vocabulary). ``tiny``
is a CPU model (~1.9M parameters at vocab 4096).
"""

from __future__ import annotations

import math

import torch

from .config import PRESETS, ModelSection  # noqa: F401  (PRESETS: the one table, re-exported for benchmarks)


def llama_config(cfg: ModelSection, vocab_size: int):
    from transformers import LlamaConfig

    shape = cfg.shape()
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=cfg.num_kv_heads or shape["num_heads"],
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        rms_norm_eps=1e-6,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )


def build_model(cfg: ModelSection, vocab_size: int, device: torch.device | str = "cpu", seed: int = 0):
    """A fresh ``LlamaForCausalLM``; the same ``seed`` gives the same weights on every rank (FSDP2
    shards what each rank built, so ranks must agree)."""
    from transformers import LlamaForCausalLM

    config = llama_config(cfg, vocab_size)
    config._attn_implementation = cfg.attn_implementation
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    return model.to(device=device, dtype=dtype)


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total, and the embedding + head share (tied weights counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += math.prod(p.shape)
    emb = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    head = model.get_output_embeddings()
    if head is not None:
        emb[id(head.weight)] = head.weight
    embed = sum(math.prod(w.shape) for w in emb.values())
    return {"total": total, "embedding_and_head": embed, "non_embedding": total - embed}
