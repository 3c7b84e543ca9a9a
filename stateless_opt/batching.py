"""Batching and chunking of matrix fragments, shared by every matrix rule.

* ``chunks``: split the group's matrices (in the global order all ranks agree on) into chunks whose
  fp32 temporaries stay under a byte budget, so batching never raises the memory peak by more than
  one chunk. Every rank computes the same chunks, so collectives inside a chunk match.
* ``FragmentStack``: local fragments of identical geometry (m, n, start, end) stacked into one fp32
  ``(B, L)`` tensor of squared gradients; row/column statistics of its pieces go into chunk-wide
  vectors indexed by the global row/column offsets of each matrix, which is what gets all-reduced.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import accumulate
from typing import Callable, Sequence

import torch

from .fragments import MatrixFragment, pieces
from .ops import floor_norms


def chunks(items: Sequence, cost_bytes: Callable[[object], int], budget: int) -> list[list[int]]:
    """Consecutive index chunks of ``items`` whose total ``cost_bytes`` stays <= budget (a single
    item over budget gets a chunk of its own)."""
    out: list[list[int]] = []
    current, used = [], 0
    for i, item in enumerate(items):
        c = cost_bytes(item)
        if current and used + c > budget:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += c
    if current:
        out.append(current)
    return out


class ChunkIndex:
    """Global row/column offsets of the matrices of one chunk (identical on every rank)."""

    def __init__(self, frags: Sequence[MatrixFragment], device: torch.device):
        ms = [f.m for f in frags]
        ns = [f.n for f in frags]
        self.row_offset = [0, *accumulate(ms)][:-1]
        self.col_offset = [0, *accumulate(ns)][:-1]
        self.rows, self.cols = sum(ms), sum(ns)
        count = len(frags)
        idx = torch.arange(count, device=device)
        self.row_matrix = torch.repeat_interleave(idx, torch.tensor(ms, device=device))
        self.col_matrix = torch.repeat_interleave(idx, torch.tensor(ns, device=device))
        self.m = torch.tensor(ms, dtype=torch.float32, device=device)
        self.n = torch.tensor(ns, dtype=torch.float32, device=device)
        self.count = count


class FragmentStack:
    """Same-geometry local fragments of one chunk. ``x`` (B, L) fp32 first holds the squared gradients
    S = G∘G, which is all the Sinkhorn rounds read; ``finalize`` then overwrites it with r∘G∘c.

    Why squares and scale vectors: the iterate r_i G_ij c_j is never materialised during the rounds.
    A row's norm is sqrt(Σ_j S_ij c_j²) and a column's sqrt(Σ_i r_i² S_ij): batched mat-vecs that read
    S once per half-round and write nothing, instead of a norm pass plus a read-modify-write scaling
    pass over the matrix. At L rounds that is ~(2L + 7) x 4 bytes per element instead of ~(6L + 5) x 4.
    """

    def __init__(self, frags: list[MatrixFragment], positions: list[int], index: ChunkIndex):
        self.frags = frags
        f0 = frags[0]
        start, end = f0.local_range
        self.x = torch.empty((len(frags), end - start), dtype=torch.float32, device=f0.grad.device)
        for row, f in zip(self.x, frags):
            if f.grad.dtype == torch.float32:
                torch.mul(f.grad.reshape(-1), f.grad.reshape(-1), out=row)
            else:
                row.copy_(f.grad.reshape(-1)).square_()
        device = self.x.device
        row_off = torch.tensor([index.row_offset[p] for p in positions], device=device)
        col_off = torch.tensor([index.col_offset[p] for p in positions], device=device)
        self.parts = []
        for pc in pieces(f0.n, start, end):
            h, w = pc.r1 - pc.r0, pc.c1 - pc.c0
            rows = row_off[:, None] + torch.arange(pc.r0, pc.r1, device=device)
            cols = col_off[:, None] + torch.arange(pc.c0, pc.c1, device=device)
            self.parts.append((pc.offset, h, w, rows, cols))

    def _views(self, t: torch.Tensor):
        for offset, h, w, rows, cols in self.parts:
            yield t[:, offset : offset + h * w].view(len(self.frags), h, w), rows, cols

    def add_row_sumsq(self, out: torch.Tensor, col_scale_sq: torch.Tensor) -> None:
        """out[row] += Σ_j S_ij c_j² over this stack's pieces (the pre-row-scale squared row norms)."""
        for view, rows, cols in self._views(self.x):
            part = torch.matmul(view, col_scale_sq[cols].unsqueeze(-1)).squeeze(-1)
            out.index_add_(0, rows.reshape(-1), part.reshape(-1))

    def add_col_sumsq(self, out: torch.Tensor, row_scale_sq: torch.Tensor) -> None:
        """out[col] += Σ_i r_i² S_ij over this stack's pieces (the pre-column-scale squared norms)."""
        for view, rows, cols in self._views(self.x):
            part = torch.matmul(row_scale_sq[rows].unsqueeze(-2), view).squeeze(-2)
            out.index_add_(0, cols.reshape(-1), part.reshape(-1))

    def finalize(self, row_scale: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
        """x <- r∘G∘c, read from the (untouched) gradients; returns x."""
        for row, f in zip(self.x, self.frags):
            row.copy_(f.grad.reshape(-1))
        for view, rows, cols in self._views(self.x):
            view.mul_(row_scale[rows].unsqueeze(-1)).mul_(col_scale[cols].unsqueeze(-2))
        return self.x


def stack_local(frags: Sequence[MatrixFragment], index: ChunkIndex) -> list[FragmentStack]:
    """Group the chunk's non-empty local fragments by geometry and stack each group."""
    by_geometry: dict[tuple, list[int]] = defaultdict(list)
    for pos, f in enumerate(frags):
        s, e = f.local_range
        if e > s:
            by_geometry[(f.m, f.n, s, e, f.grad.dtype)].append(pos)
    return [FragmentStack([frags[p] for p in positions], positions, index) for positions in by_geometry.values()]


def needs_row_reduce(frags: Sequence[MatrixFragment]) -> bool:
    """Rows are cut across ranks (ZeRO's flat partitions): row statistics need a reduction."""
    for f in frags:
        if f.weight.replicated:
            continue
        for s, e in f.ranges:
            if e > s and (s % f.n or e % f.n):
                return True
    return False


def needs_col_reduce(frags: Sequence[MatrixFragment]) -> bool:
    """Some matrix is spread over more than one rank: column statistics need a reduction."""
    return any(
        not f.weight.replicated and sum(1 for s, e in f.ranges if e > s) > 1 for f in frags
    )


def normalize_rows_cols(
    frags: Sequence[MatrixFragment],
    comm,
    *,
    iterations: int,
    eps: float,
    columns: bool,
    apply: Callable[[list[MatrixFragment], torch.Tensor], None],
    device: torch.device,
) -> None:
    """SR-Sinkhorn on fragments: ``iterations`` x {every row to l2 norm sqrt(n); then (if ``columns``)
    every column to l2 norm sqrt(m)}; then ``apply(frags, x)`` for each stack.

    The iterate is diag(r) G diag(c): only the row scales r and column scales c change per half-round
    (see ``FragmentStack``). Row sums of squares come from fragment-local partial sums, all-reduced as
    one vector for all matrices (skipped where rows are whole on every rank); columns likewise.
    """
    index = ChunkIndex(frags, device)
    stacks = stack_local(frags, index)
    reduce_rows, reduce_cols = needs_row_reduce(frags), needs_col_reduce(frags)
    row_scale = torch.ones(index.rows, dtype=torch.float32, device=device)
    col_scale = torch.ones(index.cols, dtype=torch.float32, device=device)
    for _ in range(iterations):
        _normalize_axis(stacks, index, comm, eps, rows=True, reduce=reduce_rows, scale=row_scale, other=col_scale)
        if columns:
            _normalize_axis(stacks, index, comm, eps, rows=False, reduce=reduce_cols, scale=col_scale, other=row_scale)
    for st in stacks:
        apply(st.frags, st.finalize(row_scale, col_scale))


def _normalize_axis(stacks, index: ChunkIndex, comm, eps, *, rows: bool, reduce: bool, scale: torch.Tensor,
                    other: torch.Tensor) -> None:
    """One half-round: set the row (or column) scales so every row (column) of every matrix has l2 norm
    sqrt(n) (or sqrt(m)).

    Norms are taken *before* this axis's own scale (under the other axis's), so the floor is relative
    to the matrix's own scale in every round and a row floored once stays floored: re-flooring an
    already scaled row would grow it by ~1/eps per round until a 1e-30 row reached full norm.
    """
    size = index.rows if rows else index.cols
    device = index.m.device
    sumsq = torch.zeros(size, dtype=torch.float32, device=device)
    other_sq = other.square()
    for st in stacks:
        (st.add_row_sumsq if rows else st.add_col_sumsq)(sumsq, other_sq)
    if reduce:
        comm.all_reduce_sum_(sumsq)
    matrix_of = index.row_matrix if rows else index.col_matrix
    norms = sumsq.clamp_min_(0).sqrt_()
    fro = torch.zeros(index.count, dtype=torch.float32, device=device).index_add_(0, matrix_of, norms.square()).sqrt_()
    count = index.m if rows else index.n  # how many rows (columns) share the matrix's norm
    target = (index.n if rows else index.m).sqrt()[matrix_of]  # each row gets norm sqrt(n)
    scale.copy_(target / floor_norms(norms, matrix_of, fro, count, eps))


def matrix_bytes(f: MatrixFragment) -> int:
    """fp32 bytes of a whole matrix (the unit of chunk budgets)."""
    return 4 * f.m * f.n
