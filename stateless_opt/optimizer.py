"""The ``torch.optim.Optimizer`` base shared by SWAN, SinkGD and SGD-SaI.

``step()`` is the same for every backend:
  1. *gather work*: each tensor of each param group is turned into weight shards by the first layout
     of ``self.layouts`` that recognises it (DeepSpeed's flat partitions when attached, DTensors,
     DDP replicas, else the whole tensor; ``layouts.py``), resolved now, never cached;
  2. *screen*: one batched reduction of each gradient's largest magnitude. A NaN/Inf anywhere skips
     the step on every rank of every group the weights live in (counted in ``skipped_steps``); a
     weight whose gradient is zero everywhere is left alone (no update, no weight decay, no counter:
     the zero-gradient ``step()`` that ``torch.distributed.checkpoint`` runs on save/load changes
     nothing; it only allocates the zero-filled state of stateful rules, which DCP needs as the
     template to load into);
  3. *update*: the subclass's rule on the live weights of each group, applied to the local pieces.

Where the screening is decided (``capturable``): on the host, after one sync, the update runs on the
live weights only; on the device (the default on accelerators), nothing waits for the GPU: the update
runs on every weight and each weight's write is masked by a device flag (``StepMasks``: 0 for every
weight of a NaN/Inf step, 0 for a zero gradient), the learning rate and weight decay are read from
float64 device scalars (``scalars``), counters add up on the device (``sync_counters`` brings
``group["step"]`` / ``group["skipped_steps"]`` up to date; ``state_dict()`` and ``skipped_steps`` call
it) and nothing is copied between host and device once the first step has built its index tables.
Such a step can be captured in a CUDA graph (``capture.CUDAGraphOptimizer``).

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

from . import kernels
from .collectives import Collectives, group_ref
from .config import validate, validate_group
from .fallback import ROW_FLOORS, adamw_fallback, adamw_state, stateless_fallback
from .layouts import (
    Layout, MatrixFragment, WeightShard, attach_peaks, batch_runs, default_layouts, matrix_shape, split_matrices,
    tensor_batch_dims, true_shape, write_back_staged,
)
from .precision import stochastic_round_
from .row_col_norms import FusedUpdate

log = logging.getLogger("stateless_opt")

# Weight dtypes updated in place in their own precision; others go through fp32 and are written back
# (stochastically rounded by default).
NATIVE_DTYPES = (torch.float32, torch.float64)


class StateSize(NamedTuple):
    """Optimizer state a rule keeps for one tensor it steps, after its first step (the memory report's
    formula and prediction): ``per_element`` bytes per element of the stepped tensor, ``per_tensor``
    bytes per stepped tensor (AdamW's step counter), ``per_weight`` bytes per model weight the tensor
    holds pieces of (SGD-SaI's scale; a ZeRO partition holds many), scalars on the host or not."""

    per_element: float = 0.0
    per_tensor: int = 0
    per_weight: int = 0
    scalars_on_host: bool = True


def adamw_fallback_state(group: dict) -> StateSize:
    """The AdamW fallback's state (SWAN/SinkGD's fallback groups, SGD-SaI's opt-in one): two fp32
    moments per element, a 4-byte step counter per tensor (on the device unless steps are decided on
    the host)."""
    return StateSize(per_element=8.0, per_tensor=4, scalars_on_host=group.get("capturable") is False)


@dataclass
class GroupWork:
    """What one param group contributes to this step."""

    index: int
    group: dict
    units: list[torch.Tensor]  # tensors of group["params"] that have a gradient
    shards: list[list[WeightShard]]  # per unit: the weights it holds


class StepMasks:
    """A step's decisions, on the device: ``keep`` (fp32, one per weight shard in screening order) is 1
    where the shard's weight steps (no NaN/Inf anywhere, its gradient non-zero somewhere) and 0 where
    it is left untouched; ``found_inf`` (fp32 (1,)) is 1 when a NaN/Inf skips the whole step. ``keep``
    is a persistent buffer, so kernels address its entries from cached launch tables."""

    def __init__(self, keep: torch.Tensor, found_inf: torch.Tensor, keys: list[tuple]):
        self.keep = keep
        self.found_inf = found_inf
        self.position = {k: i for i, k in enumerate(keys)}

    def flag(self, key: tuple) -> torch.Tensor:
        """The 0-dim fp32 flag of one weight shard."""
        return self.keep[self.position[key]]

    def address(self, key: tuple) -> int:
        """Device address of that flag (for kernel tables)."""
        return kernels.address(self.keep, self.position[key])

    def any_of(self, keys: list[tuple]) -> torch.Tensor:
        """0-dim flag: does any of these shards step (shards of one tensor are consecutive)."""
        pos = [self.position[k] for k in keys]
        if len(pos) == 1:
            return self.keep[pos[0]]
        lo, hi = min(pos), max(pos) + 1
        if hi - lo != len(pos):
            raise RuntimeError("shards of one tensor must be screened consecutively")
        return self.keep[lo:hi].amax()


class StatelessOptimizer(torch.optim.Optimizer):
    """Common machinery; subclasses set ``config_cls`` and implement ``_step_group`` (and
    ``state_size`` if they keep state).

    Construction is torch's (``Optimizer.__init__`` / ``add_param_group``: a single tensor is a
    ``TypeError``, ``named_parameters()`` and ``(name, tensor)`` pairs give ``param_names``, duplicates
    are refused), plus ours: every group's hyper-parameters validated by ``config_cls``, every tensor's
    dtype checked (``param_dtypes``), naming the group and tensor. A group comes back as one group: the
    matrix rule or the fallback is chosen per weight at each step (``weight_rule``), so LR schedulers
    see the groups the user passed.

    ``replicate_group``: the process group over which the weights' gradients are identical (DDP; a
    ``ProcessGroup``, ``True`` for the default group, ``None`` (default) or ``False``: not replicated,
    unless a param group says so, as ``param_groups(ddp_model)`` does). It is kept by name in each param
    group (``"replicate_group"``), so ``state_dict()``, deepcopy and pickle carry it. Under an
    initialised process group, plain tensors of a group whose ``replicate_group`` is ``None`` still vote
    over the default group on skipping a step (``collectives.agreement_groups``); ``False`` makes them
    rank-local (an optimizer stepped on some ranks only).
    """

    config_cls: type
    uses_rules = True  # SWAN/SinkGD split matrix vs fallback; SGD-SaI is elementwise on everything
    # per-weight fp32 state keys (not flat-shaped): on the host for host-decided steps, else on the device
    host_state: frozenset = frozenset()
    # state keys holding one value per weight of the stepped tensor (indexed by ``WeightShard.unit_index``;
    # a ZeRO partition holds many weights): the portable checkpoint stores them per weight
    weight_state: frozenset = frozenset()
    # state keys holding one value per stepped tensor, whatever its shape (the AdamW fallback's counter)
    tensor_state: frozenset = frozenset({"step"})
    _counters_on_host = True  # device-decided steps on the CPU fold their counters at once (no sync to save)
    # Weight dtypes a step computes correctly (low precision through fp32 and stochastic rounding);
    # any other dtype is refused, naming the tensor, at construction and before a step.
    param_dtypes: frozenset = frozenset({torch.float32, torch.bfloat16, torch.float16})
    dtype_note = ""  # why the others are refused (appended to the error)

    def __init__(self, params: Iterable, lr: float, *, replicate_group=None, **hyperparameters):
        name = type(self).__name__
        config = validate(self.config_cls, {"lr": lr, **hyperparameters}, f"{name} arguments")
        defaults = config.model_dump()
        if isinstance(lr, torch.Tensor):  # torch.optim's convention: the tensor itself, filled in place by schedulers
            defaults["lr"] = lr
        defaults["replicate_group"] = group_ref(replicate_group)
        if self.uses_rules:
            defaults.update(rule="auto", batch_dims=0)
        super().__init__(params, defaults)  # torch's checks; calls add_param_group for each group
        self._init_runtime()

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group`` (tensors, names, duplicates, defaults) on a copy of ``param_group``,
        with its hyper-parameters validated first and its tensors checked after: a refused group leaves
        the optimizer as it was. ``names`` (the older key of ``param_groups()``) becomes ``param_names``."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        group = dict(param_group)  # torch fills defaults into the dict it gets: not into the caller's
        if "names" in group:
            names = group.pop("names")
            group.setdefault("param_names", list(names))
        if "replicate_group" in group:
            group["replicate_group"] = group_ref(group["replicate_group"])
        where = f"{type(self).__name__} param group {len(self.param_groups)}"
        group = validate_group(self.config_cls, {**self.defaults, **group}, where)
        super().add_param_group(group)
        try:
            self._prepare_group(self.param_groups[-1], where)
        except Exception:
            self.param_groups.pop()
            raise

    def _prepare_group(self, group: dict, where: str) -> None:
        names = group.get("param_names")
        if names is not None and len(names) != len(group["params"]):
            raise ValueError(f"{where}: {len(names)} param_names for {len(group['params'])} params")
        if self.uses_rules:
            self._check_rule(group, where)
        for j, p in enumerate(group["params"]):
            self._check_dtype(group, j, where)
        group.setdefault("step", 0)
        group.setdefault("skipped_steps", 0)
        # True shapes at construction: the rule of each weight, ``rule_counts()`` and the flat-partition
        # check of the layouts need them once a backend (ZeRO) has replaced the tensors by flat partitions.
        group.setdefault("_shapes", [true_shape(p) for p in group["params"]])

    def _init_runtime(self) -> None:
        """What a step needs besides ``defaults``/``state``/``param_groups`` (rebuilt after unpickling)."""
        self.layouts: list[Layout] = default_layouts()  # consulted in order at every step
        self._comms: dict[Any, Collectives] = {}
        # device index tensors of each chunk layout (row_col_norms.chunk_geometry), built at the first step
        self.geometry_cache: dict = {}
        # kernel launch tables and index tensors, built once per distinct content (kernels.LaunchTables)
        self.launch_tables = kernels.LaunchTables()
        self._logged_rules = False
        # device decisions (capturable): per param group (by id) its float64 [lr, weight_decay] scalars and
        # its pending [steps, skipped steps]; the masks of the step in progress; persistent keep buffers
        self._scalars: dict[int, tuple[dict, torch.Tensor]] = {}
        self._pending_counts: dict[int, tuple[dict, torch.Tensor]] = {}
        self._masks: StepMasks | None = None
        self._keep_buffers: dict = {}
        # Set by an engine that steps one param group at a time (DeepSpeed ZeRO-1/2) when it found a
        # NaN/Inf in another group's gradients before its loop: every call of that step skips.
        self.skip_whole_step = False
        self._validated: dict[int, tuple] = {}  # id(group) -> the values last validated (_validate_groups)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _label(group: dict, j: int) -> str:
        """How an error names tensor ``j`` of ``group``: its name if known, its position and true shape."""
        names = group.get("param_names")
        name = f" {names[j]!r}" if names is not None and j < len(names) else ""
        shapes = group.get("_shapes")
        shape = shapes[j] if shapes and j < len(shapes) else true_shape(group["params"][j])
        return f"tensor {j}{name} (shape {tuple(shape)})"

    def _check_dtype(self, group: dict, j: int, where: str) -> None:
        p = group["params"][j]
        if p.dtype in self.param_dtypes:
            return
        label = self._label(group, j)
        if p.is_complex():
            raise TypeError(f"{where}: {label} is {p.dtype}; complex weights are not supported (view them as "
                            "real with torch.view_as_real and optimize that)")
        supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.param_dtypes))
        raise TypeError(f"{where}: {label} is {p.dtype}; {type(self).__name__} steps {supported} weights"
                        f"{self.dtype_note}")

    @staticmethod
    def _check_rule(group: dict, where: str) -> None:
        """``rule``: "auto" (each weight by its true shape, ``weight_rule``), "matrix" or "fallback";
        ``batch_dims``: leading dims of >= 3-D weights that index independent matrices."""
        batch_dims = group.get("batch_dims", 0)
        if type(batch_dims) is not int or batch_dims < 0:
            raise ValueError(f"{where}: batch_dims must be a non-negative int, got {batch_dims!r}")
        rule = group.get("rule", "auto")
        if rule not in ("auto", "matrix", "fallback"):
            raise ValueError(f"{where}: rule must be 'auto', 'matrix' or 'fallback', got {rule!r}")
        if rule == "matrix":
            shapes = group.get("_shapes") or [true_shape(p) for p in group["params"]]
            for j, shape in enumerate(shapes):
                if len(shape) < 2:
                    raise ValueError(f"{where}: rule='matrix' needs tensors with >= 2 dims, got shape "
                                     f"{tuple(shape)} ({StatelessOptimizer._label(group, j)}); use "
                                     "rule='fallback' or 'auto' for it")

    def _validate_groups(self) -> None:
        """Before any weight changes: the values in every param group (an LR scheduler or user code may
        have written them since the last step) and every tensor's dtype (``model.half()`` after the
        optimizer was built). A bad value raises naming the field and the group, and no weight moves. A
        group is validated again only when one of its values changed (one tuple compare per group)."""
        keys = (*self.config_cls.model_fields, "rule", "batch_dims")
        name = type(self).__name__
        for i, g in enumerate(self.param_groups):
            where = f"{name} param group {i} (before step {g.get('step', 0) + 1})"
            values = tuple(g.get(k) for k in keys)
            last = self._validated.get(id(g))
            # types first: a tensor written over a float compares equal to it (0.01 == tensor(0.01))
            same = last is not None and all(type(a) is type(b) for a, b in zip(last, values)) and last == values
            lr = g.get("lr")
            if isinstance(lr, torch.Tensor) and lr.device.type == "cpu":
                same = False  # a host tensor lr may have been filled in place: its value is re-read (free here)
            if not same:
                validate_group(self.config_cls, g, where, unknown_keys=True)
                if self.uses_rules:
                    self._check_rule(g, where)
                self._validated[id(g)] = tuple(g.get(k) for k in keys)
            for j, p in enumerate(g["params"]):
                if p.dtype not in self.param_dtypes:
                    self._check_dtype(g, j, where)

    # ------------------------------------------------------------------ groups and rules
    def weight_rule(self, group: dict, shape: tuple) -> str:
        """Which rule steps a weight of true ``shape`` in ``group``: "elementwise" here; SWAN/SinkGD
        answer "matrix" or "fallback" (``MatrixRuleOptimizer.weight_rule``)."""
        return "elementwise"

    def rule_counts(self) -> dict[str, dict[str, int]]:
        """How many tensors and elements each rule got, e.g. ``{"matrix": {"tensors": 12, "params": ...}}``."""
        out: dict[str, dict[str, int]] = {}
        for g in self.param_groups:
            for shape in g.get("_shapes") or [true_shape(p) for p in g["params"]]:
                c = out.setdefault(self.weight_rule(g, tuple(shape)), {"tensors": 0, "params": 0})
                c["tensors"] += 1
                c["params"] += math.prod(shape)
        return out

    def split_groups_by_rule(self) -> None:
        """Replace each param group holding weights of both rules by one group per rule (same values,
        ``rule`` set). For engines that flatten each group into one buffer (DeepSpeed ZeRO): the matrix
        rule and the fallback keep different state, so a flat buffer must hold one kind only. Only
        before the first step (no state yet)."""
        if self.state:
            raise RuntimeError("split_groups_by_rule() must run before the first step")
        out = []
        for g in self.param_groups:
            shapes = g["_shapes"]
            rules = [self.weight_rule(g, tuple(s)) for s in shapes]
            if len(set(rules)) < 2:
                out.append({**g, "rule": rules[0]} if rules and self.uses_rules else g)
                continue
            for rule in dict.fromkeys(rules):
                idx = [j for j, r in enumerate(rules) if r == rule]
                part = {**g, "rule": rule, "params": [g["params"][j] for j in idx], "_shapes": [shapes[j] for j in idx]}
                if g.get("param_names") is not None:
                    part["param_names"] = [g["param_names"][j] for j in idx]
                out.append(part)
        self.param_groups[:] = out
        self._validated.clear()

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
        """Steps skipped because a gradient was NaN/Inf (brings the device counters up to date)."""
        self.sync_counters()
        return max((g.get("skipped_steps", 0) for g in self.param_groups), default=0)

    # ------------------------------------------------------------------ device decisions
    def sync_counters(self) -> None:
        """Add the counts of steps decided on the device to ``group["step"]`` and
        ``group["skipped_steps"]`` (one host read per group with pending counts; nothing to do after
        host-decided steps). ``state_dict()``, ``skipped_steps`` and pickling call it."""
        for group, counts in self._pending_counts.values():
            steps, skipped = (int(v) for v in counts.tolist())
            if steps or skipped:
                counts.zero_()  # in place: a captured graph keeps adding into this tensor
                group["step"] += steps
                group["skipped_steps"] += skipped

    def graph_buffers(self) -> list:
        """Every persistent tensor a device-decided step reads or writes besides weights, gradients and
        state (scalars, counters, flags, cached geometry and launch tables): what a CUDA graph of the
        step must keep alive."""
        out = [t for _, t in self._scalars.values()] + [t for _, t in self._pending_counts.values()]
        out += list(self._keep_buffers.values()) + list(self.geometry_cache.values())
        return out + self.launch_tables.tables()

    def _decides_on_device(self, group: dict, device: torch.device) -> bool:
        """``capturable`` resolved for one group: None means on the device except on the CPU. Traced by
        torch.compile: on the host (dynamo sets every group's ``capturable`` to True while it traces an
        optimizer, as for torch.optim's own; the device-decided step's fused AdamW with a tensor LR has
        no fake kernel, and our Triton kernels are off there anyway)."""
        if torch.compiler.is_compiling():
            return False
        cap = group.get("capturable")
        return cap if cap is not None else device.type != "cpu"

    def scalars(self, group: dict, device: torch.device) -> torch.Tensor:
        """The group's float64 ``[lr, weight_decay]`` on ``device``, persistent: what device-decided
        steps (and their kernels) read, so a captured step follows an LR scheduler. Refreshed from the
        group at every eager step; a tensor ``lr`` (torch.optim's convention) is copied inside the
        step, so a graph re-reads it at each replay; a float one is written by ``refresh_scalars``,
        which ``CUDAGraphOptimizer`` calls before each replay."""
        entry = self._scalars.get(id(group))
        if entry is None or entry[0] is not group or entry[1].device != device:
            if kernels.capturing(device):
                raise RuntimeError("a param group's device scalars were first needed during CUDA graph capture: "
                                   "run an eager step first")
            entry = self._scalars[id(group)] = (group, torch.zeros(2, dtype=torch.float64, device=device))
        t = entry[1]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device != device and not (lr.device.type == "cpu" and device.type == "cpu"):
                raise ValueError(f"{type(self).__name__}: a tensor lr must live on the parameters' device "
                                 f"({device}) for device-decided steps, got one on {lr.device}")
            t[0].copy_(lr.reshape(()))
        if not kernels.capturing(device):
            self._fill_scalars(group, t)
        return t

    @staticmethod
    def _fill_scalars(group: dict, t: torch.Tensor) -> None:
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):
            t[0].fill_(float(lr))
        t[1].fill_(float(group["weight_decay"]))

    def refresh_scalars(self) -> None:
        """Write every group's float ``lr`` and ``weight_decay`` into its device scalars (outside a
        graph: what a replayed step reads)."""
        for group, t in self._scalars.values():
            self._fill_scalars(group, t)

    def _lr(self, group: dict, device: torch.device, masks: "StepMasks | None"):
        """The group's LR as the step uses it: its float64 device scalar when decided on the device,
        else a Python float."""
        if masks is not None:
            return self.scalars(group, device)[0]
        lr = group["lr"]
        return float(lr) if isinstance(lr, torch.Tensor) else lr

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
            try:
                out = layout.shards(tensor, group, key)
            except ValueError as err:  # name the tensor: layouts only see tensors
                raise ValueError(f"{type(self).__name__} param group {key[0]}, {self._label(group, key[1])}: {err}") from None
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
        self._validate_groups()
        self._log_rules_once()
        work = self._gather_work()
        if not work:
            return loss
        shards, peak, bad = self._screen(work)
        if self.skip_whole_step:  # an engine found a NaN/Inf in a group it steps in another call
            bad = torch.ones_like(bad)
        device = peak.device
        if any(self._decides_on_device(w.group, device) for w in work):
            self._step_on_device(work, shards, peak, bad)
            write_back_staged(shards)  # every weight computed (masked): staged copies go back as they are
            return loss
        live = self._live_on_host(shards, peak, bad)
        if live is None:  # every group counts it, also one without gradients this step: each group's
            for g in self.param_groups:  # counter (and their max, ``skipped_steps``) is the optimizer's count
                g["skipped_steps"] += 1
            return loss
        todo = []
        for w in work:
            self._ensure_state(w.group, w.units, w.shards)
            units = [(u, [s for s in shards if s.key in live]) for u, shards in zip(w.units, w.shards)]
            units = [(u, ss) for u, ss in units if ss]
            if units:
                todo.append((w.group, units))
        self._begin_step(todo)
        for group, units in todo:
            group["step"] += 1
            self._step_group(group, units, live)
        write_back_staged(s for w in work for shards in w.shards for s in shards)
        return loss

    def _step_on_device(self, work: list[GroupWork], shards: list[WeightShard], peak: torch.Tensor,
                        bad: torch.Tensor) -> None:
        """The step with its decisions on the device: every weight is computed, each write masked by
        its ``keep`` flag; counters add up on the device."""
        device = peak.device
        keep = self._keep_buffers.get((str(device), len(shards)))
        if keep is None:
            if kernels.capturing(device):
                raise RuntimeError("the set of weights with gradients changed during CUDA graph capture")
            keep = self._keep_buffers[(str(device), len(shards))] = torch.empty(len(shards), device=device)
        torch.mul(peak > 0, bad == 0, out=keep)  # bool product, written as fp32 1/0
        masks = StepMasks(keep, bad, [s.key for s in shards])
        self._masks = masks
        try:
            for w in work:
                self._ensure_state(w.group, w.units, w.shards)
            self._begin_step_on_device(work, masks)
            for w in work:
                self._step_group(w.group, list(zip(w.units, w.shards)), masks)
        finally:
            self._masks = None
        first = 0
        for w in work:  # the group stepped if any of its weights did; skipped if a NaN/Inf stopped it
            n = sum(len(ss) for ss in w.shards)
            entry = self._pending_counts.get(id(w.group))
            if entry is None or entry[0] is not w.group:
                if kernels.capturing(device):
                    raise RuntimeError("a param group stepped for the first time during CUDA graph capture: run an "
                                       "eager step first")
                entry = self._pending_counts[id(w.group)] = (w.group, torch.zeros(2, dtype=torch.float64, device=device))
            entry[1].add_(torch.stack([keep[first:first + n].amax(), bad[0].float()]))
            first += n
        for group in self.param_groups:  # a skipped step counts in every group, also one without gradients
            entry = self._pending_counts.get(id(group))
            if any(group is w.group for w in work) or (entry is None and kernels.capturing(device)):
                continue
            if entry is None or entry[0] is not group:
                entry = self._pending_counts[id(group)] = (group, torch.zeros(2, dtype=torch.float64, device=device))
            entry[1][1:].add_(bad.to(torch.float64))
        if device.type == "cpu" and self._counters_on_host:  # free there: keep the group counters current
            self.sync_counters()

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

    def _screen(self, work: list[GroupWork]) -> tuple[list[WeightShard], torch.Tensor, torch.Tensor]:
        """Every shard of ``work`` (in order), each one's gradient peak (its largest magnitude, MAX over
        the ranks that hold pieces of it) and a non-finite flag (1,), fp32 on the device, reduced
        over every process group the weights live in. No host sync: the host-decided step reads them
        (``_live_on_host``), the device-decided one masks its writes with them.

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
        # exact in fp32 for fp32/bf16/fp16 gradients; fp64 ones keep their range (1e300 is finite). From
        # every gradient, held or not: every rank must reduce the same dtype (gloo aborts otherwise), also
        # one that holds nothing of an fp64 weight (FSDP2's trailing ranks)
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        peaks_held = iter(torch._foreach_norm(held, float("inf"), dtype=dtype) if held else ())
        zero = torch.zeros((), dtype=dtype, device=device)
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
        bad = (~torch.isfinite(peak)).any().to(peak.dtype).reshape(1)
        for cid, idx in by_comm.items():
            index = self.launch_tables.get(tuple(idx), torch.long, peak.device)  # built once, no copy later
            part = torch.cat([peak[index], bad])
            comms[cid].all_reduce_max_(part)
            peak[index] = part[:-1]
            bad = part[-1:]
        for cid, c in agree.items():
            if cid not in comms:
                c.all_reduce_max_(bad)
        attach_peaks(all_shards, peak)
        return all_shards, peak, bad

    @staticmethod
    def _live_on_host(shards: list[WeightShard], peak: torch.Tensor, bad: torch.Tensor) -> set[tuple] | None:
        """The host's decision (one sync): the keys of weights with a non-zero gradient anywhere, or
        None if any gradient holds a NaN/Inf on any rank."""
        values = torch.cat([peak, bad]).tolist()
        if values[-1] > 0 or not all(math.isfinite(v) for v in values):
            return None
        return {s.key for s, v in zip(shards, values) if v > 0.0}

    def _ensure_state(self, group: dict, units: list[torch.Tensor], shards: list[list[WeightShard]]) -> None:
        """Allocate the (zero-filled) state of stateful rules for every tensor with a gradient, even an
        all-zero one: ``torch.distributed.checkpoint`` and accelerate run a zero-gradient, lr=0
        ``step()`` and load a checkpoint only into the state that step created. Stateless rules
        allocate nothing."""

    def _begin_step(self, todo: list[tuple[dict, list[tuple[torch.Tensor, list[WeightShard]]]]]) -> None:
        """Host-decided steps, before any group is updated, with every group's live (tensor, shards):
        what a rule needs from all groups at once (SGD-SaI's max-normalised scales divide by the max
        over every weight, not over the groups stepped so far). Nothing by default."""

    def _begin_step_on_device(self, work: list[GroupWork], masks: "StepMasks") -> None:
        """``_begin_step`` for device-decided steps (every weight of ``work``, writes masked by ``masks``)."""

    def _step_group(self, group: dict, units: list[tuple[torch.Tensor, list[WeightShard]]], live) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ applying updates
    def _apply(self, params: list[torch.Tensor], updates: list[torch.Tensor], lr, weight_decay: float,
               group: dict, scales: list | None = None, keys: list[tuple] | None = None,
               noise_keys: list[tuple] | None = None) -> None:
        """W <- (1 - lr*wd) W - lr * scale * U on local pieces (``scales`` default to 1). fp32 weights
        in place; low-precision weights through fp32 and, by default, stochastic rounding (seeded by the
        step, so a resumed run replays the same rounding; with ``noise_keys``, each piece's noise by its
        own key too: independent of how pieces were batched into calls, which differs between ranks
        where owners apply their own results first, so DDP replicas round alike).

        Device-decided steps (``lr`` a device scalar): each weight's write is masked by the flag of
        its shard (``keys``), the decay read from the group's device scalars; fp32 pieces of one
        tensor (SWAN's whitened batch, a receive buffer, SinkGD's rows) take one fused kernel launch."""
        if isinstance(lr, torch.Tensor) and self._masks is not None:
            self._apply_masked(params, updates, lr, group, scales, keys, noise_keys)
            return
        decay = 1.0 - lr * weight_decay
        scales = scales or [1.0] * len(params)
        full = [i for i, p in enumerate(params) if p.dtype in NATIVE_DTYPES]
        if full:
            ps = [params[i] for i in full]
            if decay != 1.0:
                torch._foreach_mul_(ps, decay)
            if all(scales[i] == 1.0 for i in full):
                torch._foreach_add_(ps, [updates[i] for i in full], alpha=-lr)
            else:
                for i in full:
                    params[i].add_(updates[i], alpha=-lr * scales[i])
        low = [i for i, p in enumerate(params) if p.dtype not in NATIVE_DTYPES]
        if low:
            gen = self._rounding_generator(group, params[low[0]].device)
            for i in low:
                if noise_keys is not None:
                    gen = self._rounding_generator(group, params[i].device, noise_keys[i])
                value = params[i].float().mul_(decay).add_(updates[i], alpha=-lr * scales[i])
                self._write(params[i], value, group, gen)

    def _apply_masked(self, params, updates, lr: torch.Tensor, group: dict, scales, keys, noise_keys=None) -> None:
        masks = self._masks
        device = lr.device
        wd = self.scalars(group, device)[1]
        todo = list(range(len(params)))
        if scales is None and kernels.available(device):
            by_base: dict[int, tuple[torch.Tensor, list]] = {}
            rest = []
            for i in todo:
                p, u = params[i], updates[i]
                base = u._base if u._base is not None else u
                if (p.dtype == u.dtype == base.dtype == torch.float32 and p.is_contiguous() and u.is_contiguous()
                        and base.is_contiguous() and u.device == base.device):
                    offset = (u.data_ptr() - base.data_ptr()) // 4
                    by_base.setdefault(id(base), (base, []))[1].append((p, offset, masks.address(keys[i])))
                else:
                    rest.append(i)
            for base, items in by_base.values():
                kernels.update_from_(base.view(-1), items, lr=lr, weight_decay=wd, tables=self.launch_tables)
            todo = rest
        if not todo:
            return
        decay = 1.0 - lr * wd
        gen = None
        for i in todo:
            p, keep = params[i], masks.flag(keys[i])
            coef = lr if scales is None else lr * scales[i]
            old = p if p.dtype in NATIVE_DTYPES else p.float()  # fp64 in fp64, the others in fp32
            value = torch.addcmul(old * decay.to(old.dtype), updates[i], (-coef).to(old.dtype))
            value = torch.where(keep > 0, value, old)
            if p.dtype in NATIVE_DTYPES:
                p.copy_(value)
            else:
                if (gen is None or noise_keys is not None) and group.get("stochastic_rounding", True):
                    gen = self._rounding_generator(group, device, noise_keys[i] if noise_keys is not None else ())
                self._write(p, value, group, gen)

    def _write(self, dst: torch.Tensor, value: torch.Tensor, group: dict, gen) -> None:
        if group.get("stochastic_rounding", True):
            stochastic_round_(dst, value, gen)
        else:
            dst.copy_(value)

    def _rounding_generator(self, group: dict, device, key: tuple = ()) -> torch.Generator:
        """Seeded by the group's step (the step being taken), position (found by identity:
        ``list.index`` would compare the groups' tensors elementwise) and ``key`` (ints, equal on every
        rank): a device-decided step reads its counter from the device (one host read; stochastic
        rounding cannot be captured in a graph)."""
        step = group["step"]
        if self._masks is not None:
            if kernels.capturing(device):
                raise RuntimeError("stochastic rounding of low-precision weights is seeded on the host and cannot "
                                   "be captured in a CUDA graph: use fp32 weights (an fp32 master) or "
                                   "stochastic_rounding=False")
            self.sync_counters()
            step = group["step"] + 1  # this step's number when it steps (its writes are masked otherwise)
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        seed = step * 1_000_003 + index * 7919
        for k in key:
            seed = (seed * 1_000_033 + k + 1) % (2**63)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed % (2**63))
        return gen

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """torch's, with the device-decided steps' counters brought up to date first, plus an empty
        entry for every tensor that keeps no state (SWAN/SinkGD matrix weights, the stateless fallback,
        a weight not stepped yet): ``torch.distributed.checkpoint``'s strict load (``set_state_dict``
        with default options) takes a tensor without an entry for one whose state was lost, and
        refuses the checkpoint."""
        self.sync_counters()
        sd = super().state_dict()
        for g in sd["param_groups"]:
            for i in g["params"]:
                sd["state"].setdefault(i, {})
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts every floating state tensor to its parameter's dtype on load; ours are fp32 by
        design (fallback moments of bf16 weights, SGD-SaI scales), so restore their saved dtype. Where
        the gradients are replicated is a fact of this run, not of the checkpoint: it is kept, and so is
        every group key the checkpoint lacks (an older release's: torch would drop the live value, e.g.
        the ``rule`` mark that decides a group's state). The empty entries of stateless tensors
        (``state_dict``) are dropped: such a tensor has no state. Counts still pending on the device
        belong to the run being replaced: dropped."""
        live = [dict(g) for g in self.param_groups]
        self._pending_counts, self._scalars = {}, {}
        super().load_state_dict(state_dict)
        for p in [p for p, st in self.state.items() if not st]:
            del self.state[p]
        for g, old in zip(self.param_groups, live):
            g["replicate_group"] = old.get("replicate_group")
            for k, v in old.items():
                g.setdefault(k, v)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if not saved or p not in self.state:
                continue
            for k, v in saved.items():
                if k in self.host_state:  # fp32, where this run's steps read it (see _scale_device)
                    self.state[p][k] = v.detach().to(self._scale_device(group_of[p], p), torch.float32).clone()
                elif torch.is_tensor(v) and v.dtype == torch.float32 and self.state[p][k].dtype != torch.float32:
                    self.state[p][k] = v.to(device=self.state[p][k].device)

    def _scale_device(self, group: dict, param: torch.Tensor) -> torch.device:
        """Where per-weight ``host_state`` lives: on the host for host-decided steps, beside the weight
        for device-decided ones."""
        device = param.device if param.device.type != "meta" else torch.device("cpu")
        return device if self._decides_on_device(group, device) else torch.device("cpu")

    def __getstate__(self) -> dict:
        self.sync_counters()
        return super().__getstate__()

    def __setstate__(self, state: dict) -> None:
        """Unpickling / deepcopy (a fresh object: default layouts, empty caches), and torch's
        ``load_state_dict``, which calls this on the live object (attached layouts are kept)."""
        super().__setstate__(state)
        for st in self.state.values():  # torch.optim.AdamW's rule: a step counter saved as a number
            if isinstance(st, dict) and "step" in st and not torch.is_tensor(st["step"]):
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
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
    dtype_note = (" (the matrix rule computes in fp32, so a float64 weight is refused rather than silently "
                  "stepped in lower precision: cast with model.float())")

    @classmethod
    def state_size(cls, group: dict, element_bytes: int) -> StateSize:
        """0 on matrix-rule weights; the AdamW fallback's two fp32 moments and its step counter (on the
        device unless steps are decided on the host; ``group["rule"]``: the weight's rule, ``weight_rule``)."""
        if group.get("rule") == "fallback" and group.get("fallback", "adamw") == "adamw":
            return adamw_fallback_state(group)
        return StateSize()

    def weight_rule(self, group: dict, shape: tuple) -> str:
        """"fallback" for 0-/1-D weights and in a ``rule="fallback"`` group; otherwise "matrix", unless
        the matrix rule cannot move the weight (``_matrix_rule_fits``: SWAN's GradNorm zeroes a 1 x 1)."""
        if group.get("rule") == "fallback" or len(shape) < 2:
            return "fallback"
        count, m, n = matrix_shape(shape, tensor_batch_dims(shape, group.get("batch_dims", 0)))
        return "matrix" if self._matrix_rule_fits(m, n, group) else "fallback"

    def _matrix_rule_fits(self, m: int, n: int, group: dict) -> bool:
        """Whether the matrix rule gives an (m x n) matrix a useful update."""
        return True

    def _ensure_state(self, group, units, shards) -> None:
        if group["fallback"] == "adamw":
            for t, ss in zip(units, shards):
                if self._unit_rule(group, ss) == "fallback":
                    on_device = self._decides_on_device(group, t.device)
                    adamw_state(self.state[t], t, t.device if on_device else None)

    def _unit_rule(self, group: dict, shards: list[WeightShard]) -> str:
        """The rule of the weights a tensor holds: one, or several of one rule (a ZeRO partition of a
        group ``split_groups_by_rule`` made); a tensor holding both would need two kinds of state."""
        rules = {self.weight_rule(group, s.shape) for s in shards}
        if len(rules) > 1:
            raise RuntimeError(
                f"{type(self).__name__}: one tensor holds weights of both rules (a flattened buffer of a mixed "
                "param group); call optimizer.split_groups_by_rule() before the engine flattens the groups"
            )
        return rules.pop() if rules else "fallback"

    def _step_group(self, group, units, live) -> None:
        """The fallback on the group's fallback weights at ``lr * fallback_lr_ratio``, then the matrix
        rule on the others, in runs of fragments that share their collectives."""
        masks = live if isinstance(live, StepMasks) else None
        fallback, matrix = [], []
        for t, ss in units:
            (fallback if self._unit_rule(group, ss) == "fallback" else matrix).append((t, ss))
        shards = [s for _, ss in units for s in ss]
        if not shards:
            return
        lr = self._lr(group, shards[0].grad.device, masks)
        if fallback:
            fallback_lr = lr * group["fallback_lr_ratio"]
            if group["fallback"] == "adamw":
                adamw_fallback(self, group, fallback, fallback_lr, masks)
            else:
                stateless_fallback(self, group, [s for _, ss in fallback for s in ss], fallback_lr,
                                   ROW_FLOORS[group["fallback"]])
        batch_dims = group.get("batch_dims", 0)
        # an empty matrix (0 x n) has no update; device-decided steps reach it too (every weight is computed)
        frags = [f for _, ss in matrix for s in ss for f in split_matrices(s, tensor_batch_dims(s.shape, batch_dims))
                 if f.m * f.n]
        for run in batch_runs(frags, self.run_by):
            self._matrix_update(group, run, self._comm(run[0].weight), lr)

    def _matrix_update(self, group: dict, frags: list[MatrixFragment], comm: Collectives, lr) -> None:
        """The rule on ``frags`` (one global order, same collectives; ``comm``: their ``group``'s).
        ``lr``: a float, or the float64 device scalar of a device-decided step; pass it on to
        ``_apply_fragments`` / ``fused_update`` as it is."""
        raise NotImplementedError

    def _row_col_comms(self, frags: list[MatrixFragment]) -> tuple[list[Collectives], list[Collectives]]:
        """The collectives over which this run's row and column statistics add up."""
        w = frags[0].weight
        return self._comms_for(w.row_groups), self._comms_for(w.col_groups)

    def _apply_fragments(self, group: dict, frags: list[MatrixFragment], updates, lr) -> None:
        self._apply([f.param for f in frags], list(updates), lr, group["weight_decay"], group,
                    keys=[f.weight.key for f in frags], noise_keys=[f.key for f in frags])

    def fused_update(self, group: dict, lr) -> "FusedUpdate":
        """What ``row_col_norms.normalize_rows_cols`` needs to write its update with the fused kernel:
        the LR and weight decay (device scalars on device-decided steps) and each fragment's flag."""
        masks = self._masks
        if masks is None:
            return FusedUpdate(lr, group["weight_decay"], None, self.launch_tables)
        return FusedUpdate(lr, self.scalars(group, lr.device)[1], masks, self.launch_tables)
