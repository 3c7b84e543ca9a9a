"""The ``torch.optim.Optimizer`` base shared by SWAN, SinkGD and SGD-SaI.

``step()`` is the same for every backend:
  1. *gather work*: each tensor of each param group is turned into weight shards by the first layout
     of ``self.layouts`` that recognises it (DeepSpeed's flat partitions when attached, DTensors,
     DDP replicas, else the whole tensor; ``layouts.py``), resolved now, never cached;
  2. *screen*: one batched reduction of per-weight sums of squares, one host sync. A NaN/Inf anywhere
     skips the step on every rank of every group the weights live in (counted in ``skipped_steps``);
     a weight whose gradient is zero everywhere is left alone (no update, no weight decay, no counter:
     the zero-gradient ``step()`` that ``torch.distributed.checkpoint`` runs on save/load changes
     nothing; it only allocates the zero-filled state of stateful rules, which DCP needs as the
     template to load into);
  3. *update*: the subclass's rule on the live weights of each group, applied to the local pieces.

``MatrixRuleOptimizer`` adds what SWAN and SinkGD share: groups split into matrix rule and fallback,
matrices cut out of the shards and batched into runs that share their collectives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import torch
import torch.distributed as dist

from .collectives import Collectives, group_ref
from .config import validate, validate_group
from .fallback import ROW_FLOORS, adamw_fallback, adamw_state, stateless_fallback
from .layouts import Layout, MatrixFragment, WeightShard, batch_runs, default_layouts, split_matrices, true_shape
from .precision import stochastic_round_

log = logging.getLogger("stateless_opt")


class StateSize(NamedTuple):
    """Optimizer state a rule keeps for one tensor it steps, after its first step (the memory report's
    formula and prediction): ``per_element`` bytes per element of the stepped tensor, ``per_tensor``
    bytes per stepped tensor (AdamW's step counter), ``per_weight`` bytes per model weight the tensor
    holds pieces of (SGD-SaI's scale; a ZeRO partition holds many), scalars on the host or not."""

    per_element: float = 0.0
    per_tensor: int = 0
    per_weight: int = 0
    scalars_on_host: bool = True


# The AdamW fallback's state (SWAN/SinkGD's fallback groups, SGD-SaI's opt-in one): two fp32 moments
# per element, a 4-byte step counter per tensor (on the host).
ADAMW_FALLBACK_STATE = StateSize(per_element=8.0, per_tensor=4)


@dataclass
class GroupWork:
    """What one param group contributes to this step."""

    index: int
    group: dict
    units: list[torch.Tensor]  # tensors of group["params"] that have a gradient
    shards: list[list[WeightShard]]  # per unit: the weights it holds


class StatelessOptimizer(torch.optim.Optimizer):
    """Common machinery; subclasses set ``config_cls`` and implement ``_step_group`` (and
    ``state_size`` if they keep state).

    ``replicate_group``: the process group over which the weights' gradients are identical (DDP; a
    ``ProcessGroup``, ``True`` for the default group, or ``None``: not replicated, unless a param
    group says so, as ``param_groups(ddp_model)`` does). It is kept by name in each param group
    (``"replicate_group"``), so ``state_dict()``, deepcopy and pickle carry it.
    """

    config_cls: type
    uses_rules = True  # SWAN/SinkGD split matrix vs fallback; SGD-SaI is elementwise on everything
    host_state: frozenset = frozenset()  # state keys kept on the host in fp32 (read there every step)
    # state keys holding one value per weight of the stepped tensor (indexed by ``WeightShard.unit_index``;
    # a ZeRO partition holds many weights): the portable checkpoint stores them per weight
    weight_state: frozenset = frozenset()
    # state keys holding one value per stepped tensor, whatever its shape (the AdamW fallback's counter)
    tensor_state: frozenset = frozenset({"step"})

    def __init__(self, params: Iterable, lr: float, *, replicate_group=None, **hyperparameters):
        name = type(self).__name__
        config = validate(self.config_cls, {"lr": lr, **hyperparameters}, f"{name} arguments")
        defaults = config.model_dump()
        defaults["replicate_group"] = group_ref(replicate_group)
        groups = list(params) if not isinstance(params, torch.Tensor) else [params]
        if not groups:
            raise ValueError(f"{name} got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        prepared = []
        for i, g in enumerate(groups):
            g = dict(g)
            g["params"] = list(g["params"]) if not isinstance(g["params"], torch.Tensor) else [g["params"]]
            if "replicate_group" in g:
                g["replicate_group"] = group_ref(g["replicate_group"])
            validate_group(self.config_cls, {**defaults, **g}, f"{name} param group {i}")
            prepared.extend(self._split_by_rule(g, i) if self.uses_rules else [g])
        super().__init__(prepared, defaults)
        for g in self.param_groups:
            g.setdefault("step", 0)
            g.setdefault("skipped_steps", 0)
            # True shapes at construction: ``rule_counts()`` and the flat-partition check of the layouts
            # need them once a backend (ZeRO) has replaced the tensors by flat partitions.
            g.setdefault("_shapes", [true_shape(p) for p in g["params"]])
        self._init_runtime()

    def _init_runtime(self) -> None:
        """What a step needs besides ``defaults``/``state``/``param_groups`` (rebuilt after unpickling)."""
        self.layouts: list[Layout] = default_layouts()  # consulted in order at every step
        self._comms: dict[Any, Collectives] = {}
        # device index tensors of each chunk layout (row_col_norms.chunk_geometry), built at the first step
        self.geometry_cache: dict = {}
        self._logged_rules = False

    # ------------------------------------------------------------------ groups and rules
    @staticmethod
    def _split_by_rule(group: dict, index: int) -> list[dict]:
        """A group without a ``rule`` is split by true shape: ndim >= 2 (+ batch_dims) -> matrix rule,
        0-/1-D -> fallback. Decided once here and kept as a group key, because tags on Parameter
        objects do not survive FSDP2's DTensor swap or ZeRO's flattening."""
        batch_dims = group.get("batch_dims", 0)
        if not isinstance(batch_dims, int) or batch_dims < 0:
            raise ValueError(f"param group {index}: batch_dims must be a non-negative int, got {batch_dims!r}")
        rule = group.get("rule")
        if rule is not None:
            if rule not in ("matrix", "fallback"):
                raise ValueError(f"param group {index}: rule must be 'matrix' or 'fallback', got {rule!r}")
            if rule == "matrix":
                for p in group["params"]:
                    if len(true_shape(p)) < 2 + batch_dims:
                        raise ValueError(
                            f"param group {index}: rule='matrix' needs tensors with >= {2 + batch_dims} dims, "
                            f"got shape {true_shape(p)}; use rule='fallback' for it"
                        )
            return [group]
        names = group.get("names")
        parts: dict[str, dict] = {}
        for j, p in enumerate(group["params"]):
            r = "matrix" if len(true_shape(p)) >= 2 + batch_dims else "fallback"
            part = parts.setdefault(r, {**group, "params": [], "rule": r, **({"names": []} if names else {})})
            part["params"].append(p)
            if names:
                part["names"].append(names[j])
        return list(parts.values()) or [{**group, "rule": "fallback"}]

    def rule_counts(self) -> dict[str, dict[str, int]]:
        """How many tensors and elements each rule got, e.g. ``{"matrix": {"tensors": 12, "params": ...}}``."""
        out: dict[str, dict[str, int]] = {}
        for g in self.param_groups:
            rule = g.get("rule", "elementwise") if self.uses_rules else "elementwise"
            shapes = g.get("_shapes") or [true_shape(p) for p in g["params"]]
            c = out.setdefault(rule, {"tensors": 0, "params": 0})
            c["tensors"] += len(shapes)
            c["params"] += sum(math.prod(s) for s in shapes)
        return out

    @classmethod
    def state_size(cls, group: dict, element_bytes: int) -> StateSize:
        """The state this optimizer keeps per tensor of ``group`` (``element_bytes``: the stepped
        tensor's dtype size). Stateless by default."""
        return StateSize()

    def _log_rules_once(self) -> None:
        if not self._logged_rules:
            self._logged_rules = True
            log.info("%s rule counts: %s", type(self).__name__, self.rule_counts())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was NaN/Inf."""
        return max((g.get("skipped_steps", 0) for g in self.param_groups), default=0)

    @property
    def replicate_group(self):
        """The default ``replicate_group`` of the param groups (see the class docstring)."""
        return self.defaults.get("replicate_group")

    @replicate_group.setter
    def replicate_group(self, group) -> None:
        ref = group_ref(group)
        self.defaults["replicate_group"] = ref
        for g in self.param_groups:
            g["replicate_group"] = ref

    # ------------------------------------------------------------------ layouts and collectives
    def add_layout(self, layout: Layout) -> None:
        """Consult ``layout`` first from now on (an engine whose tensors need it, e.g. DeepSpeed ZeRO's
        flat partitions); replaces a layout of the same type."""
        self.layouts = [layout] + [lay for lay in self.layouts if type(lay) is not type(layout)]

    def _shards(self, tensor: torch.Tensor, group: dict, key: tuple) -> list[WeightShard]:
        for layout in self.layouts:
            out = layout.shards(tensor, group, key)
            if out is not None:
                return out
        raise RuntimeError(f"{type(self).__name__}: no layout of {self.layouts} describes a tensor of shape "
                           f"{tuple(tensor.shape)}")

    def _comm(self, shard: WeightShard) -> Collectives:
        return self._group_comm(shard.group, shard.world)

    def _group_comm(self, group, world: int) -> Collectives:
        key = "single" if world == 1 else (group if group is not None else "default")
        comm = self._comms.get(key)
        if comm is None:
            comm = self._comms[key] = Collectives(group, single=(world == 1))
        return comm

    def _comms_for(self, groups: tuple) -> list[Collectives]:
        """The collectives of each process group in ``groups`` (one-rank groups dropped)."""
        out = [self._group_comm(g, dist.get_world_size(g)) for g in groups]
        return [c for c in out if c.world > 1]

    def bytes_sent(self) -> int:
        """Payload bytes this rank handed to collectives since the last ``reset_comm_counters()``."""
        return sum(c.bytes_sent for c in self._comms.values())

    def reset_comm_counters(self) -> None:
        for c in self._comms.values():
            c.reset_counters()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._log_rules_once()
        work = self._gather_work()
        if not work:
            return loss
        live = self._screen(work)
        if live is None:
            for w in work:
                w.group["skipped_steps"] += 1
            return loss
        for w in work:
            self._ensure_state(w.group, w.units, w.shards)
            units = [(u, [s for s in shards if s.key in live]) for u, shards in zip(w.units, w.shards)]
            units = [(u, ss) for u, ss in units if ss]
            if not units:
                continue
            w.group["step"] += 1
            self._step_group(w.group, units, live)
        return loss

    def _gather_work(self) -> list[GroupWork]:
        work = []
        for gi, group in enumerate(self.param_groups):
            units, shards = [], []
            for pos, t in enumerate(group["params"]):
                if t.grad is None:
                    continue
                if t.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                units.append(t)
                shards.append(self._shards(t, group, (gi, pos)))
            if units:
                work.append(GroupWork(gi, group, units, shards))
        return work

    def _screen(self, work: list[GroupWork]) -> set[tuple] | None:
        """Which weights have a non-zero gradient anywhere, or ``None`` if any gradient holds a NaN/Inf
        on any rank (one reduction per process group, one host sync).

        Each shard contributes its gradient's largest magnitude: finite exactly when every element is
        (a sum of squares overflows to inf for finite gradients above ~1e19 and would skip them), zero
        exactly when the gradient is. A separate non-finite flag travels with each group's vector (a
        max over ranks may drop a NaN) and is reduced, with MAX, also over every other group the weights
        live in (``WeightShard.process_groups``: DDP replicas, HSDP's replicate dims), one scalar each:
        a NaN that appears on one rank after the backend's reduction still skips the step on every
        rank, so replicas never diverge."""
        all_shards = [s for w in work for shards in w.shards for s in shards]
        grads = [s.grad for s in all_shards]
        held = [g for g in grads if g.numel()]  # the inf-norm of an empty tensor is undefined
        device = grads[0].device
        peaks_held = iter(torch._foreach_norm(held, float("inf"), dtype=torch.float32) if held else ())
        zero = torch.zeros((), dtype=torch.float32, device=device)
        peak = torch.stack([next(peaks_held) if g.numel() else zero for g in grads])
        by_comm: dict[int, list[int]] = {}
        comms: dict[int, Collectives] = {}
        agree: dict[int, Collectives] = {}
        for i, s in enumerate(all_shards):
            if s.world > 1:
                c = self._comm(s)
                comms[id(c)] = c
                idx = by_comm.setdefault(id(c), [])
                if not s.replicated:
                    idx.append(i)
            for c in self._comms_for(s.process_groups):
                agree[id(c)] = c
        bad = (~torch.isfinite(peak)).any().to(torch.float32).reshape(1)
        for cid, idx in by_comm.items():
            index = torch.tensor(idx, dtype=torch.long, device=peak.device)
            part = torch.cat([peak[index], bad])
            comms[cid].all_reduce_max_(part)
            peak[index] = part[:-1]
            bad = part[-1:]
        for cid, c in agree.items():
            if cid not in comms:
                c.all_reduce_max_(bad)
        values = torch.cat([peak, bad]).tolist()
        if values[-1] > 0 or not all(math.isfinite(v) for v in values):
            return None
        return {s.key for s, v in zip(all_shards, values) if v > 0.0}

    def _ensure_state(self, group: dict, units: list[torch.Tensor], shards: list[list[WeightShard]]) -> None:
        """Allocate the (zero-filled) state of stateful rules for every tensor with a gradient, even an
        all-zero one: ``torch.distributed.checkpoint`` and accelerate run a zero-gradient, lr=0
        ``step()`` and load a checkpoint only into the state that step created. Stateless rules
        allocate nothing."""

    def _step_group(self, group: dict, units: list[tuple[torch.Tensor, list[WeightShard]]], live) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ applying updates
    def _apply(self, params: list[torch.Tensor], updates: list[torch.Tensor], lr: float, weight_decay: float,
               group: dict, scales: list[float] | None = None) -> None:
        """W <- (1 - lr*wd) W - lr * scale * U on local pieces (``scales`` default to 1). fp32 weights
        in place; low-precision weights through fp32 and, by default, stochastic rounding (seeded by the
        step, so a resumed run replays the same rounding)."""
        decay = 1.0 - lr * weight_decay
        scales = scales or [1.0] * len(params)
        full = [i for i, p in enumerate(params) if p.dtype == torch.float32]
        if full:
            ps = [params[i] for i in full]
            if decay != 1.0:
                torch._foreach_mul_(ps, decay)
            if all(scales[i] == 1.0 for i in full):
                torch._foreach_add_(ps, [updates[i] for i in full], alpha=-lr)
            else:
                for i in full:
                    params[i].add_(updates[i], alpha=-lr * scales[i])
        low = [i for i, p in enumerate(params) if p.dtype != torch.float32]
        if low:
            gen = self._rounding_generator(group, params[low[0]].device)
            for i in low:
                value = params[i].float().mul_(decay).add_(updates[i], alpha=-lr * scales[i])
                self._write(params[i], value, group, gen)

    def _write(self, dst: torch.Tensor, value: torch.Tensor, group: dict, gen) -> None:
        if dst.dtype == torch.bfloat16 and group.get("stochastic_rounding", True):
            stochastic_round_(dst, value, gen)
        else:
            dst.copy_(value)

    def _rounding_generator(self, group: dict, device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed((group["step"] * 1_000_003 + self.param_groups.index(group) * 7919) % (2**63))
        return gen

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's, plus an empty entry for every tensor that keeps no state (SWAN/SinkGD matrix weights,
        the stateless fallback, a weight not stepped yet): ``torch.distributed.checkpoint``'s strict
        load (``set_state_dict`` with default options) takes a tensor without an entry for one whose
        state was lost, and refuses the checkpoint."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            for i in g["params"]:
                sd["state"].setdefault(i, {})
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load; ours are fp32 by
        design (fallback moments of bf16 weights, SGD-SaI scales), so restore their saved dtype. Where
        the gradients are replicated is a fact of this run, not of the checkpoint: it is kept. The
        empty entries of stateless tensors (``state_dict``) are dropped: such a tensor has no state."""
        live_replicas = [g.get("replicate_group") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for p in [p for p, st in self.state.items() if not st]:
            del self.state[p]
        for g, ref in zip(self.param_groups, live_replicas):
            g["replicate_group"] = ref
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved or p not in self.state:
                continue
            for k, v in saved.items():
                if k in self.host_state:
                    self.state[p][k] = v.detach().to("cpu", torch.float32).clone()
                elif torch.is_tensor(v) and v.dtype == torch.float32 and self.state[p][k].dtype != torch.float32:
                    self.state[p][k] = v.to(device=self.state[p][k].device)
        for g in self.param_groups:
            g.setdefault("step", 0)
            g.setdefault("skipped_steps", 0)

    def __setstate__(self, state: dict) -> None:
        """Unpickling / deepcopy (a fresh object: default layouts, empty caches), and torch's
        ``load_state_dict``, which calls this on the live object (attached layouts are kept)."""
        super().__setstate__(state)
        self.defaults.setdefault("replicate_group", None)
        for g in self.param_groups:
            g.setdefault("replicate_group", self.defaults["replicate_group"])
        if "layouts" not in self.__dict__:
            self._init_runtime()


class MatrixRuleOptimizer(StatelessOptimizer):
    """What SWAN and SinkGD share: matrix-rule groups go to the subclass's ``_matrix_update`` on matrix
    fragments (one call per run of fragments that share their collectives); fallback groups
    (embeddings, LM head, 0-/1-D) take AdamW or a stateless row-wise rule at ``lr *
    fallback_lr_ratio`` (applied here, so a scheduler writing one LR into every group keeps the ratio)."""

    uses_rules = True
    # which fragments share one ``_matrix_update`` call (layouts.batch_runs): the full signature where
    # row/column statistics travel; "holders" where only whole matrices do (owners balanced over all)
    run_by = "signature"

    @classmethod
    def state_size(cls, group: dict, element_bytes: int) -> StateSize:
        """0 on matrix-rule weights; the AdamW fallback's two fp32 moments and its host step counter."""
        if group.get("rule") == "fallback" and group.get("fallback", "adamw") == "adamw":
            return ADAMW_FALLBACK_STATE
        return StateSize()

    def _ensure_state(self, group, units, shards) -> None:
        if group["rule"] == "fallback" and group["fallback"] == "adamw":
            for t in units:
                adamw_state(self.state[t], t)

    def _step_group(self, group, units, live) -> None:
        shards = [s for _, ss in units for s in ss]
        if group["rule"] == "fallback":
            lr = group["lr"] * group["fallback_lr_ratio"]
            if group["fallback"] == "adamw":
                adamw_fallback(self, group, [u for u, _ in units], lr)
            else:
                stateless_fallback(self, group, shards, lr, ROW_FLOORS[group["fallback"]])
            return
        frags = [f for s in shards for f in split_matrices(s, group.get("batch_dims", 0))]
        for run in batch_runs(frags, self.run_by):
            self._matrix_update(group, run, self._comm(run[0].weight), group["lr"])

    def _matrix_update(self, group: dict, frags: list[MatrixFragment], comm: Collectives, lr: float) -> None:
        """The rule on ``frags`` (one global order, same collectives; ``comm``: their ``group``'s)."""
        raise NotImplementedError

    def _row_col_comms(self, frags: list[MatrixFragment]) -> tuple[list[Collectives], list[Collectives]]:
        """The collectives over which this run's row and column statistics add up."""
        w = frags[0].weight
        return self._comms_for(w.row_groups), self._comms_for(w.col_groups)

    def _apply_fragments(self, group: dict, frags: list[MatrixFragment], updates, lr: float) -> None:
        self._apply([f.param for f in frags], list(updates), lr, group["weight_decay"], group)
