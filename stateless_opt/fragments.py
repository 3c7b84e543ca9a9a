"""Fragments: which piece of each weight this rank holds, as flat ranges.

Every backend reduces to the same picture. A weight of full shape ``shape`` is viewed as one flat
index space; over the ranks of one process group each rank holds a contiguous range ``[start, end)``
of it (possibly empty, possibly cut mid-row). A ``WeightShard`` is this rank's range plus the ranges
of all other ranks (so collectives can be sized without asking), and flat views of the local gradient
and of the local weight to update (the fp32 master under ZeRO).

The optimizers never see DTensors, ZeRO partitions or DDP: a *layout* turns whatever sits in
``param_group["params"]`` into ``WeightShard``s at ``step()`` time (never cached: accelerate and
ZeRO-3 swap the tensors in ``param_groups`` between construction and step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.distributed as dist

Range = tuple[int, int]


@dataclass
class WeightShard:
    """This rank's contiguous flat range of one weight, with the ranges every group rank holds.

    ``replicated`` means every rank holds the whole weight (DDP): statistics need no reduction, and
    whole-matrix work may be split over the ranks. Otherwise the ranges are disjoint and cover the
    weight (FSDP2, ZeRO), and a statistic is the sum of the ranks' partial sums.
    """

    key: tuple  # stable identity of the weight inside its param group, equal on all ranks
    shape: tuple[int, ...]  # the weight's true (full, unsharded) shape
    ranges: list[Range]  # flat [start, end) held by each rank of ``group``
    rank: int  # this rank's index in ``group``
    grad: torch.Tensor  # 1-D view of the local gradient, numel == end - start
    param: torch.Tensor  # 1-D view of the local weight to update, same numel
    group: dist.ProcessGroup | None = None
    replicated: bool = False
    unit_index: int = 0  # which weight of the unit tensor (a ZeRO flat partition holds many)
    offset: int = 0  # where this weight's local piece starts in the unit's local flat tensor
    # Other process groups holding copies of this shard (HSDP's replicate mesh dims): they take no
    # part in the math, only in the NaN/Inf skip decision, so every replica skips the same steps.
    agree_groups: tuple = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_range(self) -> Range:
        return self.ranges[self.rank]

    @property
    def world(self) -> int:
        return len(self.ranges)


@dataclass
class MatrixFragment:
    """This rank's flat range ``[start, end)`` of one (m x n) matrix of a weight.

    A weight of ``ndim >= 2`` is viewed as ``batch`` matrices of shape ``(shape[k], prod(rest))``
    where ``k`` is the number of leading batch dims (0 for Linear/conv, 1 for experts stored as
    (E, out, in)). Ranges here are relative to the matrix, not to the weight.
    """

    weight: WeightShard
    index: int  # which matrix of the weight (0 unless there are batch dims)
    m: int
    n: int
    ranges: list[Range]
    grad: torch.Tensor
    param: torch.Tensor

    @property
    def key(self) -> tuple:
        return (*self.weight.key, self.index)

    @property
    def local_range(self) -> Range:
        return self.ranges[self.weight.rank]


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


def _clip(r: Range, lo: int, hi: int) -> Range:
    s, e = max(r[0], lo), min(r[1], hi)
    return (s - lo, e - lo) if s < e else (0, 0)


def split_matrices(
    shard: WeightShard, batch_dims: int = 0, shape2d: tuple[int, int] | None = None
) -> list[MatrixFragment]:
    """Cut a weight's shard into per-matrix fragments (every matrix is listed, even if not held).
    ``shape2d`` views the whole weight as one (m, n) matrix instead (1-D tensors as one row)."""
    count, m, n = (1, *shape2d) if shape2d else matrix_shape(shard.shape, batch_dims)
    size = m * n
    start = shard.local_range[0]
    out = []
    for b in range(count):
        lo, hi = b * size, (b + 1) * size
        ranges = [_clip(r, lo, hi) for r in shard.ranges]
        s, e = ranges[shard.rank]
        a = (lo + s) - start if e > s else 0
        out.append(
            MatrixFragment(shard, b, m, n, ranges, shard.grad[a : a + e - s], shard.param[a : a + e - s])
        )
    return out


@dataclass(frozen=True)
class Piece:
    """A rectangle ``rows [r0, r1) x cols [c0, c1)`` of a matrix stored contiguously in a fragment
    at flat offset ``offset`` (either part of one row, or whole rows)."""

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


class Layout(Protocol):
    """Turns one tensor of ``param_group["params"]`` into the weight shards it holds."""

    def shards(self, tensor: torch.Tensor, group_index: int, position: int) -> list[WeightShard]: ...


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("stateless_opt needs contiguous parameters and gradients")
    return t.view(-1)


@dataclass
class LocalLayout:
    """One process, or a tensor nobody shares: the whole tensor is the only shard."""

    def shards(self, tensor, group_index, position):
        n = tensor.numel()
        return [
            WeightShard(
                key=(group_index, position),
                shape=tuple(tensor.shape),
                ranges=[(0, n)],
                rank=0,
                grad=_flat(tensor.grad),
                param=_flat(tensor.data),
            )
        ]


@dataclass
class ReplicatedLayout:
    """DDP: every rank of ``group`` holds the whole, identical gradient (already all-reduced)."""

    group: dist.ProcessGroup | None = None

    def shards(self, tensor, group_index, position):
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        n = tensor.numel()
        return [
            WeightShard(
                key=(group_index, position),
                shape=tuple(tensor.shape),
                ranges=[(0, n)] * world,
                rank=rank,
                grad=_flat(tensor.grad),
                param=_flat(tensor.data),
                group=self.group,
                replicated=world > 1,
            )
        ]


@dataclass
class DTensorLayout:
    """FSDP2 / HSDP: a DTensor sharded along dim 0 over one mesh dim (``torch.chunk`` rows, so
    trailing ranks may hold fewer or zero rows), replicated over the others (HSDP).

    Statistics reduce over the shard dim only: the replicate dim already holds identical gradients.
    """

    def shards(self, tensor, group_index, position):
        from torch.distributed.tensor import DTensor, Replicate, Shard

        assert isinstance(tensor, DTensor)
        mesh, placements = tensor.device_mesh, tensor.placements
        shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
        for i, p in enumerate(placements):
            if not isinstance(p, (Shard, Replicate)):
                raise ValueError(f"unsupported DTensor placement {p} (mesh dim {i}); expected Shard(0) or Replicate()")
        if len(shard_dims) > 1 or any(placements[i].dim != 0 for i in shard_dims):
            raise ValueError(
                f"unsupported DTensor placements {placements}: stateless_opt supports FSDP2/HSDP "
                "sharding along dim 0 over a single mesh dim"
            )
        shape = tuple(tensor.shape)
        local = tensor.to_local()
        grad = tensor.grad.to_local() if isinstance(tensor.grad, DTensor) else tensor.grad
        if not shard_dims:  # fully replicated DTensor: like DDP over the whole mesh? keep it local.
            return LocalLayout().shards(_LocalView(local, grad, shape), group_index, position)
        mdim = shard_dims[0]
        group = mesh.get_group(mdim)
        world, rank = mesh.size(mdim), mesh.get_local_rank(mdim)
        row = math.prod(shape[1:])
        # torch.chunk semantics (FSDP2's Shard(0)): ceil-sized chunks, trailing ranks may get 0 rows.
        chunk = -(-shape[0] // world) if shape else 0
        ranges = []
        for r in range(world):
            r0, r1 = min(r * chunk, shape[0]), min((r + 1) * chunk, shape[0])
            ranges.append((r0 * row, r1 * row))
        s, e = ranges[rank]
        if local.numel() < e - s:
            raise ValueError(
                f"DTensor local shard has {local.numel()} elements, expected {e - s} from torch.chunk "
                f"of shape {shape} over {world} ranks: unsupported sharding"
            )
        replicas = tuple(
            mesh.get_group(i) for i, p in enumerate(placements) if isinstance(p, Replicate) and mesh.size(i) > 1
        )
        # FSDP2 may pad the local storage; only the leading e - s elements are real.
        return [
            WeightShard(
                key=(group_index, position),
                shape=shape,
                ranges=ranges,
                rank=rank,
                grad=_flat(grad)[: e - s],
                param=_flat(local)[: e - s],
                group=group,
                agree_groups=replicas,
            )
        ]


class _LocalView:
    """A plain tensor triple presented to LocalLayout (used for a fully replicated DTensor)."""

    def __init__(self, data, grad, shape):
        self.data, self.grad, self.shape = data, grad, torch.Size(shape)

    def numel(self):
        return self.data.numel()
