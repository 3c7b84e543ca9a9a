"""Layouts: which piece of each weight this rank holds, and over which process groups.

Every backend reduces to one picture. A weight is viewed as a matrix (``shape[0]`` rows, the product
of the other dims as columns); each rank of a process group holds a piece of it, stored row-major and
contiguous in a local tensor:

* a ``FlatRange`` [start, end) of the flattened weight: whole tensors (one process, DDP), FSDP2's
  ``Shard(0)`` rows, and ZeRO's flat partitions, which start and end mid-row;
* a ``Box`` rows [r0, r1) x columns [c0, c1): a column split (tensor parallel ``Shard(1)``) or both.

A ``WeightShard`` is this rank's piece plus every rank's extent (so collectives are sized without
asking), with the process groups named by what travels over them: ``group`` holds the pieces (whole
matrices are gathered to owners over it, scalar statistics add up over it), ``row_groups`` are where
the partial sums of a row add up (its columns are split over them), ``col_groups`` likewise for
columns, ``agree_groups`` hold copies (HSDP's replicate dims) and only vote on skipping a step.

*Layouts* turn what sits in ``param_group["params"]`` into ``WeightShard``s. An optimizer consults its
ordered list ``optimizer.layouts`` at every ``step()`` (never cached: accelerate and ZeRO-3 swap the
tensors in ``param_groups``); the first layout that recognises a tensor answers. The defaults are
``DTensorLayout`` (FSDP2/HSDP, tensor parallelism, FSDP2 x TP), ``ReplicatedLayout`` (DDP: the
group's ``replicate_group``) and ``LocalLayout``; an engine that hands the optimizer tensors of its
own (DeepSpeed's ZeRO partitions, ``stateless_opt.integrations.deepspeed``) puts its layout first with
``optimizer.add_layout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Sequence

import torch
import torch.distributed as dist

from .collectives import agreement_groups, replica_group


# ------------------------------------------------------------------------------------ extents
class Piece(NamedTuple):
    """A rectangle ``rows [r0, r1) x cols [c0, c1)`` of a matrix, stored row-major contiguously in a
    rank's local tensor at flat ``offset``."""

    r0: int
    r1: int
    c0: int
    c1: int
    offset: int

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


def pieces(n: int, start: int, end: int) -> tuple[Piece, ...]:
    """Split the flat range [start, end) of a matrix with ``n`` columns into at most three pieces:
    a partial first row, whole rows, a partial last row. Rows cut mid-way (ZeRO) are the normal case."""
    if start >= end:
        return ()
    rs, cs = divmod(start, n)
    re_, ce = divmod(end, n)
    if rs == re_:
        return (Piece(rs, rs + 1, cs, ce, 0),)
    out, offset, body_start = [], 0, rs
    if cs:
        out.append(Piece(rs, rs + 1, cs, n, 0))
        offset, body_start = n - cs, rs + 1
    if re_ > body_start:
        out.append(Piece(body_start, re_, 0, n, offset))
        offset += (re_ - body_start) * n
    if ce:
        out.append(Piece(re_, re_ + 1, 0, ce, offset))
    return tuple(out)


class FlatRange(NamedTuple):
    """Elements [start, end) of a row-major matrix (or of a flattened weight)."""

    start: int
    end: int

    @property
    def numel(self) -> int:
        return max(self.end - self.start, 0)

    def pieces(self, m: int, n: int) -> tuple[Piece, ...]:
        return pieces(n, self.start, self.end)

    def cuts_rows(self, m: int, n: int) -> bool:
        """Some row is only partly here (ZeRO cuts mid-row)."""
        return self.numel > 0 and bool(self.start % n or self.end % n)

    def cuts_cols(self, m: int, n: int) -> bool:
        return self.numel > 0 and self.numel < m * n

    def kernel_view(self, m: int, n: int) -> tuple[int, int, int, int, int, int]:
        """(rows r0, r1, cols c0, c1, start, width): this piece as the fused kernels address it, the flat
        range [start, start + numel) of a matrix of ``width`` columns whose scale vectors are rows
        [r0, r1) and columns [c0, c1) of the whole matrix's."""
        return 0, m, 0, n, self.start, n

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This piece of an (m, n) matrix, flat in local order (a view where possible)."""
        return whole.reshape(-1)[self.start : self.end]

    def put(self, whole: torch.Tensor, local: torch.Tensor) -> None:
        """Write this rank's flat ``local`` data into its place in the contiguous (m, n) ``whole``."""
        whole.view(-1)[self.start : self.end] = local

    def clip(self, lo: int, hi: int) -> "FlatRange":
        """The part inside [lo, hi), relative to lo (empty as (0, 0))."""
        s, e = max(self.start, lo), min(self.end, hi)
        return FlatRange(s - lo, e - lo) if s < e else FlatRange(0, 0)


