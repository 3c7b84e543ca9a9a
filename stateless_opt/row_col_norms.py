"""Scale every row (and column) of many sharded matrices to a target l2 norm, with the norms moved as
vectors: the executor behind SinkGD's rounds and the stateless fallback.

* ``chunks``: split matrices (in the global order all ranks agree on) into chunks whose temporaries
  stay under a byte budget, so batching never raises the memory peak by more than one chunk. Every
  rank computes the same chunks, so collectives inside a chunk match.
* ``FragmentStack``: local fragments of identical geometry (m, n, local extent) stacked into one
  ``(B, L)`` tensor of squared gradients; row/column statistics of their pieces go into chunk-wide
  vectors indexed by each matrix's global row/column offsets, and those vectors are what is
  all-reduced: over the shards' ``row_groups`` where some row is split between ranks, over their
  ``col_groups`` where some column is.
* ``normalize_rows_cols``: the rounds themselves, then the update r∘G∘c written once.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Callable, Sequence

import torch

from . import kernels
from .layouts import MatrixFragment
from .precision import matmul_fp32


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


@dataclass
class FusedUpdate:
    """How ``normalize_rows_cols`` writes W <- (1 - lr wd) W - lr r∘G∘c with the fused kernel: ``lr``
    and ``weight_decay`` (numbers, or float64 device scalars on a device-decided step), the step's
    ``masks`` (``optimizer.StepMasks``: each fragment's write is masked by its weight's flag; None: all
    step) and the optimizer's launch tables."""

    lr: Any
    weight_decay: Any
    masks: Any = None
    tables: Any = None

    def keep_address(self, frag: MatrixFragment) -> int:
        if self.masks is None:
            return kernels.address(kernels.ones(str(frag.grad.device)))
        return self.masks.address(frag.weight.key)


class ChunkIndex:
    """Global row/column offsets of the matrices of one chunk (identical on every rank), and the
    chunk's row and column scale vectors (kept with the cached geometry, so the fused update's launch
    table, which holds their addresses, is built once)."""

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
        self.row_scale = torch.empty(self.rows, dtype=torch.float32, device=device)
        self.col_scale = torch.empty(self.cols, dtype=torch.float32, device=device)


