"""Fused elementwise kernels (Triton) for the CUDA fast paths: one pass over the memory where the
tensor-op path needs two or three, and one launch for a whole list of tensors.

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
* ``row_col_scaled_update_``: p <- decay * p - lr * (r_i * G_ij * c_j) on flat fragments of m x n
  matrices (any start offset: ZeRO cuts rows). Reads G and p, writes p: 12 bytes an element,
  against 28 for materialising r∘G∘c and then applying it.

Why one launch per list (like torch's ``_foreach`` kernels): a 1.3B LLaMA has ~220 weights and a
Python-side Triton launch costs tens of microseconds, so per-weight launches left the GPU waiting on
the host. The tensors' addresses, sizes and scalars go in a small table copied to the device without
a sync (pinned memory); each program finds its tensor by a binary search over the table's block
offsets.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Sequence

import torch

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048


def available(device: torch.device) -> bool:
    """Whether the fused kernels run for tensors on ``device``: a CUDA GPU Triton supports (compute
    capability 7.0+); also the CPU under Triton's debugging interpreter (``TRITON_INTERPRET=1`` before
    the import), which is how the tests check them without a GPU. Not inside ``torch.compile``'s
    tracing: the launchers build their tables on the host; traced code takes the tensor-op paths."""
    if triton is None or torch.compiler.is_compiling():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return _triton_capable(device.index if device.index is not None else torch.cuda.current_device())
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (7, 0)


if triton is not None:

    @triton.jit
    def _owner(starts_ptr, count, pid, SEARCH: tl.constexpr):
        """The t with starts[t] <= pid < starts[t + 1] (starts ascending, starts[0] = 0)."""
        lo = pid * 0
        hi = lo + count
        for _ in tl.static_range(SEARCH):
            mid = (lo + hi) // 2
            go = tl.load(starts_ptr + mid) <= pid
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        return lo

    @triton.jit
    def _sgd_sai_kernel(itab, ftab, count, decay, mu, SEARCH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # itab rows: p, g, m addresses, numel, first block, is-first-step; ftab: lr * scale
        pid = tl.program_id(0).to(tl.int64)
        t = _owner(itab + 4 * count, count, pid, SEARCH)
        p_ptr = tl.load(itab + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(itab + count + t).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(itab + 2 * count + t).to(tl.pointer_type(tl.float32))
        numel = tl.load(itab + 3 * count + t)
        first = tl.load(itab + 5 * count + t)
        lr_scale = tl.load(ftab + t)
        offs = (pid - tl.load(itab + 4 * count + t)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask)
        m_old = tl.load(m_ptr + offs, mask=mask)  # read on a first step too (zeros then): one step in all
        m = tl.where(first != 0, g, m_old * mu + g * (1.0 - mu))
        p = tl.load(p_ptr + offs, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(p_ptr + offs, p * decay - lr_scale * m, mask=mask)

    @triton.jit
    def _row_col_kernel(itab, count, lr, decay, WIDE: tl.constexpr, SEARCH: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr):
        # itab rows: p, g, r, c addresses, numel, first block, start in the matrix, n
        pid = tl.program_id(0).to(tl.int64)
        t = _owner(itab + 5 * count, count, pid, SEARCH)
        p_ptr = tl.load(itab + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(itab + count + t).to(tl.pointer_type(tl.float32))
        r_ptr = tl.load(itab + 2 * count + t).to(tl.pointer_type(tl.float32))
        c_ptr = tl.load(itab + 3 * count + t).to(tl.pointer_type(tl.float32))
        numel = tl.load(itab + 4 * count + t)
        start = tl.load(itab + 6 * count + t)
        n = tl.load(itab + 7 * count + t)
        offs = (pid - tl.load(itab + 5 * count + t)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel
        if WIDE:  # matrices of 2**31 elements or more: 64-bit positions (a slower division)
            flat = start + offs
            row = flat // n
            col = flat - row * n
        else:
            flat = (start + offs).to(tl.int32)
            n32 = n.to(tl.int32)
            row = flat // n32
            col = flat - row * n32
        g = tl.load(g_ptr + offs, mask=mask)
        r = tl.load(r_ptr + row, mask=mask)
        c = tl.load(c_ptr + col, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask)
        tl.store(p_ptr + offs, p * decay - lr * (r * g * c), mask=mask)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"fused kernels take contiguous fp32 tensors, got {t.dtype}, contiguous={t.is_contiguous()}")


def _blocks(numels: Sequence[int]) -> tuple[list[int], int]:
    """First block of each tensor, and the total."""
    starts, total = [], 0
    for n in numels:
        starts.append(total)
        total += -(-n // BLOCK)
    return starts, total


def _table(rows: list[list[int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host rows -> one flat device tensor, copied without a sync (pinned memory on CUDA; the host
    allocator keeps the pinned block until the copy has run)."""
    host = torch.tensor([v for row in rows for v in row], dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def _search_steps(count: int) -> int:
    return math.ceil(math.log2(count)) + 1 if count > 1 else 1


def _prepare(items: Sequence[tuple], n_tensors: int) -> tuple[list[tuple], list[list[int]], int]:
    """Drop empty items, check their first ``n_tensors`` entries (the tensors, numel from the second)
    and lay out the table rows both kernels start with: each tensor's address, then numel and first
    block per item. Returns (items, rows, total blocks)."""
    items = [it for it in items if it[1].numel()]
    for it in items:
        _check(*it[:n_tensors])
    numels = [it[1].numel() for it in items]
    starts, total = _blocks(numels)
    return items, [[it[k].data_ptr() for it in items] for k in range(n_tensors)] + [numels, starts], total


def sgd_sai_step_(items: Sequence[tuple], *, decay: float, mu: float) -> None:
    """The SGD-SaI step of weight fragments ``(param, grad, momentum, lr * scale, first)`` in place,
    all in one launch (tensors of equal numel per item, contiguous fp32, one device)."""
    items, rows, total = _prepare(items, 3)
    if not items:
        return
    device = items[0][0].device
    itab = _table(rows + [[int(bool(first)) for *_, first in items]], torch.int64, device)
    ftab = _table([[float(scale) for *_, scale, _ in items]], torch.float32, device)
    _sgd_sai_kernel[(total,)](itab, ftab, len(items), float(decay), float(mu), SEARCH=_search_steps(len(items)),
                              BLOCK_SIZE=BLOCK)


def row_col_scaled_update_(items: Sequence[tuple], *, lr: float, decay: float) -> None:
    """p <- decay p - lr r∘G∘c in place for fragments ``(param, grad, row_scale, col_scale, start, n)``:
    the flat range [start, start + numel) of an m x n matrix, whose own scale vectors are ``row_scale``
    (m,) and ``col_scale`` (n,); all in one launch."""
    items, rows, total = _prepare(items, 4)
    if not items:
        return
    itab = _table(rows + [[int(s) for *_, s, _ in items], [int(n) for *_, n in items]], torch.int64,
                  items[0][0].device)
    wide = any(start + g.numel() + BLOCK >= 2**31 for _, g, _, _, start, _ in items)  # positions past int32
    _row_col_kernel[(total,)](itab, len(items), float(lr), float(decay), WIDE=wide,
                              SEARCH=_search_steps(len(items)), BLOCK_SIZE=BLOCK)