class Box(NamedTuple):
    """Rows [r0, r1) x columns [c0, c1) of a matrix, stored row-major contiguously (a tensor-parallel
    column split, or rows x columns of a 2-D mesh)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def numel(self) -> int:
        return max(self.r1 - self.r0, 0) * max(self.c1 - self.c0, 0)

    def pieces(self, m: int, n: int) -> tuple[Piece, ...]:
        return (Piece(self.r0, self.r1, self.c0, self.c1, 0),) if self.numel else ()

    def cuts_rows(self, m: int, n: int) -> bool:
        return self.numel > 0 and (self.c0 > 0 or self.c1 < n)

    def cuts_cols(self, m: int, n: int) -> bool:
        return self.numel > 0 and (self.r0 > 0 or self.r1 < m)

    def kernel_view(self, m: int, n: int) -> tuple[int, int, int, int, int, int]:
        return self.r0, self.r1, self.c0, self.c1, 0, self.c1 - self.c0

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        return whole[self.r0 : self.r1, self.c0 : self.c1].reshape(-1)

    def put(self, whole: torch.Tensor, local: torch.Tensor) -> None:
        whole[self.r0 : self.r1, self.c0 : self.c1] = local.view(self.r1 - self.r0, self.c1 - self.c0)


Extent = FlatRange | Box


# ------------------------------------------------------------------------------------ shards
@dataclass
class WeightShard:
    """This rank's piece of one weight, every rank's extent, and the process groups (see the module
    docstring). ``replicated``: every rank of ``group`` holds the whole, identical gradient (DDP), so
    statistics need no reduction and whole-matrix work may be split over the ranks."""

    key: tuple  # stable identity of the weight inside its param group, equal on all ranks
    shape: tuple[int, ...]  # the weight's true (full, unsharded) shape
    extents: list[Extent]  # per rank of ``group``: flat ranges of the flattened weight, or boxes of its matrix view
    rank: int  # this rank's index in ``group``
    grad: torch.Tensor  # 1-D view of the local gradient, numel == extents[rank].numel
    param: torch.Tensor  # 1-D view of the local weight to update (the fp32 master under ZeRO), same numel
    group: dist.ProcessGroup | None = None  # None: the default group (or one process when world == 1)
    replicated: bool = False
    row_groups: tuple = ()  # where row statistics add up: groups the columns are split over
    col_groups: tuple = ()  # where column statistics add up: groups the rows are split over
    agree_groups: tuple = ()  # copies of this piece (HSDP replicate dims): they only vote on skipping a step
    unit_index: int = 0  # which weight of the unit tensor (a ZeRO flat partition holds many)
    offset: int = 0  # where this weight's local piece starts in the unit's local flat tensor
    # the weight's largest gradient magnitude over every rank (a 0-d device tensor, set by the screen):
    # the rules scale by it so that squares neither overflow nor underflow
    peak: torch.Tensor | None = None
    # a non-contiguous weight: ``param`` is a contiguous copy, written back into this after the update
    staged: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local(self) -> Extent:
        return self.extents[self.rank]

    @property
    def world(self) -> int:
        return len(self.extents)

    @property
    def process_groups(self) -> tuple:
        """Every process group this weight lives in (pieces, statistics, copies), each once: the ranks
        that must agree on every decision about it (e.g. skipping a step)."""
        out = []
        if self.world > 1:
            out.append(self.group)
        for g in (*self.row_groups, *self.col_groups, *self.agree_groups):
            if not any(g is o for o in out):
                out.append(g)
        return tuple(out)

    @property
    def signature(self) -> tuple:
        """Weights with equal signatures share one batched executor call (the same collectives)."""
        return (self.group, self.world, self.replicated, self.row_groups, self.col_groups)

    @property
    def holders(self) -> tuple:
        """The part of the signature whole-matrix work depends on (owner compute gathers over ``group``
        only): a tensor-parallel block's column- and row-split weights share one owner assignment."""
        return (self.group, self.world, self.replicated)


