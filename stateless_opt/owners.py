"""Which rank whitens which matrix: a pure, deterministic function of the shapes.

Whitening needs a whole matrix on one rank. Round-robin owners (Muon, muon-fsdp2) leave ranks idle
when shapes differ (an MLP matrix costs ~3x an attention one); we balance the FLOPs instead with the
longest-processing-time rule: matrices sorted by cost (ties by position), each to the least-loaded
rank (ties to the lowest rank). Every rank computes the same answer without communicating.
"""

from __future__ import annotations

import heapq
from typing import Sequence


def whitening_flops(m: int, n: int, ns_steps: int, method: str = "polar_express") -> float:
    """Matmul FLOPs of SWAN's whitening of one m x n matrix, with s <= l the sides.

    * polar_express (``ns_steps`` = K): K (4 s^2 l + 2 s^3) (X X^T, A^2 and B X per step; the spectral
      bound reuses the first A^2), in bf16 or fp32 alike;
    * newton_schulz: Gram (2 s^2 l), the initial scale (2 x 2 s^3), K coupled iterations (3 x 2 s^3
      each) and Z G (2 s^2 l);
    * eigh: Gram, Z G and ~ 10 s^3 for the fp64 eigendecomposition and its reassembly (and slow FLOPs).
    """
    s, l = min(m, n), max(m, n)
    if method == "polar_express":
        return ns_steps * (4.0 * s * s * l + 2.0 * s**3)
    if method == "eigh":
        return 4.0 * s * s * l + 10.0 * s**3
    return 4.0 * s * s * l + (4.0 + 6.0 * ns_steps) * s**3


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
