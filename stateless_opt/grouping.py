"""``param_groups(model)``: the papers' split of a model's weights between the matrix rule and the
fallback, decided from module types and true shapes (never from name guessing).

Matrix rule: >= 2-D weights of the transformer blocks (attention and MLP projections, convs).
Fallback: embeddings and the LM head (``nn.Embedding`` modules and whatever a Hugging Face model
returns from ``get_input_embeddings()`` / ``get_output_embeddings()``), and every 0-/1-D tensor
(norms, biases). Call it before wrapping in FSDP2/DeepSpeed (the rule is kept as a group key, so it
survives the DTensor swap and ZeRO's flattening), or on a DDP-wrapped model to let SWAN split its
whitening work over the replicas (each group then names DDP's process group as ``replicate_group``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .collectives import group_ref
from .layouts import true_shape


def _unwrap(model: nn.Module) -> tuple[nn.Module, Any]:
    """(the module whose parameter names to use, DDP process group or None): a DDP anywhere in the
    wrappers (``torch.compile(ddp)``, a module holding the DDP model) counts."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)
    if ddp is None:
        return model, None
    return (ddp.module if model is ddp else model), ddp.process_group


def fallback_weights(model: nn.Module) -> set[int]:
    """ids of the embedding and output-head weights of ``model``."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                module = fn()
            except (NotImplementedError, AttributeError):
                module = None
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor):
                ids.add(id(weight))
    return ids


def param_groups(
    model: nn.Module, *, fallback_weight_decay: float | None = None, batch_dims: int = 0
) -> list[dict[str, Any]]:
    """Param groups for SWAN/SinkGD (also accepted by SGD-SaI): ``[{"params", "param_names", "rule"}, ...]``
    (plus ``"replicate_group"`` for a DDP-wrapped model).

    ``fallback_weight_decay`` sets the fallback group's weight decay (e.g. 0 for norms, embeddings);
    ``batch_dims`` marks leading batch dims of >= 3-D matrix weights (1 for experts stored as (E, out, in):
    each expert is its own matrix), capped per weight at ``ndim - 2`` so 2-D weights beside them (attention)
    stay single matrices (``layouts.tensor_batch_dims``). Frozen parameters (``requires_grad=False``) are
    left out; tied weights appear once.
    """
    inner, ddp_group = _unwrap(model)
    special = fallback_weights(inner)
    groups: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in inner.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = id(p) not in special and len(true_shape(p)) >= 2
        rule = "matrix" if is_matrix else "fallback"
        g = groups.setdefault(rule, {"params": [], "param_names": [], "rule": rule})
        g["params"].append(p)
        g["param_names"].append(name)
    if ddp_group is not None:  # by name: plain data that state_dict(), deepcopy and pickle carry
        for g in groups.values():
            g["replicate_group"] = group_ref(ddp_group)
    if "matrix" in groups and batch_dims:
        groups["matrix"]["batch_dims"] = batch_dims
    if "fallback" in groups and fallback_weight_decay is not None:
        groups["fallback"]["weight_decay"] = fallback_weight_decay
    return [groups[r] for r in ("matrix", "fallback") if r in groups]
