"""Triton kernels for the CUDA fast paths: elementwise updates in one pass and one launch for a whole
list of tensors, and the symmetric matrix products of SWAN's whitening.

Each kernel states the tensor-op expression it replaces; ``tests/test_kernels.py`` runs both on the
CPU through Triton's interpreter (``TRITON_INTERPRET=1``) and the GPU step benchmark compares the
optimizers' CUDA steps with their CPU reference path. The optimizers call these only where
``available(device)`` (Triton imports and the tensors live on CUDA) and the tensors are fp32 and
contiguous; everything else (CPU, bf16 weights, no Triton) takes the tensor-op path, which the
reference tests check.

* ``sgd_sai_step_``: m <- mu m + (1 - mu) g (m <- g on a weight's first step);
  p <- (1 - lr wd) p - lr (scale / max_scale) m. Reads p, g, m and writes p, m: 20 bytes a parameter.
* ``row_col_scaled_update_``: p <- (1 - lr wd) p - lr (r_i G_ij c_j) on flat fragments of m x n
  matrices (any start offset: ZeRO cuts rows). Reads G and p, writes p: 12 bytes an element,
  against 28 for materialising r∘G∘c and then applying it.
* ``update_from_``: p <- (1 - lr wd) p - lr U for updates U that are pieces of one tensor (SWAN's
  whitened batch, a receive buffer): 12 bytes an element, the decay pass folded in.
* ``sym_gram``: C = alpha X X^T + beta Y for symmetric Y: only the blocks on and below the diagonal
  are computed, each written twice (half the FLOPs of a matmul).

**Nothing the host must know.** The elementwise kernels read every value a step decides on the
device: the learning rate and weight decay from float64 device scalars (computed in float64 in the
kernel, as the host computes ``1 - lr * wd``, so an LR scheduler drives a captured step), and one
flag per weight from device memory (``keep``: 0 leaves the weight and its buffers untouched - a NaN
step, a zero gradient; SGD-SaI's ``mode``: 0 untouched, 1 first step, 2 later steps, and its scale).

**One launch per list** (like torch's ``_foreach`` kernels): a 1.3B LLaMA has ~220 weights and a
Python-side Triton launch costs tens of microseconds. The tensors' addresses, sizes and flag
addresses go in a small table; each program finds its tensor by a binary search over the table's
block offsets. A table is built once per distinct content and kept (``LaunchTables``): a step whose
tensors stay where they are copies nothing to the device, which is what lets it be captured in a
CUDA graph (pieces of a per-step tensor, e.g. SWAN's batch, are addressed as offsets into it).
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from typing import Sequence

import torch

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 2048


def available(device: torch.device) -> bool:
    """Whether the kernels run for tensors on ``device``: a CUDA GPU Triton supports (compute
    capability 7.0+); also the CPU under Triton's debugging interpreter (``TRITON_INTERPRET=1`` before
    the import), which is how the tests check them without a GPU. Not inside ``torch.compile``'s
    tracing: the launchers build their tables on the host; traced code takes the tensor-op paths."""
    if triton is None or torch.compiler.is_compiling():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return _triton_capable(device.index if device.index is not None else torch.cuda.current_device())
    return _interpreting()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _triton_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (7, 0)


def capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream of ``device``."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


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
    def _f32_at(itab, row):
        """The fp32 value at the address stored in ``itab[row]``."""
        return tl.load(tl.load(itab + row).to(tl.pointer_type(tl.float32)))

    @triton.jit
    def _decay_lr(lr_ptr, wd_ptr):
        """(1 - lr wd, lr) from float64 device scalars, the product in float64 as on the host."""
        lr = tl.load(lr_ptr).to(tl.float64)
        return (1.0 - lr * tl.load(wd_ptr).to(tl.float64)).to(tl.float32), lr

    @triton.jit
    def _sgd_sai_kernel(itab, count, lr_ptr, wd_ptr, max_ptr, mu, SEARCH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # itab rows: p, g, m addresses, scale address, mode address, numel, first block
        pid = tl.program_id(0).to(tl.int64)
        t = _owner(itab + 6 * count, count, pid, SEARCH)
        p_ptr = tl.load(itab + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(itab + count + t).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(itab + 2 * count + t).to(tl.pointer_type(tl.float32))
        scale = _f32_at(itab, 3 * count + t)
        mode = _f32_at(itab, 4 * count + t)
        numel = tl.load(itab + 5 * count + t)
        decay, lr = _decay_lr(lr_ptr, wd_ptr)
        lr_scale = (lr * (scale.to(tl.float64) / tl.load(max_ptr).to(tl.float64))).to(tl.float32)
        offs = (pid - tl.load(itab + 6 * count + t)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel * (mode != 0.0).to(tl.int64)  # mode 0: nothing read or written
        g = tl.load(g_ptr + offs, mask=mask)
        m_old = tl.load(m_ptr + offs, mask=mask)  # read on a first step too (zeros then): one step in all
        m = tl.where(mode == 1.0, g, m_old * mu + g * (1.0 - mu))
        p = tl.load(p_ptr + offs, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(p_ptr + offs, p * decay - lr_scale * m, mask=mask)

    @triton.jit
    def _row_col_kernel(itab, count, lr_ptr, wd_ptr, WIDE: tl.constexpr, SEARCH: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr):
        # itab rows: p, g, r, c addresses, keep address, numel, first block, start in the matrix, n
        pid = tl.program_id(0).to(tl.int64)
        t = _owner(itab + 6 * count, count, pid, SEARCH)
        p_ptr = tl.load(itab + t).to(tl.pointer_type(tl.float32))
        g_ptr = tl.load(itab + count + t).to(tl.pointer_type(tl.float32))
        r_ptr = tl.load(itab + 2 * count + t).to(tl.pointer_type(tl.float32))
        c_ptr = tl.load(itab + 3 * count + t).to(tl.pointer_type(tl.float32))
        keep = _f32_at(itab, 4 * count + t)
        numel = tl.load(itab + 5 * count + t)
        start = tl.load(itab + 7 * count + t)
        n = tl.load(itab + 8 * count + t)
        decay, lr = _decay_lr(lr_ptr, wd_ptr)
        offs = (pid - tl.load(itab + 6 * count + t)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel * (keep != 0.0).to(tl.int64)  # keep 0: untouched
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
        tl.store(p_ptr + offs, p * decay - lr.to(tl.float32) * (r * g * c), mask=mask)

    @triton.jit
    def _update_from_kernel(itab, count, base_ptr, lr_ptr, wd_ptr, SEARCH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        # itab rows: p address, keep address, offset of U in base, numel, first block
        pid = tl.program_id(0).to(tl.int64)
        t = _owner(itab + 4 * count, count, pid, SEARCH)
        p_ptr = tl.load(itab + t).to(tl.pointer_type(tl.float32))
        keep = _f32_at(itab, count + t)
        offset = tl.load(itab + 2 * count + t)
        numel = tl.load(itab + 3 * count + t)
        decay, lr = _decay_lr(lr_ptr, wd_ptr)
        offs = (pid - tl.load(itab + 4 * count + t)) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < numel * (keep != 0.0).to(tl.int64)  # keep 0: untouched
        u = tl.load(base_ptr + offset + offs, mask=mask)
        p = tl.load(p_ptr + offs, mask=mask)
        tl.store(p_ptr + offs, p * decay - lr.to(tl.float32) * u, mask=mask)

    @triton.jit
    def _sym_gram_kernel(x_ptr, y_ptr, c_ptr, M, K, sxb, sxr, sxc, syb, syr, syc, scb, scr, scc, alpha, beta,
                         HAS_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        """One block (i, j), j <= i, of C = alpha X X^T + beta Y (Y symmetric), written at (i, j) and
        mirrored at (j, i). Program ids enumerate the lower triangle: t = i (i + 1) / 2 + j."""
        t = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        i = ((tl.sqrt(8.0 * t.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        i = tl.where(i * (i + 1) // 2 > t, i - 1, i)  # float rounding of the root, either way
        i = tl.where((i + 1) * (i + 2) // 2 <= t, i + 1, i)
        j = t - i * (i + 1) // 2
        rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = j * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        xb = x_ptr + b * sxb
        a_ptrs = xb + rows[:, None] * sxr + ks[None, :] * sxc
        bt_ptrs = xb + ks[:, None] * sxc + cols[None, :] * sxr
        acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            kmask = ks < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(rows[:, None] < M) & kmask[None, :], other=0.0)
            bt = tl.load(bt_ptrs, mask=kmask[:, None] & (cols[None, :] < M), other=0.0)
            acc = tl.dot(a, bt, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * sxc
            bt_ptrs += BLOCK_K * sxc
        acc = acc * alpha
        inside = (rows[:, None] < M) & (cols[None, :] < M)
        if HAS_Y:
            y = tl.load(y_ptr + b * syb + rows[:, None] * syr + cols[None, :] * syc, mask=inside, other=0.0)
            acc += beta * y.to(tl.float32)
        out = acc.to(c_ptr.dtype.element_ty)
        cb = c_ptr + b * scb
        tl.store(cb + rows[:, None] * scr + cols[None, :] * scc, out, mask=inside)
        if j < i:
            tl.store(cb + cols[:, None] * scr + rows[None, :] * scc, tl.trans(out), mask=tl.trans(inside))


# ------------------------------------------------------------------------------------ launch tables
class LaunchTables:
    """Device tables of launch arguments, one per distinct content, least recently used dropped past
    ``size``. Building one copies a host list to the device (pinned memory, no sync); a step whose
    tensors stay where they are finds every table built, so it copies nothing - the condition for
    capturing it in a CUDA graph, where a missing table is an error rather than a silent copy."""

    def __init__(self, size: int = 512):
        self.size = size
        self._tables: OrderedDict = OrderedDict()

    def get(self, values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, str(device), values)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        if capturing(device):
            raise RuntimeError(
                "a kernel's launch table changed while a CUDA graph was being captured (a tensor the step "
                "reads moved since the eager warm-up step): run an eager step after any change, then capture")
        table = self._tables[key] = to_device(values, dtype, device)
        while len(self._tables) > self.size:
            self._tables.popitem(last=False)
        return table

    def tables(self) -> list[torch.Tensor]:
        return list(self._tables.values())


def to_device(values: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values -> one flat device tensor, copied without a sync (pinned memory on CUDA; the host
    allocator keeps the pinned block until the copy has run)."""
    host = torch.tensor(list(values), dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


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


def _search_steps(count: int) -> int:
    return math.ceil(math.log2(count)) + 1 if count > 1 else 1


def _launch_table(columns: list[list[int]], numels: list[int], tables: LaunchTables | None,
                  device: torch.device) -> tuple[torch.Tensor, int]:
    """The int64 table (columns, then numel and first block of each item) and the total blocks."""
    starts, total = _blocks(numels)
    values = tuple(v for col in columns + [numels, starts] for v in col)
    if tables is None:
        return to_device(values, torch.int64, device), total
    return tables.get(values, torch.int64, device), total


def scalar(value, device: torch.device) -> torch.Tensor:
    """A float64 device scalar: ``value`` if it is a tensor already, else a fill (no host copy)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((), float(value), dtype=torch.float64, device=device)


@functools.lru_cache(maxsize=None)
def ones(device: str) -> torch.Tensor:
    """A persistent fp32 1.0 on ``device``: the flag of weights that always step (host decisions)."""
    return torch.ones(1, dtype=torch.float32, device=device)


def address(t: torch.Tensor, index: int = 0) -> int:
    """Device address of element ``index`` of ``t``."""
    return t.data_ptr() + index * t.element_size()


# ------------------------------------------------------------------------------------ elementwise updates
def sgd_sai_step_(items: Sequence[tuple], *, lr, weight_decay, mu: float, max_scale=1.0,
                  tables: LaunchTables | None = None) -> None:
    """The SGD-SaI step of weight fragments ``(param, grad, momentum, scale address, mode address)`` in
    place, all in one launch: tensors of equal numel per item, contiguous fp32, one device; the scale
    and mode (0 untouched, 1 first step, 2 later) are fp32 device values at the given addresses;
    ``lr``, ``weight_decay``, ``max_scale``: float64 device scalars or numbers."""
    items = [it for it in items if it[1].numel()]
    if not items:
        return
    for it in items:
        _check(*it[:3])
    device = items[0][0].device
    columns = [[it[k].data_ptr() for it in items] for k in range(3)] + [[it[3] for it in items], [it[4] for it in items]]
    itab, total = _launch_table(columns, [it[1].numel() for it in items], tables, device)
    _sgd_sai_kernel[(total,)](itab, len(items), scalar(lr, device), scalar(weight_decay, device),
                              scalar(max_scale, device), float(mu), SEARCH=_search_steps(len(items)), BLOCK_SIZE=BLOCK)


def row_col_scaled_update_(items: Sequence[tuple], *, lr, weight_decay, tables: LaunchTables | None = None) -> None:
    """p <- (1 - lr wd) p - lr r∘G∘c in place for fragments ``(param, grad, row_scale, col_scale, start, n,
    keep address)``: the flat range [start, start + numel) of an m x n matrix, whose own scale vectors
    are ``row_scale`` (m,) and ``col_scale`` (n,); untouched where the fp32 flag at ``keep`` is 0; all
    in one launch."""
    items = [it for it in items if it[1].numel()]
    if not items:
        return
    for it in items:
        _check(*it[:4])
    device = items[0][0].device
    columns = [[it[k].data_ptr() for it in items] for k in range(4)] + [[it[6] for it in items]]
    # rows 7, 8 (start, n) go after numel and first block
    starts = [int(it[4]) for it in items]
    widths = [int(it[5]) for it in items]
    numels = [it[1].numel() for it in items]
    first, total = _blocks(numels)
    values = tuple(v for col in columns + [numels, first, starts, widths] for v in col)
    itab = tables.get(values, torch.int64, device) if tables is not None else to_device(values, torch.int64, device)
    wide = any(s + n + BLOCK >= 2**31 for s, n in zip(starts, numels))  # positions past int32
    _row_col_kernel[(total,)](itab, len(items), scalar(lr, device), scalar(weight_decay, device), WIDE=wide,
                              SEARCH=_search_steps(len(items)), BLOCK_SIZE=BLOCK)


def update_from_(base: torch.Tensor, items: Sequence[tuple], *, lr, weight_decay,
                 tables: LaunchTables | None = None) -> None:
    """p <- (1 - lr wd) p - lr base[offset : offset + p.numel()] for ``(param, offset, keep address)``
    items (untouched where the fp32 flag at ``keep`` is 0), in one launch; ``base`` is flat, fp32,
    contiguous (the table holds offsets, so a new ``base`` each step needs no new table)."""
    items = [it for it in items if it[0].numel()]
    if not items:
        return
    _check(base, *(it[0] for it in items))
    device = base.device
    columns = [[it[0].data_ptr() for it in items], [it[2] for it in items], [int(it[1]) for it in items]]
    itab, total = _launch_table(columns, [it[0].numel() for it in items], tables, device)
    _update_from_kernel[(total,)](itab, len(items), base, scalar(lr, device), scalar(weight_decay, device),
                                  SEARCH=_search_steps(len(items)), BLOCK_SIZE=BLOCK)


# ------------------------------------------------------------------------------------ symmetric products
def sym_gram(x: torch.Tensor, *, alpha: float = 1.0, beta: float = 0.0, y: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None, block: int | None = None) -> torch.Tensor:
    """C = alpha X X^T + beta Y for a batch X (B, M, K) and symmetric Y (B, M, M), fp32 accumulation,
    written in ``out_dtype`` (default X's): what ``alpha * bmm(X, X^T) + beta * Y`` computes, from the
    blocks on and below the diagonal only. C is exactly symmetric. With X = A symmetric this is
    alpha A^2 + beta A (Polar Express's polynomial)."""
    if x.dim() != 3:
        raise ValueError(f"sym_gram wants (B, M, K), got {tuple(x.shape)}")
    batch, m, k = x.shape
    out = torch.empty(batch, m, m, dtype=out_dtype or x.dtype, device=x.device)
    bm = block or _sym_block(m)
    nb = -(-m // bm)
    ys = y if y is not None else out  # unread when HAS_Y is off
    _sym_gram_kernel[(nb * (nb + 1) // 2, batch)](
        x, ys, out, m, k, *x.stride(), *ys.stride(), *out.stride(), float(alpha), float(beta),
        HAS_Y=y is not None, BLOCK_M=bm, BLOCK_K=64 if not _interpreting() else 32,
        PRECISION="ieee" if x.dtype == torch.float32 else None,  # fp32 stays fp32 (no TF32 rounding)
        num_warps=8 if bm >= 128 else 4, num_stages=3,
    )
    return out


def _sym_block(m: int) -> int:
    """Output block side: 128 for the large Gram matrices SWAN forms (tensor-core tiles), smaller for
    small ones (and in the interpreter, where the block is only a loop)."""
    if _interpreting():
        return 16
    return 128 if m >= 512 else 64
