"""SinkGD (Gradient Multi-Normalization, arXiv 2502.06742): alternating row/column l2 normalisation
of each 2-D gradient, no optimizer state.

X = G; repeat L times: every row to l2 norm sqrt(n) (row RMS 1), then every column to l2 norm
sqrt(m). Rows first, on the weight as stored (out x in); no centring; norms accumulated in fp32 and
floored relative to the matrix's scale. W <- (1 - lr*wd) W - lr X.

Sharded, each round needs the m row norms then the n column norms of the re-scaled matrix: partial
sums of squares on the local fragment, two dependent all-reduces of small vectors (all matrices of a
chunk batched together; the row one is skipped where rows are whole on every rank). No gather.
"""

from __future__ import annotations

import torch

from .batching import chunks, matrix_bytes, normalize_rows_cols
from .config import SinkGDConfig
from .matrix_rule import MatrixRuleOptimizer
from .polar import matmul_precision


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
        fused = (lr, 1.0 - lr * group["weight_decay"]) if group["fused"] else None
        # "auto": bf16 squared gradients on CUDA, half the bytes of the 2L passes that dominate the step
        stats = getattr(torch, matmul_precision(group["stats_dtype"], device))
        for idx in chunks(frags, matrix_bytes, budget):
            normalize_rows_cols(
                [frags[i] for i in idx], comm, iterations=group["iterations"], eps=group["eps"], columns=True,
                apply=lambda fs, x: self._apply_fragments(group, fs, x.unbind(0), lr),
                device=device, stats_dtype=stats, fused_update=fused, cache=self.geometry_cache,
            )
