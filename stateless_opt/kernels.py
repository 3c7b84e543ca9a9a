"""Fused elementwise kernels (Triton) for the CUDA fast paths: one pass over the memory where the
tensor-op path needs two or three.

Each kernel states the tensor-op expression it replaces; ``tests/test_kernels.py`` runs both on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1``) and the GPU step benchmark compares the
optimizers' CUDA steps with their CPU reference path. The optimizers call these only where
``available(device)`` (Triton imports and the tensors live on CUDA) and the tensors are fp32 and
contiguous; everything else (CPU, bf16 weights, no Triton) takes the tensor-op path, which the
reference tests check.

* ``sgd_sai_step_``: m <- mu m + (1 - mu) g (m <- g on a weight's first step);
  p <- decay * p - lr_scale * m. Reads p, g, m and writes p, m: 20 bytes a parameter, against 28
  for the decay pass plus ``torch._fused_sgd_`` (whose weight decay is coupled, so it cannot fold
  SGD-SaI's decoupled one).
* ``row_col_scaled_update_``: p <- decay * p - lr * (r_i * G_ij * c_j) on a flat fragment of an
  m x n matrix (any start offset: ZeRO cuts rows). Reads G and p, writes p: 12 bytes an element,
  against 28 for materialising r∘G∘c and then applying it.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048


def available(device: torch.device) -> bool:
    """Whether the fused kernels run for tensors on ``device``: CUDA with Triton; also the CPU under
    Triton's debugging interpreter (``TRITON_INTERPRET=1`` before the import), which is how the tests
    check them without a GPU."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _grid(numel: int):
    return (triton.cdiv(numel, BLOCK),)


if triton is not None:

    @triton.jit
    def _sgd_sai_kernel(p_ptr, g_ptr, m_ptr, numel, lr_scale, decay, mu, FIRST: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask)
        if FIRST:
            m = g
        else:
            m = tl.load(m_ptr + offs, mask=mask) * mu + g * (1.0 - mu)
        p = tl.load(p_ptr + offs, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(p_ptr + offs, p * decay - lr_scale * m, mask=mask)

    @triton.jit
    def _row_col_kernel(p_ptr, g_ptr, r_ptr, c_ptr, numel, start, n, lr, decay, WIDE: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr):
        if WIDE:  # matrices of 2**31 elements or more: 64-bit positions (a slower division)
            offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        else:
            offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        flat = start + offs  # position in the whole matrix
        row = flat // n
        col = flat - row * n
        g = tl.load(g_ptr + offs, mask=mask)
        r = tl.load(r_ptr + row, mask=mask)
        c = tl.load(c_ptr + col, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask)
        tl.store(p_ptr + offs, p * decay - lr * (r * g * c), mask=mask)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"fused kernels take contiguous fp32 tensors, got {t.dtype}, contiguous={t.is_contiguous()}")


def sgd_sai_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, *, lr_scale: float, decay: float,
                  mu: float, first: bool) -> None:
    """In place on ``p`` and ``m`` (same numel as ``g``): the SGD-SaI step of one weight fragment."""
    _check(p, g, m)
    numel = g.numel()
    if numel:
        _sgd_sai_kernel[_grid(numel)](p, g, m, numel, float(lr_scale), float(decay), float(mu), FIRST=bool(first),
                                      BLOCK_SIZE=BLOCK)


def row_col_scaled_update_(p: torch.Tensor, g: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
                           *, start: int, n: int, lr: float, decay: float) -> None:
    """In place on ``p``: p <- decay p - lr r∘G∘c for the flat fragment [start, start + numel) of an
    m x n matrix; ``row_scale`` (m,) and ``col_scale`` (n,) are the matrix's own scale vectors."""
    _check(p, g, row_scale, col_scale)
    numel = g.numel()
    if numel:
        wide = start + numel + BLOCK >= 2**31
        _row_col_kernel[_grid(numel)](p, g, row_scale, col_scale, numel, int(start), int(n), float(lr), float(decay),
                                      WIDE=wide, BLOCK_SIZE=BLOCK)
