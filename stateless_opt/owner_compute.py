"""Owner compute: gather each whole matrix to one owner rank, compute there, send the pieces back.

This is the one seam through which an algorithm sees whole matrices (SWAN's whitening). Who owns what
is a pure, deterministic function of the costs (``assign_owners``): round-robin owners (Muon,
muon-fsdp2) leave ranks idle when shapes differ (an MLP matrix costs ~3x an attention one), so the
costs are balanced with the longest-processing-time rule: matrices sorted by cost (ties by
position), each to the least-loaded rank (ties to the lowest rank). Every rank computes the same
answer without communicating.

The exchange (``gather_compute_scatter``): with one process it is a no-op; sharded (FSDP2, ZeRO,
boxes) each rank sends its piece of matrix i to ``owner[i]`` and gets the owner's result for exactly
its piece back: two ``all_to_all_single`` calls per chunk with explicit uneven splits, sized from the
extents every rank knows (no size exchange). Replicated (DDP): the owner already holds the whole
gradient, so only results travel, and p ranks compute ~1/p each.

This module imports nothing from the package at run time (tests load it by path, in fresh processes).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import torch

    from .layouts import MatrixFragment


# ------------------------------------------------------------------------------------ who owns what
def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item, balancing the summed cost over ``world`` ranks (LPT greedy)."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(world)]
    owners = [0] * len(costs)
    for i in order:
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return owners


def load_balance(costs: Sequence[float], owners: Sequence[int], world: int) -> float:
    """max / mean load over ranks (1.0 is perfect)."""
    loads = [0.0] * world
    for c, o in zip(costs, owners):
        loads[o] += c
    mean = sum(loads) / world
    return max(loads) / mean if mean else 1.0


def owners_and_chunks(
    frags: Sequence["MatrixFragment"], world: int, cost: Callable[["MatrixFragment"], float], budget_bytes: int
) -> tuple[list[int], list[list[int]]]:
    """Balanced owners over all matrices, then chunks (in the given order) such that no owner gathers
    more than ``budget_bytes`` of whole fp32 matrices at once."""
    owners = assign_owners([cost(f) for f in frags], world)
    out: list[list[int]] = []
    current: list[int] = []
    used: dict[int, int] = defaultdict(int)
    for i, f in enumerate(frags):
        b = f.whole_bytes
        if current and used[owners[i]] + b > budget_bytes:
            out.append(current)
            current, used = [], defaultdict(int)
        current.append(i)
        used[owners[i]] += b
    if current:
        out.append(current)
    return owners, out


# ------------------------------------------------------------------------------------ the exchange
def _sends_piece(f: "MatrixFragment", rank: int, owner: int) -> bool:
    """Does ``rank`` ship its gradient piece of ``f`` to ``owner``?"""
    return rank != owner and not f.weight.replicated and f.extents[rank].numel > 0


def _needs_result(f: "MatrixFragment", rank: int, owner: int) -> bool:
    """Does ``owner`` ship a piece of the result of ``f`` to ``rank``?"""
    return rank != owner and f.extents[rank].numel > 0


def gather_compute_scatter(
    frags: Sequence["MatrixFragment"],
    owners: Sequence[int],
    comm,
    compute: Callable[[torch.Tensor], torch.Tensor],
    apply: Callable[[list["MatrixFragment"], list[torch.Tensor]], None],
    *,
    temp_bytes: Callable[[int, int], int],
    temp_budget_bytes: int,
    stacked: bool = True,
) -> None:
    """One chunk: gather -> ``compute`` (batched by shape, on whole (B, m, n) fp32 matrices, returning
    (B, m, n)) -> scatter back -> ``apply`` on this rank's fragments with their pieces of the result.
    Same-shape matrices are computed in sub-batches whose temporaries (``temp_bytes(m, n)`` each) stay
    under ``temp_budget_bytes``. ``stacked=False``: ``compute`` takes the list of B (m, n) matrices
    instead (a rule that reads them once anyway saves the stacked copy). Every rank calls this with the
    same ``frags``/``owners``."""
    import torch

    me, world = comm.rank, comm.world
    device = frags[0].grad.device

    # 1. Ship pieces to owners; concatenated by destination rank, in chunk order.
    send_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for f, o in zip(frags, owners):
        if _sends_piece(f, me, o):
            send_parts[o].append(f.grad.reshape(-1).float())
    send_splits = [sum(t.numel() for t in parts) for parts in send_parts]
    mine = [i for i, o in enumerate(owners) if o == me]
    recv_splits = [
        sum(frags[i].extents[src].numel for i in mine if _sends_piece(frags[i], src, me)) for src in range(world)
    ]
    send = _concat(send_parts, device)
    recv = comm.all_to_all(send, send_splits, recv_splits)
    del send, send_parts

    # 2. Assemble whole matrices I own (received pieces arrive grouped by source rank).
    whole: dict[int, torch.Tensor] = {}
    for i in mine:
        f = frags[i]
        if f.weight.replicated or f.local.numel == f.m * f.n:
            whole[i] = f.grad.reshape(f.m, f.n).float()
            continue
        buf = torch.empty(f.m, f.n, dtype=torch.float32, device=device)
        if f.local.numel:
            f.local.put(buf, f.grad.reshape(-1))
        whole[i] = buf
    offset = 0
    for src in range(world):
        for i in mine:
            f = frags[i]
            if _sends_piece(f, src, me):
                size = f.extents[src].numel
                f.extents[src].put(whole[i], recv[offset : offset + size])
                offset += size
    del recv

    # 3. Compute batched by shape, in sub-batches under the temporaries' budget. This rank's own
    #    pieces are applied at once; only pieces other ranks need are kept for the return trip.
    result: dict[int, torch.Tensor] = {}
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in mine:
        by_shape[(frags[i].m, frags[i].n)].append(i)
    for (m, n), idx in by_shape.items():
        step = max(1, temp_budget_bytes // temp_bytes(m, n))
        for lo in range(0, len(idx), step):
            sub = idx[lo : lo + step]
            batch = [whole.pop(i) for i in sub]
            batch = torch.stack(batch) if stacked else batch
            out = compute(batch)
            del batch
            done_frags, done_updates = [], []
            for k, i in enumerate(sub):
                f = frags[i]
                if f.local.numel:
                    done_frags.append(f)
                    done_updates.append(f.local.take(out[k]))
                if any(_needs_result(f, dst, me) for dst in range(world)):
                    result[i] = out[k]
            if done_frags:
                apply(done_frags, done_updates)
            del out, done_updates

    # 4. Send each rank its piece of the results; apply ours.
    back_parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for dst in range(world):
        for i in mine:
            if _needs_result(frags[i], dst, me):
                back_parts[dst].append(frags[i].extents[dst].take(result[i]))
    back_splits = [sum(t.numel() for t in parts) for parts in back_parts]
    theirs = [i for i, o in enumerate(owners) if o != me]
    back_recv_splits = [0] * world
    for i in theirs:
        if _needs_result(frags[i], me, owners[i]):
            back_recv_splits[owners[i]] += frags[i].local.numel
    back = comm.all_to_all(_concat(back_parts, device), back_splits, back_recv_splits)
    del back_parts

    local_frags, local_updates = [], []
    src_offset = [sum(back_recv_splits[:r]) for r in range(world)]
    for i in theirs:
        o = owners[i]
        if _needs_result(frags[i], me, o):
            size = frags[i].local.numel
            local_frags.append(frags[i])
            local_updates.append(back[src_offset[o] : src_offset[o] + size])
            src_offset[o] += size
    if local_frags:
        apply(local_frags, local_updates)


def _concat(parts: list[list["torch.Tensor"]], device) -> "torch.Tensor":
    import torch

    flat = [t for p in parts for t in p]
    return torch.cat(flat) if flat else torch.empty(0, dtype=torch.float32, device=device)
