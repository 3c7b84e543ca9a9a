"""Gather whole matrices to their whitening owner, compute there, send the slices back.

This is the one seam through which SWAN sees whole matrices. With one process it is a no-op
exchange; sharded (FSDP2, ZeRO) each rank sends its fragment of matrix i to ``owner[i]`` and gets the
owner's update for exactly its fragment back: two ``all_to_all_single`` calls per chunk with explicit
uneven splits, sized from the ranges every rank knows (no size exchange). Replicated (DDP): the
owner already holds the whole gradient, so only results travel, and p ranks whiten ~1/p each.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch

from .batching import matrix_bytes
from .fragments import MatrixFragment
from .owners import assign_owners


def _sends_fragment(f: MatrixFragment, rank: int, owner: int) -> bool:
    """Does ``rank`` ship its gradient fragment of ``f`` to ``owner``?"""
    if rank == owner or f.weight.replicated:
        return False
    s, e = f.ranges[rank]
    return e > s


def _needs_result(f: MatrixFragment, rank: int, owner: int) -> bool:
    """Does ``owner`` ship a slice of the result of ``f`` to ``rank``?"""
    if rank == owner:
        return False
    s, e = f.ranges[rank]
    return e > s


def owners_and_chunks(
    frags: Sequence[MatrixFragment], world: int, cost: Callable[[MatrixFragment], float], budget_bytes: int
) -> tuple[list[int], list[list[int]]]:
    """Balanced owners over all matrices, then chunks (in the given order) such that no owner gathers
    more than ``budget_bytes`` of whole fp32 matrices at once."""
    owners = assign_owners([cost(f) for f in frags], world)
    out: list[list[int]] = []
    current: list[int] = []
    used: dict[int, int] = defaultdict(int)
    for i, f in enumerate(frags):
        b = matrix_bytes(f)
        if current and used[owners[i]] + b > budget_bytes:
            out.append(current)
            current, used = [], defaultdict(int)
        current.append(i)
        used[owners[i]] += b
    if current:
        out.append(current)
    return owners, out


def whiten_chunk(
    frags: Sequence[MatrixFragment],
    owners: Sequence[int],
    comm,
    direction: Callable[[torch.Tensor], torch.Tensor],
    apply: Callable[[list[MatrixFragment], list[torch.Tensor]], None],
    temp_budget_bytes: int = 128 * 2**20,
) -> None:
    """One chunk: gather -> ``direction`` (batched by shape, on whole (B, m, n) matrices) -> scatter back
    -> ``apply`` on this rank's fragments. Every rank calls this with the same ``frags``/``owners``."""
    me, world = comm.rank, comm.world
    device = frags[0].grad.device

    # 1. Ship fragments to owners; concatenated by destination rank, in chunk order.
    send_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for f, o in zip(frags, owners):
        if _sends_fragment(f, me, o):
            send_parts[o].append(f.grad.reshape(-1).float())
    send_splits = [sum(t.numel() for t in parts) for parts in send_parts]
    mine = [i for i, o in enumerate(owners) if o == me]
    recv_splits = [
        sum(frags[i].ranges[src][1] - frags[i].ranges[src][0] for i in mine if _sends_fragment(frags[i], src, me))
        for src in range(world)
    ]
    send = _concat(send_parts, device)
    recv = comm.all_to_all(send, send_splits, recv_splits)
    del send, send_parts

    # 2. Assemble whole matrices I own (received pieces arrive grouped by source rank).
    whole: dict[int, torch.Tensor] = {}
    for i in mine:
        f = frags[i]
        if f.weight.replicated or f.local_range == (0, f.m * f.n):
            whole[i] = f.grad.reshape(f.m, f.n).float()
            continue
        buf = torch.empty(f.m * f.n, dtype=torch.float32, device=device)
        s, e = f.local_range
        if e > s:
            buf[s:e] = f.grad.reshape(-1)
        whole[i] = buf
    offset = 0
    for src in range(world):
        for i in mine:
            f = frags[i]
            if _sends_fragment(f, src, me):
                s, e = f.ranges[src]
                whole[i][s:e] = recv[offset : offset + e - s]
                offset += e - s
    del recv

    # 3. Compute directions batched by shape, in sub-batches whose temporaries (stacked copy, centred
    #    copy, Gram-sized iterates) stay under ``temp_budget_bytes``. This rank's own slices are applied
    #    at once; only slices other ranks need are kept for the return trip.
    result: dict[int, torch.Tensor] = {}
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in mine:
        by_shape[(frags[i].m, frags[i].n)].append(i)
    for (m, n), idx in by_shape.items():
        per_matrix = 4 * (4 * m * n + 10 * min(m, n) ** 2)
        step = max(1, temp_budget_bytes // per_matrix)
        for lo in range(0, len(idx), step):
            sub = idx[lo : lo + step]
            batch = torch.stack([whole.pop(i).reshape(m, n) for i in sub])
            out = direction(batch)
            del batch
            done_frags, done_updates = [], []
            for k, i in enumerate(sub):
                flat = out[k].reshape(-1)
                s, e = frags[i].local_range
                if e > s:
                    done_frags.append(frags[i])
                    done_updates.append(flat[s:e])
                if any(_needs_result(frags[i], dst, me) for dst in range(world)):
                    result[i] = flat
            if done_frags:
                apply(done_frags, done_updates)
            del out, done_updates

    # 4. Send each rank its slice of the results; apply ours.
    back_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for dst in range(world):
        for i in mine:
            if _needs_result(frags[i], dst, me):
                s, e = frags[i].ranges[dst]
                back_parts[dst].append(result[i][s:e])
    back_splits = [sum(t.numel() for t in parts) for parts in back_parts]
    theirs = [i for i, o in enumerate(owners) if o != me]
    back_recv_splits = [0] * world
    for i in theirs:
        if _needs_result(frags[i], me, owners[i]):
            s, e = frags[i].local_range
            back_recv_splits[owners[i]] += e - s
    back = comm.all_to_all(_concat(back_parts, device), back_splits, back_recv_splits)
    del back_parts

    local_frags, local_updates = [], []
    src_offset = [sum(back_recv_splits[:r]) for r in range(world)]
    for i in theirs:
        o = owners[i]
        if _needs_result(frags[i], me, o):
            s, e = frags[i].local_range
            local_frags.append(frags[i])
            local_updates.append(back[src_offset[o] : src_offset[o] + e - s])
            src_offset[o] += e - s
    if local_frags:
        apply(local_frags, local_updates)


def _concat(parts: list[list[torch.Tensor]], device) -> torch.Tensor:
    flat = [t for p in parts for t in p]
    return torch.cat(flat) if flat else torch.empty(0, dtype=torch.float32, device=device)