@dataclass
class MatrixFragment:
    """This rank's piece of one (m x n) matrix of a weight.

    A weight of ``ndim >= 2`` is viewed as ``batch`` matrices of shape ``(shape[k], prod(rest))``
    where ``k`` is the number of leading batch dims (0 for Linear/conv, 1 for experts stored as
    (E, out, in)). Extents here are relative to the matrix, not to the weight.
    """

    weight: WeightShard
    index: int  # which matrix of the weight (0 unless there are batch dims)
    m: int
    n: int
    extents: list[Extent]
    grad: torch.Tensor
    param: torch.Tensor

    @property
    def key(self) -> tuple:
        return (*self.weight.key, self.index)

    @property
    def local(self) -> Extent:
        return self.extents[self.weight.rank]

    @property
    def whole_bytes(self) -> int:
        """fp32 bytes of the whole matrix (the unit of chunk budgets)."""
        return 4 * self.m * self.n


def tensor_batch_dims(shape: Sequence[int], batch_dims: int) -> int:
    """The batch dims a group's ``batch_dims`` gives one weight: at most ``ndim - 2``, so with
    ``batch_dims=1`` an (E, out, in) expert stack is E matrices while a 2-D weight beside it stays one."""
    return max(min(batch_dims, len(shape) - 2), 0)


def matrix_shape(shape: Sequence[int], batch_dims: int = 0) -> tuple[int, int, int]:
    """(count, m, n) of the matrices a weight is viewed as; conv weights become (out, in*kh*kw)."""
    shape = tuple(shape)
    if len(shape) < 2 + batch_dims:
        raise ValueError(
            f"a matrix-rule weight needs at least {2 + batch_dims} dims (batch_dims={batch_dims}), "
            f"got shape {shape}"
        )
    count = math.prod(shape[:batch_dims])
    return count, shape[batch_dims], math.prod(shape[batch_dims + 1 :])


def split_matrices(
    shard: WeightShard, batch_dims: int = 0, shape2d: tuple[int, int] | None = None
) -> list[MatrixFragment]:
    """Cut a weight's shard into per-matrix fragments (every matrix is listed, even if not held).
    ``shape2d`` views the whole weight as one (m, n) matrix instead (1-D tensors as one row)."""
    count, m, n = (1, *shape2d) if shape2d else matrix_shape(shard.shape, batch_dims)
    if count == 1:  # the weight is the matrix: its extents are the matrix's
        return [MatrixFragment(shard, 0, m, n, shard.extents, shard.grad, shard.param)]
    if any(isinstance(e, Box) for e in shard.extents):
        raise NotImplementedError(f"box shards of weights with batch dims (shape {shard.shape}) are not supported")
    size = m * n
    start = shard.local.start
    out = []
    for b in range(count):
        lo, hi = b * size, (b + 1) * size
        extents = [e.clip(lo, hi) for e in shard.extents]
        s, e = extents[shard.rank]
        a = (lo + s) - start if e > s else 0
        out.append(MatrixFragment(shard, b, m, n, extents, shard.grad[a : a + e - s], shard.param[a : a + e - s]))
    return out