class FragmentStack:
    """Same-geometry local fragments of one chunk. ``s`` (B, L) holds the squared gradients S = G∘G,
    which is all the Sinkhorn rounds read, in ``stats_dtype``; at the end the update r∘G∘c is either
    written straight into fp32 weights by the fused kernel (``fused_items``: one launch a chunk) or
    materialised in fp32 (``finalize``) for the generic apply.

    Why squares and scale vectors: the iterate r_i G_ij c_j is never materialised during the rounds.
    A row's norm is sqrt(Σ_j S_ij c_j²) and a column's sqrt(Σ_i r_i² S_ij): batched mat-vecs that read
    S once per half-round and write nothing, instead of a norm pass plus a read-modify-write scaling
    pass over the matrix. Bytes per element at L rounds (fp32 G and W): building S 4 + |S|, the rounds
    2L |S|, the fused update 12 (tensor-op path: 28); |S| = 4 (fp32) or 2 (bf16): 96 -> 38 at L = 5.
    bf16 S keeps fp32 accumulation and fp32 results (on CUDA), so each row/column sum is off by about
    one bf16 rounding of its terms, averaged: ~1e-4 relative on gradients, against 2^-9 per element.
    """

    def __init__(self, frags: list[MatrixFragment], geometry: "StackGeometry", stats_dtype: torch.dtype,
                 inv_scale: Sequence[torch.Tensor]):
        self.frags = frags
        self.row_off, self.col_off, self.parts = geometry.row_off, geometry.col_off, geometry.parts
        self.s = torch.empty((len(frags), frags[0].local.numel), dtype=stats_dtype, device=frags[0].grad.device)
        # S = (G * 2^k)^2 with 2^k (``inv_scale``, one per fragment, exact) from ``matrix_exponents``: the
        # scaled entries are at most 1 in magnitude, so their squares neither overflow nor underflow
        for row, f, inv in zip(self.s, frags, inv_scale):
            g = f.grad.reshape(-1)
            if g.dtype == torch.float32:
                torch.mul(g, inv, out=row).square_()  # a bf16 S: G * 2^k rounded, then its square
            else:
                row.copy_(g.float().mul_(inv).square_())

    def _views(self, t: torch.Tensor):
        for offset, h, w, rows, cols in self.parts:
            yield t[:, offset : offset + h * w].view(len(self.frags), h, w), rows, cols

    def _take(self, vec: torch.Tensor, index) -> torch.Tensor:
        """vec at a part's (B, k) row or column indices: a view where they are one range."""
        return vec[index[0] : index[1]].view(len(self.frags), -1) if isinstance(index, tuple) else vec[index]

    @staticmethod
    def _add_at(out: torch.Tensor, index, part: torch.Tensor) -> None:
        """out[index] += part: a plain add where the indices are one range (an indexed add costs ~40 us a
        call on an H100 whatever its size: 5 of SinkGD's 31 ms at 1.3B), else ``index_add_``."""
        if isinstance(index, tuple):
            out[index[0] : index[1]].add_(part.reshape(-1))
        else:
            out.index_add_(0, index.reshape(-1), part.reshape(-1))

    def add_row_sumsq(self, out: torch.Tensor, col_scale_sq: torch.Tensor) -> None:
        """out[row] += Σ_j S_ij c_j² over this stack's pieces (the pre-row-scale squared row norms)."""
        for view, rows, cols in self._views(self.s):
            part = matmul_fp32(view, self._take(col_scale_sq, cols).unsqueeze(-1).to(view.dtype)).squeeze(-1)
            self._add_at(out, rows, part)

    def add_col_sumsq(self, out: torch.Tensor, row_scale_sq: torch.Tensor) -> None:
        """out[col] += Σ_i r_i² S_ij over this stack's pieces (the pre-column-scale squared norms)."""
        for view, rows, cols in self._views(self.s):
            part = matmul_fp32(self._take(row_scale_sq, rows).unsqueeze(-2).to(view.dtype), view).squeeze(-2)
            self._add_at(out, cols, part)

    def fusable(self) -> bool:
        """The fused update applies: fp32 contiguous weights and gradients on a device with kernels."""
        return kernels.available(self.s.device) and all(
            f.param.dtype == f.grad.dtype == torch.float32 and f.param.is_contiguous() and f.grad.is_contiguous()
            for f in self.frags)

    def fused_items(self, row_scale: torch.Tensor, col_scale: torch.Tensor, update: FusedUpdate) -> list[tuple]:
        """This stack's fragments as ``kernels.row_col_scaled_update_`` items (see ``fusable``); S is
        no longer needed."""
        self.s = None
        items = []
        for f, r0, c0 in zip(self.frags, self.row_off, self.col_off):
            lo, hi, left, right, start, width = f.local.kernel_view(f.m, f.n)
            items.append((f.param, f.grad, row_scale[r0 + lo : r0 + hi], col_scale[c0 + left : c0 + right], start, width,
                          update.keep_address(f)))
        return items

    def finalize(self, row_scale: torch.Tensor, col_scale: torch.Tensor) -> torch.Tensor:
        """The update r∘G∘c in fp32 (B, L), read from the (untouched) gradients (S's memory is reused
        when S is fp32)."""
        x, shape = self.s, self.s.shape
        self.s = None  # a bf16 S is freed before x is allocated: the peak stays one fp32 copy
        if x.dtype != torch.float32:
            del x
            x = torch.empty(shape, dtype=torch.float32, device=row_scale.device)
        for row, f in zip(x, self.frags):
            row.copy_(f.grad.reshape(-1))
        for view, rows, cols in self._views(x):
            view.mul_(self._take(row_scale, rows).unsqueeze(-1)).mul_(self._take(col_scale, cols).unsqueeze(-2))
        return x


class StackGeometry:
    """Where the pieces of one group of same-geometry fragments (``positions`` in the chunk) sit in
    the chunk-wide row/column vectors: (offset in the fragment, h, w, row indices, column indices); the
    indices are a (start, stop) range where the B fragments' rows (columns) follow each other - whole
    matrices next to each other in a chunk, the usual case - else a (B, k) index tensor."""

    def __init__(self, frags: Sequence[MatrixFragment], positions: list[int], index: ChunkIndex,
                 device: torch.device):
        f0 = frags[positions[0]]
        self.positions = positions
        self.row_off = [index.row_offset[p] for p in positions]
        self.col_off = [index.col_offset[p] for p in positions]
        row_off = torch.tensor(self.row_off, device=device)
        col_off = torch.tensor(self.col_off, device=device)
        self.parts = []
        for pc in f0.local.pieces(f0.m, f0.n):
            rows = _span(self.row_off, pc.r0, pc.r1)
            cols = _span(self.col_off, pc.c0, pc.c1)
            if rows is None:
                rows = row_off[:, None] + torch.arange(pc.r0, pc.r1, device=device)
            if cols is None:
                cols = col_off[:, None] + torch.arange(pc.c0, pc.c1, device=device)
            self.parts.append((pc.offset, pc.r1 - pc.r0, pc.c1 - pc.c0, rows, cols))


