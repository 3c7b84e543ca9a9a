"""SinkGD (Gradient Multi-Normalization, Scetbon et al., arXiv 2502.06742): alternating row/column l2
normalisation of each 2-D gradient, no optimizer state.

The rule for one weight is ``sinkgd_update`` below, in plain torch: X = G (the weight as stored, out x
in; conv weights as (out, in*kh*kw)); repeat L times: every row to l2 norm sqrt(n) (row RMS 1), then
every column to l2 norm sqrt(m). Rows first; no centring; each norm is floored relative to its matrix's
scale (eps * ||X||_F / sqrt(count)), taken before its own axis's scaling. W <- (1 - lr*wd) W - lr X.

Batched and sharded (``row_col_norms.py``), each round needs the m row norms and then the n column norms
of the re-scaled matrix: partial sums of squares on the local pieces, two dependent all-reduces of
small vectors (all matrices of a chunk batched together; each skipped where no rank holds part of a
row, or of a column). No gather, no matrix ever moves.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from .config import MatrixRuleConfig
from .optimizer import MatrixRuleOptimizer
from .precision import TINY, matmul_precision
from .row_col_norms import chunks, normalize_rows_cols


# ====================================================================================== the rule
def sinkgd_update(grad: torch.Tensor, iterations: int = 5, eps: float = 1e-8) -> torch.Tensor:
    """SinkGD's update direction for one gradient of >= 2 dims, in float64."""
    g = grad.double().reshape(grad.shape[0], -1)
    m, n = g.shape
    r, c = g.new_ones(m), g.new_ones(n)  # X = diag(r) G diag(c)
    for _ in range(iterations):
        y = g * c[None, :]  # rows measured under the columns' scale only: a floored row stays floored
        r = math.sqrt(n) / _floored(y.norm(dim=1), y, m, eps)  # rows to norm sqrt(n)
        y = g * r[:, None]
        c = math.sqrt(m) / _floored(y.norm(dim=0), y, n, eps)  # columns to norm sqrt(m)
    return (r[:, None] * g * c[None, :]).reshape(grad.shape)


def _floored(norms: torch.Tensor, x: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """Norms of one axis clamped at eps * ||X||_F / sqrt(count): a 1e-30 row of an O(1) matrix is
    not blown up to full norm (and a zero matrix divides by TINY, staying zero)."""
    return torch.maximum(norms, (eps * torch.linalg.matrix_norm(x) / math.sqrt(count)).clamp_min(TINY))


# ====================================================================================== the optimizer
class SinkGDConfig(MatrixRuleConfig):
    """SinkGD (arXiv 2502.06742): alternating row/column l2 normalisation, no state."""

    chunk_mb: float = Field(
        1024.0, gt=0.0,
        description="upper bound on the temporaries of one batched chunk (MiB, counted as fp32): fewer, "
        "larger chunks issue fewer launches (measured step times in docs/design.md)",
    )

    iterations: int = Field(5, ge=1, le=100, description="row/column normalisation rounds (L)")
    stats_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the squared gradients the rounds read: auto = bfloat16 on CUDA (half the "
        "traffic, ~1e-4 relative on the norms; sums stay fp32), float32 elsewhere",
    )
    fused: bool = Field(
        True,
        description="write r*G*c into fp32 weights with a fused Triton kernel on CUDA (one launch a chunk, "
        "where Triton imports); False: the tensor-op path",
    )


class SinkGD(MatrixRuleOptimizer):
    """SinkGD: ``SinkGD(params, lr=1e-3, iterations=5, ...)``; hyper-parameters in ``SinkGDConfig``.

    A plain parameter list is split by shape: >= 2-D tensors take the matrix rule, 0-/1-D the fallback
    (``fallback="adamw"`` by default, at ``lr * fallback_lr_ratio``). Use
    ``stateless_opt.param_groups(model)`` to send embeddings and the LM head to the fallback too, as
    the paper does. Recipe: lr about 0.05 x the fallback's Adam LR, weight_decay 0.
    """

    config_cls = SinkGDConfig

    def __init__(self, params, lr: float = 1e-3, **hyperparameters):
        super().__init__(params, lr, **hyperparameters)

    def _matrix_update(self, group, frags, comm, lr) -> None:
        # Chunks bound the fp32 copy of the gradients; every rank cuts the same chunks.
        budget = int(group["chunk_mb"] * 2**20) * comm.world
        device = frags[0].grad.device
        fused = self.fused_update(group, lr) if group["fused"] else None
        # "auto": bf16 squared gradients on CUDA, half the bytes of the 2L passes that dominate the step
        stats = getattr(torch, matmul_precision(group["stats_dtype"], device))
        row_comms, col_comms = self._row_col_comms(frags)
        for idx in chunks(frags, lambda f: f.whole_bytes, budget):
            normalize_rows_cols(
                [frags[i] for i in idx], row_comms=row_comms, col_comms=col_comms, iterations=group["iterations"],
                eps=group["eps"], columns=True, apply=lambda fs, x: self._apply_fragments(group, fs, x.unbind(0), lr),
                device=device, stats_dtype=stats, fused_update=fused, cache=self.geometry_cache,
            )