def batch_runs(frags: Sequence[MatrixFragment], by: str = "signature") -> list[list[MatrixFragment]]:
    """The fragments in one global order every rank agrees on, split into runs that share a signature
    (the same collectives; ``by="holders"``: only the holders' group, for owner compute): runs in order
    of first appearance, and inside each, same shapes together (batching), then by position. Usually
    one run: a param group has one layout (tensor parallelism: one per row/column split)."""
    ordered = sorted(frags, key=lambda f: (f.m, f.n, f.key))
    runs: list[list[MatrixFragment]] = []
    for f in ordered:
        sig = getattr(f.weight, by)
        run = next((r for r in runs if _same(getattr(r[0].weight, by), sig)), None)
        if run is None:
            runs.append([f])
        else:
            run.append(f)
    return runs


def _same(a: tuple, b: tuple) -> bool:
    """Signatures compare process groups by identity (a ProcessGroup's == is identity anyway)."""
    return len(a) == len(b) and all(
        (x is y) if not isinstance(x, tuple) else (len(x) == len(y) and all(p is q for p, q in zip(x, y)))
        for x, y in zip(a, b)
    )


# ------------------------------------------------------------------------------------ layouts
class Layout(Protocol):
    """Turns one tensor of ``param_group["params"]`` into the weight shards it holds, or returns None
    when the tensor is not of its kind (the next layout in ``optimizer.layouts`` is asked)."""

    def shards(self, tensor: torch.Tensor, group: dict, key: tuple) -> list[WeightShard] | None: ...


FLAT_PARTITION_HINT = (
    "this optimizer is being stepped on a flattened tensor (a DeepSpeed ZeRO partition?) with no layout "
    "attached; `import stateless_opt.integrations.deepspeed` before `deepspeed.initialize(...)` so the "
    "optimizer knows which weights the partition holds"
)


def true_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The weight's real shape, also under ZeRO-3 ``zero.Init`` (where ``p.shape`` is (0,))."""
    ds_shape = getattr(p, "ds_shape", None)
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local_views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, grad) as plain local tensors: the DTensor's local shard, else the tensor itself."""
    if is_dtensor(t):
        g = t.grad
        return t.to_local(), (g.to_local() if is_dtensor(g) else g)
    return t.data, t.grad


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError(f"a non-contiguous {type(t).__name__} local shard (strides {t.stride()}) is not supported")
    return t.view(-1)


def _staged(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(flat weight to update, tensor to write it back into): a non-contiguous weight (a transposed
    view, channels_last) is updated in a contiguous copy, copied back after the step."""
    if data.is_contiguous():
        return data.view(-1), None
    return data.contiguous().view(-1), data


def write_back_staged(shards) -> None:
    """Copy the updated contiguous copies of non-contiguous weights back (after every update of a step)."""
    for s in shards:
        if s.staged is not None:
            s.staged.copy_(s.param.view(s.staged.shape))


def attach_peaks(shards: Sequence[WeightShard], peaks: torch.Tensor) -> None:
    """Give each shard its weight's largest gradient magnitude over all ranks (``peaks[i]``, a device
    tensor the screen reduced): the rules' scale, with no collective of their own."""
    for s, p in zip(shards, peaks):
        s.peak = p


def _check_whole_tensor(tensor: torch.Tensor, group: dict) -> None:
    """A 1-D tensor shaped like none of the weights the group was built with is a flat partition: as
    one weight, SGD-SaI or the fallback would update it silently wrong, the matrix rule not at all."""
    shapes = group.get("_shapes")
    if tensor.dim() == 1 and shapes and tuple(tensor.shape) not in {tuple(s) for s in shapes}:
        raise RuntimeError(FLAT_PARTITION_HINT)


@dataclass
class LocalLayout:
    """One process, or a tensor nobody shares: the whole tensor is the only shard. Under an initialised
    job it still votes on skipping a step over the default group (``collectives.agreement_groups``)."""

    def shards(self, tensor, group, key):
        _check_whole_tensor(tensor, group)
        n = tensor.numel()
        param, staged = _staged(tensor.data)
        return [WeightShard(key, tuple(tensor.shape), [FlatRange(0, n)], 0, tensor.grad.reshape(-1), param,
                            agree_groups=agreement_groups(group.get("replicate_group")), staged=staged)]