def _span(offsets: list[int], lo: int, hi: int) -> tuple[int, int] | None:
    """(start, stop) if offsets[b] + [lo, hi) for b = 0, 1, ... are consecutive ranges, else None."""
    if all(b - a == hi - lo for a, b in zip(offsets, offsets[1:])):
        return offsets[0] + lo, offsets[-1] + hi
    return None


def chunk_geometry(frags: Sequence[MatrixFragment], device: torch.device,
                   cache: dict | None) -> tuple[ChunkIndex, list[StackGeometry]]:
    """The chunk's index and its stacks' geometry (non-empty local fragments grouped by geometry).
    Building them copies host lists to the device, which waits for the GPU to drain its queue; the
    layout is the same at every step, so the optimizer passes a ``cache`` and only the first step
    pays (the step stays a stream of launches the CPU can run ahead of)."""
    key = (str(device), tuple((f.key, f.m, f.n, type(f.local), f.local, f.grad.dtype) for f in frags))
    hit = cache.get(key) if cache is not None else None
    if hit is None:
        index = ChunkIndex(frags, device)
        by_geometry: dict[tuple, list[int]] = defaultdict(list)
        for pos, f in enumerate(frags):
            if f.local.numel:
                by_geometry[(f.m, f.n, type(f.local), f.local, f.grad.dtype)].append(pos)
        hit = (index, [StackGeometry(frags, positions, index, device) for positions in by_geometry.values()])
        if cache is not None:
            cache[key] = hit
    return hit


def rows_split(frags: Sequence[MatrixFragment]) -> bool:
    """Some rank holds only part of some row (ZeRO's mid-row cuts, a column split): row statistics
    need a reduction."""
    return any(not f.weight.replicated and any(e.cuts_rows(f.m, f.n) for e in f.extents) for f in frags)


def cols_split(frags: Sequence[MatrixFragment]) -> bool:
    """Some rank holds only part of some column (FSDP2's rows, ZeRO's ranges, a row split): column
    statistics need a reduction."""
    return any(not f.weight.replicated and any(e.cuts_cols(f.m, f.n) for e in f.extents) for f in frags)


# Smallest norm a row or column is scaled from. Matrices arrive scaled to a largest entry in [0.5, 1)
# (``matrix_exponents``), so real norms sit far above it; it only binds for an all-zero matrix (an expert
# without tokens beside live ones), whose scales sqrt(n) / NORM_FLOOR must stay finite when squared in
# fp32 (TINY's would overflow to inf, and 0 * inf is NaN).
NORM_FLOOR = 1e-15


def floor_norms(norms: torch.Tensor, matrix_of: torch.Tensor, fro: torch.Tensor, count: torch.Tensor, eps: float):
    """Clamp row (or column) norms at a floor relative to their matrix's scale, eps * ||X||_F / sqrt(count):
    a 1e-30 row in a matrix of norm 1 must not be blown up to norm sqrt(n). A zero matrix uses NORM_FLOOR."""
    floor = (eps * fro / count.sqrt()).clamp_min(NORM_FLOOR)
    return torch.maximum(norms, floor[matrix_of])


def matrix_exponents(frags: Sequence[MatrixFragment], device: torch.device) -> torch.Tensor:
    """Per matrix, the int k such that 2^k brings its largest gradient magnitude into [0.5, 1) (the update
    does not depend on a matrix's scale, and scaled entries square safely in fp32 where |g| > 1.8e19
    would overflow and |g| < 1e-19 underflow). Every rank holding a piece of a matrix must use the same k:
    the magnitude is the weight's peak over all ranks (the screen's ``WeightShard.peak``), or the matrix's
    own where this rank holds it whole (one expert of a stack) or no screen ran (one process)."""
    own = [i for i, f in enumerate(frags)
           if f.weight.peak is None or (f.m * f.n != f.weight.numel and _whole_here(f))]
    held = [i for i in own if frags[i].grad.numel()]
    norms = dict(zip(held, torch._foreach_norm([frags[i].grad for i in held], float("inf")))) if held else {}
    zero = torch.zeros((), dtype=torch.float32, device=device)
    peaks = torch.stack([norms.get(i, zero).float() if i in own else f.weight.peak.float()
                         for i, f in enumerate(frags)])
    _, e = torch.frexp(peaks)  # peak = mantissa * 2^e, mantissa in [0.5, 1) (e = 0 for a zero matrix)
    return (-e).clamp_max(126)  # 2^126: fp32's largest power of two whose reciprocal is normal


def _whole_here(f: MatrixFragment) -> bool:
    return f.weight.replicated or f.local.numel == f.m * f.n


def _pow2(k: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones(k.shape, dtype=torch.float32, device=k.device), k)


