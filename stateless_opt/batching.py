"""Batching and chunking of matrix fragments, shared by every matrix rule.

* ``chunks``: split the group's matrices (in the global order all ranks agree on) into chunks whose
  fp32 temporaries stay under a byte budget, so batching never raises the memory peak by more than
  one chunk. Every rank computes the same chunks, so collectives inside a chunk match.
* ``FragmentStack``: local fragments of identical geometry (m, n, start, end) stacked into one fp32
  ``(B, L)`` tensor; row/column statistics of its pieces go into chunk-wide vectors indexed by the
  global row/column offsets of each matrix, which is what gets all-reduced.
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
    """Same-geometry local fragments of one chunk, copied once into fp32 ``x`` of shape (B, L)."""

    def __init__(self, frags: list[MatrixFragment], positions: list[int], index: ChunkIndex):
        self.frags = frags
        f0 = frags[0]
        start, end = f0.local_range
        self.x = torch.stack([f.grad for f in frags]).float() if len(frags) > 1 else f0.grad.float()[None].clone()
        device = self.x.device
        row_off = torch.tensor([index.row_offset[p] for p in positions], device=device)
        col_off = torch.tensor([index.col_offset[p] for p in positions], device=device)
        self.parts = []
        for pc in pieces(f0.n, start, end):
            h, w = pc.r1 - pc.r0, pc.c1 - pc.c0
            view = self.x[:, pc.offset : pc.offset + h * w].view(len(frags), h, w)
            rows = row_off[:, None] + torch.arange(pc.r0, pc.r1, device=device)
            cols = col_off[:, None] + torch.arange(pc.c0, pc.c1, device=device)
            self.parts.append((view, rows, cols))

    def add_row_sumsq(self, out: torch.Tensor) -> None:
        for view, rows, _ in self.parts:
            out.index_add_(0, rows.reshape(-1), torch.linalg.vector_norm(view, dim=-1).square_().reshape(-1))

    def add_col_sumsq(self, out: torch.Tensor) -> None:
        for view, _, cols in self.parts:
            out.index_add_(0, cols.reshape(-1), torch.linalg.vector_norm(view, dim=-2).square_().reshape(-1))

    def scale_rows_(self, scale: torch.Tensor) -> None:
        for view, rows, _ in self.parts:
            view.mul_(scale[rows].unsqueeze(-1))

    def scale_cols_(self, scale: torch.Tensor) -> None:
        for view, _, cols in self.parts:
            view.mul_(scale[cols].unsqueeze(-2))


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

    Row sums of squares come from fragment-local partial sums, all-reduced as one vector for all
    matrices (skipped where rows are whole on every rank); columns likewise, from the re-scaled rows.
    """
    index = ChunkIndex(frags, device)
    stacks = stack_local(frags, index)
    reduce_rows, reduce_cols = needs_row_reduce(frags), needs_col_reduce(frags)
    row_total = torch.ones(index.rows, dtype=torch.float32, device=device)
    col_total = torch.ones(index.cols, dtype=torch.float32, device=device)
    for _ in range(iterations):
        _normalize_axis(stacks, index, comm, eps, rows=True, reduce=reduce_rows, total=row_total)
        if columns:
            _normalize_axis(stacks, index, comm, eps, rows=False, reduce=reduce_cols, total=col_total)
    for st in stacks:
        apply(st.frags, st.x)


def _normalize_axis(stacks, index: ChunkIndex, comm, eps, *, rows: bool, reduce: bool, total: torch.Tensor) -> None:
    """One half-round: every row (or column) of every matrix to l2 norm sqrt(n) (or sqrt(m)).

    ``total`` is the cumulative scale already applied to each row (column). Norms are taken *before*
    that scale (norm / total), so the floor is relative to the matrix's own scale in every round and
    a row floored once stays floored: re-flooring the already scaled row would grow it by ~1/eps per
    round until a 1e-30 row reached full norm.
    """
    size = index.rows if rows else index.cols
    device = index.m.device
    sumsq = torch.zeros(size, dtype=torch.float32, device=device)
    for st in stacks:
        (st.add_row_sumsq if rows else st.add_col_sumsq)(sumsq)
    if reduce:
        comm.all_reduce_sum_(sumsq)
    matrix_of = index.row_matrix if rows else index.col_matrix
    norms = sumsq.sqrt_().div_(total)
    fro = torch.zeros(index.count, dtype=torch.float32, device=device).index_add_(0, matrix_of, norms.square()).sqrt_()
    count = index.m if rows else index.n  # how many rows (columns) share the matrix's norm
    target = (index.n if rows else index.m).sqrt()[matrix_of]  # each row gets norm sqrt(n)
    new_total = target / floor_norms(norms, matrix_of, fro, count, eps)
    scale = new_total / total
    total.copy_(new_total)
    for st in stacks:
        (st.scale_rows_ if rows else st.scale_cols_)(scale)


def matrix_bytes(f: MatrixFragment) -> int:
    """fp32 bytes of a whole matrix (the unit of chunk budgets)."""
    return 4 * f.m * f.n
