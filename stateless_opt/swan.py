"""SWAN (arXiv 2412.13148): GradNorm (row standardisation) then GradWhitening ((G G^T)^-1/2 G) of
each 2-D gradient, no optimizer state.

Per matrix (oriented so that m <= n): G~ = (G - row mean) / (row std + eps); D = (G~ G~^T)^-1/2 G~,
the polar factor U V^T (on the range when G~ is rank-deficient, e.g. square weights after centring);
D <- D * sqrt(mn) / ||D||_F (RMS 1); W <- (1 - lr*wd) W - lr D.

Whitening needs the whole matrix: each matrix goes to one owner rank (owners balanced by FLOPs),
which does GradNorm and whitening batched by shape and sends every rank back its slice.
"""

from __future__ import annotations

from functools import partial

import torch

from .config import SWANConfig
from .matrix_rule import MatrixRuleOptimizer
from .ops import swan_direction
from .owners import whitening_flops
from .polar import whitening_plan
from .whitening import owners_and_chunks, whiten_chunk


class SWAN(MatrixRuleOptimizer):
    """SWAN: ``SWAN(params, lr=1e-3, ...)``; hyper-parameters in ``SWANConfig``.

    Whitening (``whitening``): a Polar Express schedule (default; ``ns_steps`` steps, 5 with bf16
    matmuls on CUDA, 7 in fp32 elsewhere, ``whitening_dtype``), coupled Newton-Schulz from a spectral
    upper-bound initial scale (12 steps), or an exact fp64 eigendecomposition ("eigh"); see
    stateless_opt/polar.py and docs/algorithms.md. A plain parameter list is split by shape (>= 2-D:
    matrix rule; 0-/1-D: fallback); ``stateless_opt.param_groups(model)`` also sends embeddings and
    the LM head to the fallback, as the paper does. Recipe: lr about 0.05 x the fallback's Adam LR
    (``fallback_lr_ratio=20``).
    """

    config_cls = SWANConfig

    def __init__(self, params, lr: float = 1e-3, **hyperparameters):
        super().__init__(params, lr, **hyperparameters)

    def _matrix_update(self, group, frags, comm, lr) -> None:
        method = group["whitening"]
        device = frags[0].grad.device if frags else torch.device("cpu")
        steps, dtype = whitening_plan(method, group["ns_steps"], group["whitening_dtype"], device)
        owners, chunk_list = owners_and_chunks(
            frags, comm.world, lambda f: whitening_flops(f.m, f.n, steps, method),
            int(group["chunk_mb"] * 2**20),
        )
        direction = partial(
            swan_direction, eps=group["eps"], steps=steps, method=method,
            gradnorm_axis=group["gradnorm_axis"], lower=group["pe_lower_bound"], dtype=dtype,
        )
        for idx in chunk_list:
            whiten_chunk(
                [frags[i] for i in idx], [owners[i] for i in idx], comm, direction,
                lambda fs, us: self._apply_fragments(group, fs, us, lr),
                temp_budget_bytes=int(group["whiten_batch_mb"] * 2**20),
            )