@dataclass
class ReplicatedLayout:
    """DDP: every rank of the group's ``replicate_group`` holds the whole, identical (already
    all-reduced) gradient. Not this layout when the group names none, or it has one rank."""

    def shards(self, tensor, group, key):
        pg = replica_group(group.get("replicate_group"))
        if pg is None:
            return None
        _check_whole_tensor(tensor, group)
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        n = tensor.numel()
        param, staged = _staged(tensor.data)
        return [
            WeightShard(key, tuple(tensor.shape), [FlatRange(0, n)] * world, rank, tensor.grad.reshape(-1), param,
                        group=pg, replicated=True, staged=staged)
        ]


class MeshPlacement(NamedTuple):
    """Where a DTensor of one shape, mesh and placements lives, as the optimizer needs it: every holder's
    extent (indexed by rank in ``group``), this rank's, and the process groups by what travels there."""

    extents: list
    rank: int
    local_shape: tuple[int, ...]
    group: object  # the holders: every mesh dim that splits the tensor (flattened when several do)
    row_groups: tuple  # the mesh dims that split a row (tensor dims >= 1), as one group
    col_groups: tuple  # the mesh dims that split a column (tensor dim 0), as one group
    agree_groups: tuple  # Replicate mesh dims: copies that only vote on skipping


def strided_shard_type():
    """torch's ``_StridedShard`` placement class (FSDP2 over tensor parallelism), or None."""
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover - torch without _StridedShard
        return None
    return _StridedShard


