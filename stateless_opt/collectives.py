"""The collectives the optimizers need, and nothing else: sum small stat vectors, and exchange
fragments with explicit uneven splits; plus how a param group names a process group.

One ``Collectives`` object per process group (the optimizer keeps them). With one rank every call is
a no-op, so the single-process and the sharded paths run the same code. Every call counts the
payload bytes this rank hands over, so tests can prove that statistics travel as vectors and whole
matrices only go to their whitening owner.
"""

from __future__ import annotations

from typing import Any

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

    def reset_counters(self) -> None:
        self.bytes_sent = 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks of a small statistics vector."""
        return self._all_reduce_(tensor, dist.ReduceOp.SUM)

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place max over ranks (flags and peaks: a max cannot overflow where a sum could)."""
        return self._all_reduce_(tensor, dist.ReduceOp.MAX)

    def _all_reduce_(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if self.world > 1 and tensor.numel():
            self.bytes_sent += tensor.numel() * tensor.element_size()
            dist.all_reduce(tensor, op=op, group=self.group)
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
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
        return recv


# ------------------------------------------------------------------------------------ naming groups
def group_ref(group: Any) -> str | bool | None:
    """A param-group-safe reference to a process group: a ``ProcessGroup`` becomes its name (plain
    data, so ``state_dict()``, ``copy.deepcopy`` and pickle carry it, as ``DeviceMesh`` does); ``True``
    (the default group), ``False``/``None`` (not replicated) and names pass through."""
    if group is None or isinstance(group, (bool, str)):
        return group
    if isinstance(group, dist.ProcessGroup):
        return group.group_name
    raise TypeError(f"replicate_group must be a ProcessGroup, its name, True, False or None; got {group!r}")


def replica_group(ref: Any) -> dist.ProcessGroup | None:
    """The process group a ``replicate_group`` reference names, if it is one of more than one rank
    of an initialised job; else None (nothing to split or reduce over)."""
    if ref is None or ref is False or not (dist.is_available() and dist.is_initialized()):
        return None
    if ref is True:
        pg = dist.group.WORLD
    elif isinstance(ref, dist.ProcessGroup):
        pg = ref
    else:
        pg = _resolve_name(ref)
    return pg if dist.get_world_size(pg) > 1 else None


def agreement_groups(ref: Any) -> tuple:
    """The groups a plain local tensor (no DDP group known, not a DTensor or ZeRO partition) votes over
    on skipping a step: the default group under an initialised job of more than one rank, so that a
    NaN on one rank skips the step everywhere however the optimizer was built (``ddp.parameters()``, a
    wrapped model); nothing where its param group says ``replicate_group=False`` (an optimizer stepped
    on some ranks only: every rank of the default group must call ``step()`` otherwise). The vote is one
    4-byte all-reduce a step."""
    if ref is not None or not (dist.is_available() and dist.is_initialized()):
        return ()
    return (dist.group.WORLD,) if dist.get_world_size() > 1 else ()


def _resolve_name(name: str) -> dist.ProcessGroup:
    """A process group by name: how torch's own functional collectives and ``DeviceMesh`` refer to
    groups (``_resolve_process_group`` has no public twin in torch 2.11-2.13)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    try:
        return _resolve_process_group(name)
    except (KeyError, RuntimeError, ValueError) as err:
        raise RuntimeError(
            f"replicate_group names process group {name!r}, which does not exist in this process (a param "
            "group from another job?); build the optimizer with param_groups(ddp_model) or replicate_group=... "
            "of this job"
        ) from err
