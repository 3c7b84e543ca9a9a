"""The collectives the optimizers need, and nothing else: sum small stat vectors, and exchange
fragments with explicit uneven splits.

One object per process group. With one rank every call is a no-op, so the single-process and the
sharded paths run the same code. Every call counts the payload bytes this rank hands over, so tests
can prove that statistics travel as vectors and whole matrices only go to their whitening owner.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """Collectives over ``group`` (``None``: the default group, or one process if not initialised)."""

    def __init__(self, group: dist.ProcessGroup | None = None, single: bool = False):
        self.group = group
        if single or not (dist.is_available() and dist.is_initialized()):
            self.world, self.rank = 1, 0
        else:
            self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.bytes_sent = 0  # payload this rank handed to collectives since the last reset
        self.calls = 0

    def reset_counters(self) -> None:
        self.bytes_sent, self.calls = 0, 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a small statistics vector."""
        if self.world > 1 and tensor.numel():
            self.bytes_sent += tensor.numel() * tensor.element_size()
            self.calls += 1
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_to_all(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Exchange a flat buffer; ``send_splits[r]`` elements go to rank r. Uses the single-tensor
        form with explicit splits: gloo rejects the uneven list form that NCCL accepts."""
        if self.world == 1:
            return send
        if sum(send_splits) + sum(recv_splits) == 0:
            return send.new_empty(0)
        recv = send.new_empty(sum(recv_splits))
        self.bytes_sent += (sum(send_splits) - send_splits[self.rank]) * send.element_size()
        self.calls += 1
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        return recv


_CACHE: dict[object, Collectives] = {}


def collectives_for(group: dist.ProcessGroup | None, world: int) -> Collectives:
    """One Collectives object per process group, so byte counters accumulate per group."""
    if world == 1:
        key = "single"
    else:
        key = group if group is not None else "default"
    comm = _CACHE.get(key)
    if comm is None:
        comm = _CACHE[key] = Collectives(group, single=(world == 1))
    return comm


def total_bytes_sent() -> int:
    return sum(c.bytes_sent for c in _CACHE.values())


def reset_all_counters() -> None:
    for c in _CACHE.values():
        c.reset_counters()