def normalize_rows_cols(
    frags: Sequence[MatrixFragment],
    *,
    row_comms: Sequence,
    col_comms: Sequence,
    iterations: int,
    eps: float,
    columns: bool,
    rows: bool = True,
    apply: Callable[[list[MatrixFragment], torch.Tensor], None],
    device: torch.device,
    stats_dtype: torch.dtype = torch.float32,
    fused_update: FusedUpdate | None = None,
    cache: dict | None = None,
    fro_comms: Sequence = (),
) -> None:
    """SR-Sinkhorn on fragments: ``iterations`` x {(if ``rows``) every row to l2 norm sqrt(n); then (if
    ``columns``) every column to l2 norm sqrt(m)}; then, for each stack, W <- (1 - lr wd) W - lr x in one
    fused pass where ``fused_update`` is given and the stack qualifies, else ``apply(frags, x)``.
    ``row_comms`` / ``col_comms``: the collectives of the shards' row / column groups (every fragment
    of a chunk shares them); ``cache``: the optimizer's dict for ``chunk_geometry``.

    The norm floor (``floor_norms``) is relative to each matrix's Frobenius norm. By default that norm
    is summed from this axis's norms, which leaves out rows (columns) held only by other ranks where
    the axis is not reduced (FSDP2's whole rows): harmless at an eps floor, which only touches rows
    near zero, wrong for a floor near the matrix's scale (the "rowclip" fallback's). ``fro_comms``:
    the collectives of the weights' holders; the matrices' local squared norms are all-reduced over
    them each half-round (one vector of a float per matrix), so the floor is the single-process one.

    The iterate is diag(r) G diag(c): only the row scales r and column scales c change per half-round
    (see ``FragmentStack``). Row sums of squares come from fragment-local partial sums, all-reduced as
    one vector for all matrices (skipped where no rank holds part of a row); columns likewise.
    """
    index, geometries = chunk_geometry(frags, device, cache)
    k = matrix_exponents(frags, device)
    inv = _pow2(k)
    stacks = [FragmentStack([frags[p] for p in g.positions], g, stats_dtype, [inv[p] for p in g.positions])
              for g in geometries]
    row_reduce = tuple(row_comms) if rows and rows_split(frags) else ()
    col_reduce = tuple(col_comms) if columns and cols_split(frags) else ()
    row_scale = index.row_scale.fill_(1.0)
    col_scale = index.col_scale.fill_(1.0)
    for _ in range(iterations):
        if rows:
            _normalize_axis(stacks, index, row_reduce, eps, rows=True, scale=row_scale, other=col_scale,
                            fro_comms=fro_comms)
        if columns:
            _normalize_axis(stacks, index, col_reduce, eps, rows=False, scale=col_scale, other=row_scale,
                            fro_comms=fro_comms)
    # The scales were found for G * 2^k; fold 2^k into them, half into each so that neither overflows
    half = torch.div(k, 2, rounding_mode="floor")
    row_scale.mul_(_pow2(half)[index.row_matrix])
    col_scale.mul_(_pow2(k - half)[index.col_matrix])
    fused = []  # one launch for every fusable fragment of the chunk
    for st in stacks:
        if fused_update is not None and st.fusable():
            fused += st.fused_items(row_scale, col_scale, fused_update)
        else:
            apply(st.frags, st.finalize(row_scale, col_scale))
    if fused:
        kernels.row_col_scaled_update_(fused, lr=fused_update.lr, weight_decay=fused_update.weight_decay,
                                       tables=fused_update.tables)


def _normalize_axis(stacks, index: ChunkIndex, reduce: tuple, eps, *, rows: bool, scale: torch.Tensor,
                    other: torch.Tensor, fro_comms: Sequence = ()) -> None:
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
    matrix_of = index.row_matrix if rows else index.col_matrix
    fro_sq = None
    if fro_comms:  # this rank's part of each matrix's squared norm, summed over the holders
        fro_sq = torch.zeros(index.count, dtype=torch.float32, device=device).index_add_(0, matrix_of, sumsq)
        for comm in fro_comms:
            comm.all_reduce_sum_(fro_sq)
    for comm in reduce:
        comm.all_reduce_sum_(sumsq)
    norms = sumsq.clamp_min_(0).sqrt_()
    if fro_sq is None:
        fro_sq = torch.zeros(index.count, dtype=torch.float32, device=device).index_add_(0, matrix_of, norms.square())
    fro = fro_sq.clamp_min_(0).sqrt_()
    count = index.m if rows else index.n  # how many rows (columns) share the matrix's norm
    target = (index.n if rows else index.m).sqrt()[matrix_of]  # each row gets norm sqrt(n)
    scale.copy_(target / floor_norms(norms, matrix_of, fro, count, eps))