def _chunk(lo: int, hi: int, parts: int, index: int) -> tuple[int, int]:
    """Piece ``index`` of [lo, hi) cut ``torch.chunk``-style into ``parts`` (ceil-sized, trailing
    pieces may be empty): DTensor's ``Shard`` and FSDP2's row cut alike."""
    size = hi - lo
    step = -(-size // parts) if size else 0
    return lo + min(index * step, size), lo + min((index + 1) * step, size)


def shard_order(placements: Sequence, mesh_shape: Sequence[int], ndim: int, where: str = "") -> dict[int, list[int]]:
    """Tensor dim -> the mesh dims that cut it, in the order the cuts were made.

    ``Shard(d)`` cuts apply left to right over the mesh dims. ``_StridedShard(d, split_factor=k)`` is
    what FSDP2 writes on its data-parallel dim when tensor parallelism already cut dim ``d`` into ``k``
    pieces on mesh dims to its right (torchtitan's FSDP2 over ``ColwiseParallel``): FSDP2 cut each TP
    piece again, so that cut is applied after those (torch 2.11 and 2.13 both write it so). Anything
    else (a strided cut whose factor is not those dims' product, two strided cuts of one dim, a cut of
    a dim past the matrix's columns) is refused rather than guessed."""
    from torch.distributed.tensor import Replicate, Shard

    strided = strided_shard_type()
    order: dict[int, list[int]] = {}
    pending: dict[int, tuple[int, int]] = {}  # tensor dim -> (mesh dim, split factor) of its strided cut
    for i, p in enumerate(placements):
        if strided is not None and isinstance(p, strided):
            if p.dim in pending:
                raise ValueError(f"{where}unsupported placements {tuple(placements)}: two strided cuts of dim {p.dim}")
            pending[p.dim] = (i, int(p.split_factor))
        elif isinstance(p, Shard):
            if mesh_shape[i] > 1:
                order.setdefault(p.dim, []).append(i)
        elif not isinstance(p, Replicate):
            raise ValueError(
                f"{where}unsupported DTensor placement {p} on mesh dim {i} (placements {tuple(placements)}): "
                "stateless_opt steps Shard, FSDP2's _StridedShard and Replicate parameters"
            )
    for d, (i, factor) in pending.items():
        after = [j for j in order.get(d, []) if j > i]
        if factor != math.prod(mesh_shape[j] for j in after):
            raise ValueError(
                f"{where}unsupported placements {tuple(placements)}: _StridedShard(dim={d}, split_factor={factor}) "
                f"on mesh dim {i} is not FSDP2 over tensor parallelism (the mesh dims after it cut dim {d} into "
                f"{math.prod(mesh_shape[j] for j in after)} pieces)"
            )
        if mesh_shape[i] > 1:
            order.setdefault(d, []).append(i)  # FSDP2 cut the TP pieces: after them
    for d in order:
        if d < 0 or d >= max(ndim, 1):
            raise ValueError(f"{where}placements {tuple(placements)} cut dim {d} of a {ndim}-D tensor")
    if ndim >= 3 and any(d >= 2 for d in order):
        raise ValueError(
            f"{where}placements {tuple(placements)} cut dim {max(order)} of a {ndim}-D weight: its pieces are not "
            "rectangles of the (shape[0], rest) matrix the rules see; only dims 0 and 1 may be sharded"
        )
    return order


class DTensorLayout:
    """Any DTensor: FSDP2 / HSDP (``Shard(0)`` rows over the shard dim), tensor parallelism
    (``ColwiseParallel``: ``Shard(0)``, rows; ``RowwiseParallel``: ``Shard(1)``, columns) and both on a
    2-D mesh (FSDP2's ``Shard(0)`` or ``_StridedShard(0)`` on "dp" over TP's cut on "tp"), uneven and
    empty pieces included (``torch.chunk`` cuts).

    Each rank's piece is a rectangle of the weight's (shape[0], rest) matrix: a ``FlatRange`` of whole
    rows where no mesh dim cuts columns, else a ``Box``. The groups follow the mesh dims: the holders
    are the mesh dims that cut the tensor (one group, flattened when several do: whole matrices are
    gathered and scalar statistics summed over it, owners balanced over all its ranks); row statistics
    add up over the dims that cut columns, column statistics over the dims that cut rows; Replicate
    dims (HSDP's replicate dim, TP's replicated norms) hold copies and only vote on skipping.

    A gradient whose placements differ from its parameter's (tensor parallelism without FSDP2: a
    vocabulary-parallel embedding's gradient comes back ``Replicate``, a sequence-parallel norm's
    ``Partial``) is redistributed to the parameter's placements first, as ``torch.optim`` does
    implicitly when it mixes the two (a local slice, or the reduction the backend left undone) and
    written back to ``.grad``, so every rule reads the same local piece.
    """

    def __init__(self):
        self._plans: dict = {}  # (mesh, placements, shape) -> MeshPlacement: the layout is static
        self._flat: dict = {}  # (mesh, mesh dims) -> process group over those dims

    def shards(self, tensor, group, key):
        if not is_dtensor(tensor):
            return None
        mesh, placements, shape = tensor.device_mesh, tuple(tensor.placements), tuple(tensor.shape)
        plan = self._plans.get((mesh, placements, shape))
        if plan is None:
            plan = self._plans[(mesh, placements, shape)] = self._plan(mesh, placements, shape)
        grad = _grad_like_param(tensor)
        local = tensor.to_local()
        if tuple(local.shape) != plan.local_shape or tuple(grad.shape) != plan.local_shape:
            raise ValueError(
                f"DTensor of shape {shape} with placements {placements}: local shard {tuple(local.shape)} "
                f"(gradient {tuple(grad.shape)}), expected {plan.local_shape} from torch.chunk cuts; unsupported sharding"
            )
        return [
            WeightShard(key, shape, plan.extents, plan.rank, _flat(grad), _flat(local), group=plan.group,
                        row_groups=plan.row_groups, col_groups=plan.col_groups, agree_groups=plan.agree_groups)
        ]

    def _plan(self, mesh, placements, shape) -> MeshPlacement:
        where = f"DTensor of shape {shape}: "
        mesh_shape = tuple(mesh.shape)
        order = shard_order(placements, mesh_shape, len(shape), where)
        coord = mesh.get_coordinate()
        cutting = sorted({i for dims in order.values() for i in dims})
        replicas = tuple(mesh.get_group(i) for i in range(mesh.ndim) if i not in cutting and mesh_shape[i] > 1)
        if not cutting:  # every rank holds it whole: keep it local, copies vote on skipping
            n = math.prod(shape)
            return MeshPlacement([FlatRange(0, n)], 0, shape, None, (), (), replicas)
        pg = self._group(mesh, cutting, where)
        ranks = mesh.mesh
        extents = []
        for g in dist.get_process_group_ranks(pg):
            c = [int(x) for x in (ranks == g).nonzero()[0].tolist()]
            extents.append(self._extent(shape, order, mesh_shape, c))
        (r0, r1), (c0, c1) = self._ranges(shape, order, mesh_shape, coord)
        local_shape = (r1 - r0,) if len(shape) == 1 else (r1 - r0, c1 - c0, *shape[2:])
        row_dims = sorted({i for d, dims in order.items() if d >= 1 for i in dims})
        col_dims = order.get(0, [])
        if len(shape) <= 1:  # viewed as one row (the stateless fallback): its elements are the columns
            row_dims = col_dims = cutting
        return MeshPlacement(
            extents, dist.get_rank(pg), local_shape, pg,
            (self._group(mesh, row_dims, where),) if row_dims else (),
            (self._group(mesh, sorted(col_dims), where),) if col_dims else (), replicas,
        )

    @staticmethod
    def _ranges(shape, order, mesh_shape, coord) -> list[tuple[int, int]]:
        """[rows [r0, r1), dim-1 range [c0, c1)] of the piece at mesh coordinate ``coord``: the cuts of
        each dim applied in order."""
        spans = []
        for d in (0, 1):
            lo, hi = 0, (shape[d] if d < len(shape) else 1)
            for i in order.get(d, []):
                lo, hi = _chunk(lo, hi, mesh_shape[i], coord[i])
            spans.append((lo, hi))
        return spans

    def _extent(self, shape, order, mesh_shape, coord) -> Extent:
        (r0, r1), (c0, c1) = self._ranges(shape, order, mesh_shape, coord)
        if len(shape) <= 1:
            return FlatRange(r0, r1)
        inner = math.prod(shape[2:])
        if 1 not in order:  # whole rows: a flat range, like FSDP2's
            row = shape[1] * inner
            return FlatRange(r0 * row, r1 * row)
        return Box(r0, r1, c0 * inner, c1 * inner)

    def _group(self, mesh, dims: list[int], where: str):
        """The process group over mesh dims ``dims`` (this rank's slice of the others): the mesh's own
        for one dim, DeviceMesh's flattened one for several (created once, on every rank alike)."""
        if len(dims) == 1:
            return mesh.get_group(dims[0])
        key = (mesh, tuple(dims))
        pg = self._flat.get(key)
        if pg is None:
            names = mesh.mesh_dim_names
            if not names:
                raise ValueError(
                    f"{where}its mesh cuts it over mesh dims {dims} and has no mesh_dim_names to flatten them by; "
                    "build the mesh with init_device_mesh(..., mesh_dim_names=(...))"
                )
            pg = self._flat[key] = mesh[tuple(names[i] for i in dims)]._flatten().get_group()
        return pg


def _grad_like_param(tensor) -> torch.Tensor:
    """The local gradient of a DTensor parameter, redistributed to the parameter's placements first
    where they differ (see ``DTensorLayout``)."""
    from torch.distributed.tensor import DTensor

    grad = tensor.grad
    if not isinstance(grad, DTensor):
        return grad
    if tuple(grad.placements) != tuple(tensor.placements):
        grad = grad.redistribute(tensor.device_mesh, tensor.placements)
        tensor.grad = grad
    return grad.to_local()


def default_layouts() -> list[Layout]:
    """The layouts every optimizer starts with, in the order they are consulted."""
    return [DTensorLayout(), ReplicatedLayout(), LocalLayout()]

