"""ColRMS: a fourth optimizer written the way docs/extending.md says, to prove that adding one is one
module plus one registry row. The rule: scale every column of the gradient (the weight as stored, out
x in) to RMS 1, i.e. l2 norm sqrt(m); no state; embeddings, head and 1-D tensors take the fallback.

Nothing else in the library or the tests names it: the DeepSpeed JSON ``"type": "ColRMS"``, the HF
factory and every backend's layout find it through the registry row at the bottom.
"""

from __future__ import annotations

import math

import torch

from stateless_opt import OptimizerSpec, register
from stateless_opt.config import MatrixRuleConfig
from stateless_opt.optimizer import MatrixRuleOptimizer
from stateless_opt.precision import TINY
from stateless_opt.row_col_norms import chunks, normalize_rows_cols


def colrms_update(grad: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ColRMS's direction for one gradient of >= 2 dims, in float64: every column to norm sqrt(m),
    norms floored at eps * ||G||_F / sqrt(n) (a dead column stays zero, a tiny one is not blown up)."""
    x = grad.double().reshape(grad.shape[0], -1)
    m, n = x.shape
    floor = (eps * torch.linalg.matrix_norm(x) / math.sqrt(n)).clamp_min(TINY)
    return (x * (math.sqrt(m) / torch.maximum(x.norm(dim=0), floor))).reshape(grad.shape)


class ColRMSConfig(MatrixRuleConfig):
    """ColRMS: the matrix rule's and the fallback's hyper-parameters, nothing of its own."""


class ColRMS(MatrixRuleOptimizer):
    """``ColRMS(params, lr=1e-3, ...)``: every column of each matrix gradient to RMS 1."""

    config_cls = ColRMSConfig

    def __init__(self, params, lr: float = 1e-3, **hyperparameters):
        super().__init__(params, lr, **hyperparameters)

    def _matrix_update(self, group, frags, comm, lr) -> None:
        row_comms, col_comms = self._row_col_comms(frags)
        budget = int(group["chunk_mb"] * 2**20) * comm.world
        for idx in chunks(frags, lambda f: f.whole_bytes, budget):
            normalize_rows_cols(
                [frags[i] for i in idx], row_comms=row_comms, col_comms=col_comms, iterations=1, eps=group["eps"],
                rows=False, columns=True, apply=lambda fs, x: self._apply_fragments(group, fs, x.unbind(0), lr),
                device=frags[0].grad.device, cache=self.geometry_cache,
            )


register(OptimizerSpec("colrms", ColRMS, aliases=("col_rms",)))
