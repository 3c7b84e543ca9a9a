"""LLaMA-style causal LMs from a transformers ``LlamaConfig``, randomly initialised.

Presets follow the shapes used by GaLore and the SWAN/SinkGD papers on C4 (hidden, MLP width,
blocks, heads); the vocabulary is our corpus's BPE, so parameter counts are smaller than the papers'
(they use a 32k T5 vocabulary). ``tiny`` is a CPU model (~1.9M parameters at vocab 4096).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import ModelSection

# hidden_size, intermediate_size, num_layers, num_heads
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_layers": 4, "num_heads": 4},
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 8, "num_heads": 8},
    "130m": {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 12, "num_heads": 12},
    "350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_layers": 24, "num_heads": 16},
    "1.3b": {"hidden_size": 2048, "intermediate_size": 5461, "num_layers": 24, "num_heads": 32},
}


def llama_config(cfg: "ModelSection", vocab_size: int):
    from transformers import LlamaConfig

    shape = dict(PRESETS[cfg.preset])
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
        if getattr(cfg, key) is not None:
            shape[key] = getattr(cfg, key)
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


def build_model(cfg: "ModelSection", vocab_size: int, device: torch.device | str = "cpu", seed: int = 0):
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
