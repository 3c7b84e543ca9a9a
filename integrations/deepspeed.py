"""DeepSpeed integration: JSON ``"type"`` registration and ZeRO-1/2/3 layouts.

``import stateless_opt.integrations.deepspeed`` (or ``register()``, idempotent) makes
``deepspeed.initialize`` accept ``"optimizer": {"type": "SWAN" | "SinkGD" | "SGDSaI", "params": {...}}``
(any registered name or alias, any case, read from ``stateless_opt.registry``; ``"params"`` validated by
the same pydantic models as the constructors, so a bad key or type names the field), and puts a
``DeepSpeedLayout`` first in our optimizer's ``layouts`` whenever an engine is built with one of ours,
through any door (JSON type, ``optimizer=`` instance, ``optimizer=`` callable).

The layout turns what ZeRO hands the base optimizer (one flat fp32 tensor per param group, or per
ZeRO-3 sub-group) into ``WeightShard``s of every weight of that flat tensor, with every DP rank's
flat range, over DeepSpeed's data-parallel process group:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer``): the group's flat buffer is laid out in
  ``round_robin_bit16_groups`` order at ``round_robin_bit16_offsets`` and cut into equal partitions
  of ``partition_size``; rank r owns ``[r*ps, (r+1)*ps)``. (``_hp_mapping`` is NOT used: it is wrong
  with ``round_robin_gradients`` and no ``parameter_alignment`` in DeepSpeed 0.19.)
* ``BF16_Optimizer`` (bf16 + fp32 grad accumulation + stage 1): the same cut of a contiguous flat
  (``bf16_groups``). Every rank holds the full averaged gradients, but only its own fp32 master
  partition, so the partitioned layout is the correct one (the partition's ``.grad`` is a view into the
  full buffer).
* ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): a sub-group's flat tensor is the concatenation of each
  weight's ``partition_numel()`` slice; rank r holds ``[r*pn, (r+1)*pn)`` of the flattened weight. The
  tail past ``ds_numel`` is padding that holds uninitialised memory: it is excluded from the shards
  and zeroed (weight and gradient) before every step.

The matrix/fallback rule of each group is known from our param groups (JSON door: classified from the
engine's module and true shapes, ``ds_shape`` under ``zero.Init``).

``ZeroMemory`` tells ``stateless_opt.memory_report`` where a ZeRO engine keeps its partitions, masters
and gradient buffers (the report's ``EngineView``; registered on import).

DeepSpeed versions: the patch and the layouts read DeepSpeed internals, so they are version-checked:
``SUPPORTED`` is the accepted range, ``VERIFIED`` the versions the test-suite ran on. Outside the range
``register()`` refuses (``STATELESS_OPT_DEEPSPEED_UNVERIFIED=1`` downgrades that to a warning); every
internal attribute the layouts read is checked when the engine is built, with an error naming it.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from stateless_opt import memory, registry
from stateless_opt.config import validate
from stateless_opt.extras import require
from stateless_opt.grouping import fallback_weights
from stateless_opt.layouts import FlatRange, WeightShard, true_shape
from stateless_opt.memory import StateUnit
from stateless_opt.optimizer import StatelessOptimizer

log = logging.getLogger("stateless_opt.deepspeed")

# Accepted DeepSpeed versions: [min, max). VERIFIED: the versions tests/test_deepspeed.py passed on.
# 0.17.6 and 0.18.9 have the internals read here (without per-parameter alignment, handled below) but
# could not be run: on torch 2.13 their own ZeRO-1/2 all-gather fails before any optimizer is involved.
SUPPORTED = ("0.19.0", "0.20.0")
VERIFIED = ("0.19.8",)
UNVERIFIED_ENV = "STATELESS_OPT_DEEPSPEED_UNVERIFIED"

_MARK = "_stateless_opt_originals"  # attribute on DeepSpeedEngine holding the unpatched methods
PREFIX = "stateless_opt + DeepSpeed: "


# ----------------------------------------------------------------------------------- registration
def _version_tuple(v: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(v).release


def check_version(version: str | None = None) -> str:
    """The installed DeepSpeed version if it is in ``SUPPORTED``; else raise (or warn with
    ``STATELESS_OPT_DEEPSPEED_UNVERIFIED=1``)."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    lo, hi = SUPPORTED
    base = version.split("+")[0]
    try:
        ok = _version_tuple(lo) <= _version_tuple(base) < _version_tuple(hi)
    except Exception:  # unparsable version string
        ok = False
    if not ok:
        msg = (
            f"{PREFIX}DeepSpeed {version} is outside the supported range >={lo},<{hi} (verified: "
            f"{', '.join(VERIFIED)}). The integration patches DeepSpeed internals (optimizer registration, "
            f"ZeRO partition layouts) that change between releases; install a supported DeepSpeed, or set "
            f"{UNVERIFIED_ENV}=1 to try anyway (every internal it reads is still checked when an engine is built)."
        )
        if os.environ.get(UNVERIFIED_ENV, "") not in ("", "0"):
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        else:
            raise RuntimeError(msg)
    return version


def lookup(name: Any) -> type[StatelessOptimizer] | None:
    """Our class for a DeepSpeed ``optimizer.type`` (a registered name or alias, any case), else None."""
    spec = registry.find(name) if isinstance(name, str) else None
    return spec.cls if spec is not None else None


def register() -> None:
    """Patch ``DeepSpeedEngine`` (four methods, idempotent; ``unregister()`` restores them):

    * ``_is_supported_optimizer``: our names pass DeepSpeed's sanity check, any case;
    * ``_configure_basic_optimizer``: builds ours from the JSON ``params`` (validated, fields named);
    * ``_configure_optimizer``: refuses configurations our layouts do not cover, gives each rule its own
      param group before ZeRO flattens each group into one buffer (``split_groups_by_rule``: matrix and
      fallback weights keep different state), and puts the layout first in our optimizer's ``layouts``
      once DeepSpeed has built its ZeRO wrapper (all doors);
    * ``save_checkpoint``: with one of ours under ZeRO, also writes which weight each rank's saved
      partition holds (``stateless_opt_layout.json``), what ``ds_to_universal`` (ours) converts from.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine as E

    if getattr(E, _MARK, None) is not None:
        return
    check_version()
    originals = {
        "_is_supported_optimizer": E._is_supported_optimizer,
        "_configure_basic_optimizer": E._configure_basic_optimizer,
        "_configure_optimizer": E._configure_optimizer,
        "save_checkpoint": E.save_checkpoint,
    }
    orig_supported = originals["_is_supported_optimizer"]
    orig_basic = originals["_configure_basic_optimizer"]
    orig_configure = originals["_configure_optimizer"]
    orig_save = originals["save_checkpoint"]

    def _is_supported_optimizer(self, optimizer_name):
        return lookup(optimizer_name) is not None or orig_supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):
        cls = lookup(self.optimizer_name())
        if cls is None:
            return orig_basic(self, model_parameters)
        return build_from_json(self, cls, model_parameters)

    def _configure_optimizer(self, client_optimizer, model_parameters):
        if client_optimizer is None:
            cls = lookup(self.optimizer_name())
            if cls is not None:
                check_engine(self, cls, client=False)
        elif isinstance(client_optimizer, StatelessOptimizer):
            check_engine(self, type(client_optimizer), client=True)
            client_optimizer.split_groups_by_rule()
        elif not isinstance(client_optimizer, torch.optim.Optimizer) and callable(client_optimizer):
            factory = client_optimizer

            def client_optimizer(params, _factory=factory, _engine=self):
                opt = _factory(params)
                if isinstance(opt, StatelessOptimizer):
                    check_engine(_engine, type(opt), client=True)
                    opt.split_groups_by_rule()
                return opt

        orig_configure(self, client_optimizer, model_parameters)
        if isinstance(getattr(self, "basic_optimizer", None), StatelessOptimizer):
            attach(self)

    def save_checkpoint(self, save_dir, tag=None, *args, **kwargs):
        out = orig_save(self, save_dir, tag, *args, **kwargs)
        if layout_of(self) is not None:  # ZeRO with one of ours: where each rank's partition sits, by name
            from .ds_to_universal import write_layout_index

            write_layout_index(self, save_dir, f"global_step{self.global_steps}" if tag is None else str(tag))
        return out

    _is_supported_optimizer.__wrapped__ = orig_supported
    save_checkpoint.__wrapped__ = orig_save
    E.save_checkpoint = save_checkpoint
    _configure_basic_optimizer.__wrapped__ = orig_basic
    _configure_optimizer.__wrapped__ = orig_configure
    E._is_supported_optimizer = _is_supported_optimizer
    E._configure_basic_optimizer = _configure_basic_optimizer
    E._configure_optimizer = _configure_optimizer
    setattr(E, _MARK, originals)
    log.debug("registered %s with DeepSpeedEngine", ", ".join(registry.OPTIMIZERS))


def unregister() -> None:
    """Undo ``register()`` (for tests)."""
    from deepspeed.runtime.engine import DeepSpeedEngine as E

    originals = getattr(E, _MARK, None)
    if originals is None:
        return
    for name, fn in originals.items():
        setattr(E, name, fn)
    delattr(E, _MARK)


def is_registered() -> bool:
    from deepspeed.runtime.engine import DeepSpeedEngine as E

    return getattr(E, _MARK, None) is not None


# ----------------------------------------------------------------------------------- JSON door
def json_params(cls: type[StatelessOptimizer], params: dict | None, type_name: str = "") -> dict:
    """Validate a DeepSpeed ``optimizer.params`` block with the optimizer's pydantic model; the error
    names each offending field (and says when an ``"auto"`` value was left for the HF Trainer)."""
    params = dict(params or {})
    where = f'DeepSpeed config "optimizer" (type {type_name or cls.__name__!r}) "params"'
    autos = [k for k, v in params.items() if v == "auto"]
    try:
        validate(cls.config_cls, params, where)
    except ValueError as err:
        hint = ""
        if autos:
            hint = (
                f' -- {", ".join(autos)} still "auto": the HF Trainer fills these, otherwise fill them yourself '
                "(stateless_opt.integrations.deepspeed.fill_auto)"
            )
        raise ValueError(f"{err}{hint}") from None
    return params


def json_groups(module: torch.nn.Module, model_parameters, *, uses_rules: bool = True) -> list[dict]:
    """Param groups for an optimizer built from the JSON door: ``model_parameters`` (tensors or groups;
    default: the module's trainable parameters), each group without a ``rule`` split into matrix /
    fallback by the module (embeddings and the output head -> fallback) and true shapes (``ds_shape``
    under ZeRO-3 ``zero.Init``), with parameter names."""
    if model_parameters is None:
        model_parameters = [p for p in module.parameters() if p.requires_grad]
    items = list(model_parameters)
    if not items:
        raise ValueError(f"{PREFIX}no parameters to optimize")
    groups = [dict(g) for g in items] if isinstance(items[0], dict) else [{"params": items}]
    names = {id(p): n for n, p in module.named_parameters()}
    special = fallback_weights(module)
    out = []
    for g in groups:
        params = [g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"])
        given_names = g.pop("param_names", None) or g.pop("names", None)
        if params and all(isinstance(p, tuple) for p in params):  # named_parameters()
            given_names, params = [n for n, _ in params], [p for _, p in params]
        g_names = list(given_names) if given_names else [names.get(id(p), f"param{j}") for j, p in enumerate(params)]
        if not uses_rules or "rule" in g:
            out.append({**g, "params": params, "param_names": g_names})
            continue
        parts: dict[str, dict] = {}
        for p, n in zip(params, g_names):
            matrix = id(p) not in special and len(true_shape(p)) >= 2
            rule = "matrix" if matrix else "fallback"
            part = parts.setdefault(rule, {**g, "params": [], "param_names": [], "rule": rule})
            part["params"].append(p)
            part["param_names"].append(n)
        if "fallback" in parts:
            parts["fallback"].pop("batch_dims", None)
        out.extend(parts[r] for r in ("matrix", "fallback") if r in parts)
    return out


def build_from_json(engine, cls: type[StatelessOptimizer], model_parameters) -> StatelessOptimizer:
    params = json_params(cls, engine.optimizer_params(), engine.optimizer_name())
    groups = json_groups(engine.module, model_parameters, uses_rules=cls.uses_rules)
    opt = cls(groups, **params)
    opt.split_groups_by_rule()
    return opt


def fill_auto(config: dict, values: dict[str, Any]) -> dict:
    """A copy of ``config`` with every ``"auto"`` replaced: ``values`` maps dotted paths
    (``"optimizer.params.lr"``, ``"train_micro_batch_size_per_gpu"``, ``"bf16.enabled"``) to values.
    Raises if an ``"auto"`` is left unfilled (plain DeepSpeed does not understand it)."""
    import copy

    out = copy.deepcopy(config)
    left: list[str] = []

    def walk(node, path):
        for k, v in list(node.items()):
            p = f"{path}.{k}" if path else k
            if isinstance(v, dict):
                walk(v, p)
            elif v == "auto":
                if p in values:
                    node[k] = values[p]
                else:
                    left.append(p)

    walk(out, "")
    if left:
        raise ValueError(f'"auto" values left unfilled: {", ".join(left)}')
    return out


# ----------------------------------------------------------------------------------- checks
def check_engine(engine, cls: type, *, client: bool) -> None:
    """Refuse DeepSpeed configurations whose layouts we do not cover, with a message saying what to do."""
    name = cls.__name__
    stage = engine.zero_optimization_stage() if engine.zero_optimization() else 0
    zcfg = engine._config.zero_config
    hpz = getattr(engine, "zero_hpz_partition_size", lambda: 1)()
    if hpz and hpz > 1:
        raise ValueError(
            f"{PREFIX}ZeRO++ hierarchical partitioning (zero_hpz_partition_size={hpz}) is not supported with {name}: "
            "its secondary partitions change which rank holds which slice; remove zero_hpz_partition_size"
        )
    mics = getattr(zcfg, "mics_shard_size", -1)
    if isinstance(mics, int) and mics > 0:
        raise ValueError(
            f"{PREFIX}MiCS (mics_shard_size={mics}) is not supported with {name}: its shard groups differ from the "
            "data-parallel group the layouts use; remove mics_shard_size"
        )
    if bool(getattr(engine, "zenflow", False)):
        raise ValueError(f"{PREFIX}ZenFlow is not supported with {name}; remove zero_optimization.zenflow")
    if stage == 3 and getattr(engine, "super_offload", lambda: False)():
        raise ValueError(f"{PREFIX}SuperOffload is not supported with {name}; remove offload_optimizer.super_offload")
    if engine.zero_use_cpu_optimizer():
        device = str(getattr(zcfg.offload_optimizer, "device", ""))
        if "nvme" in device:
            raise ValueError(
                f"{PREFIX}offload_optimizer to NVMe is not supported with {name} (optimizer-state swapping assumes "
                "flat-shaped states); use offload_optimizer.device='cpu'"
            )
        ratio = getattr(zcfg.offload_optimizer, "ratio", 1.0)
        if ratio is not None and ratio < 1.0:
            raise ValueError(f"{PREFIX}offload_optimizer.ratio < 1 needs DeepSpeedCPUAdam; use ratio 1.0 with {name}")
        if client and engine.zero_force_ds_cpu_optimizer():
            raise ValueError(
                f'{PREFIX}offload_optimizer with {name} passed as optimizer=: set "zero_force_ds_cpu_optimizer": false '
                "in the DeepSpeed config (DeepSpeed otherwise insists on DeepSpeedCPUAdam; "
                f"{name} runs on the offloaded CPU partition as it is)"
            )
    if getattr(zcfg, "elastic_checkpoint", False):
        raise ValueError(
            f"{PREFIX}zero_optimization.elastic_checkpoint is not supported with {name}: DeepSpeed re-partitions "
            "the optimizer state with the state keys of param group 0 and as if every state tensor were "
            f"flat-shaped, which silently drops or misplaces {name}'s state (the fallback's moments next to "
            "stateless matrix weights, SGD-SaI's per-weight scales). Set elastic_checkpoint to false; to resume "
            "at another world size or stage use the portable checkpoint (stateless_opt.checkpoint.save_portable / "
            "load_portable), or `python -m stateless_opt.integrations.ds_to_universal` with \"load_universal\": true"
        )


# ----------------------------------------------------------------------------------- layouts
@dataclass
class _Weight:
    param: torch.Tensor  # the model's (low-precision) parameter
    key: tuple  # (DeepSpeed group index, weight index in that group): equal on every rank
    shape: tuple[int, ...]
    ranges: list[FlatRange]  # per rank, flat range of the weight; (0, 0) if the rank holds none
    local: int  # where this rank's piece starts in its flat tensor
    pad: tuple[int, int] | None = None  # local padding after the piece (ZeRO-3): masked


@dataclass
class _Unit:
    tensor: torch.Tensor  # the flat fp32 tensor DeepSpeed hands the base optimizer
    weights: list[_Weight]
    group: Any  # DeepSpeed's data-parallel process group for it
    rank: int
    world: int
    group_index: int  # index of the base optimizer's param group


def _need(obj, *names):
    for n in names:
        if not hasattr(obj, n):
            raise RuntimeError(
                f"{PREFIX}{type(obj).__name__} has no attribute {n!r}: this DeepSpeed version lays out ZeRO partitions "
                f"differently from the verified ones ({', '.join(VERIFIED)}); the layout cannot be built"
            )


def _partitioned(params, shapes, offsets, keys, ps: int, world: int, me: int) -> list[_Weight]:
    """Weights at ``offsets`` of a flat buffer cut into ``world`` partitions of ``ps`` elements."""
    out = []
    for p, shape, off, key in zip(params, shapes, offsets, keys):
        n = 1
        for d in shape:
            n *= d
        ranges = []
        for r in range(world):
            s, e = max(off, r * ps), min(off + n, (r + 1) * ps)
            ranges.append(FlatRange(s - off, e - off) if s < e else FlatRange(0, 0))
        s, e = ranges[me]
        local = off + s - me * ps if e > s else 0
        out.append(_Weight(p, key, tuple(shape), ranges, local))
    return out


def _pg_info(pg) -> tuple[int, int]:
    return dist.get_world_size(pg), dist.get_rank(pg)


class DeepSpeedLayout:
    """The layout of a DeepSpeed ZeRO wrapper's flat partitions (see the module docstring), first in
    the optimizer's ``layouts`` once attached: every tensor the optimizer is stepped on is one of them.
    Resolved at ``step()`` time from the flat tensor handed over (looked up by identity)."""

    def __init__(self, wrapper, kind: str):
        self.wrapper = wrapper
        self.kind = kind  # "zero1/2", "bf16", "zero3"
        self._units: dict[int, _Unit] = {}
        self._build()

    # -- construction from DeepSpeed's own per-rank structures
    def _build(self) -> None:
        units = {"zero1/2": self._units_z12, "bf16": self._units_bf16, "zero3": self._units_z3}[self.kind]()
        self._units = {id(u.tensor): u for u in units}

    def _units_z12(self) -> list[_Unit]:
        zo = self.wrapper
        _need(zo, "single_partition_of_fp32_groups", "round_robin_bit16_groups", "round_robin_bit16_indices",
              "partition_size", "real_dp_process_group")
        units = []
        for i, flat in enumerate(zo.single_partition_of_fp32_groups):
            pg = zo.real_dp_process_group[i]
            world, me = _pg_info(pg)
            params = zo.round_robin_bit16_groups[i]
            metas = getattr(zo, "round_robin_bit16_meta", None)
            shapes = [tuple(m.shape) for m in metas[i]] if metas else [tuple(p.shape) for p in params]
            offs = getattr(zo, "round_robin_bit16_offsets", None)
            if offs:
                offsets = list(offs[i])
            else:  # versions without parameter_alignment: packed contiguously
                offsets, o = [], 0
                for s in shapes:
                    offsets.append(o)
                    o += _numel(s)
            keys = [(i, j) for j in zo.round_robin_bit16_indices[i]]  # j: index in the original order
            ps = int(zo.partition_size[i])
            if flat.numel() != ps:
                raise RuntimeError(f"{PREFIX}ZeRO group {i}: partition has {flat.numel()} elements, expected {ps}")
            units.append(_Unit(flat, _partitioned(params, shapes, offsets, keys, ps, world, me), pg, me, world, i))
        return units

    def _units_bf16(self) -> list[_Unit]:
        zo = self.wrapper
        _need(zo, "fp32_groups_flat_partition", "bf16_groups", "bf16_groups_flat", "real_dp_process_group")
        units = []
        for i, flat in enumerate(zo.fp32_groups_flat_partition):
            pg = zo.real_dp_process_group[i]
            world, me = _pg_info(pg)
            params = zo.bf16_groups[i]
            shapes = [tuple(p.shape) for p in params]
            offsets, o = [], 0
            for s in shapes:
                offsets.append(o)
                o += _numel(s)
            ps = zo.bf16_groups_flat[i].numel() // world
            if flat.numel() != ps:
                raise RuntimeError(f"{PREFIX}BF16 group {i}: partition has {flat.numel()} elements, expected {ps}")
            keys = [(i, j) for j in range(len(params))]
            units.append(_Unit(flat, _partitioned(params, shapes, offsets, keys, ps, world, me), pg, me, world, i))
        return units

    def _units_z3(self) -> list[_Unit]:
        zo = self.wrapper
        _need(zo, "fp32_partitioned_groups_flat", "fp16_groups", "sub_group_to_group_id")
        units = []
        count: dict[int, int] = {}
        for s, flat in enumerate(zo.fp32_partitioned_groups_flat):
            gid = zo.sub_group_to_group_id[s]
            params = zo.fp16_groups[s]
            pgs = getattr(zo, "sub_group_process_groups", None)
            pg = pgs[s] if pgs else getattr(params[0], "ds_process_group", zo.dp_process_group)
            world, me = _pg_info(pg)
            weights, off = [], 0
            for p in params:
                pn, numel = int(p.partition_numel()), int(p.ds_numel)
                ranges = [FlatRange(r * pn, min((r + 1) * pn, numel)) if r * pn < numel else FlatRange(0, 0)
                          for r in range(world)]
                s0, e0 = ranges[me]
                valid = e0 - s0
                j = count.get(gid, 0)
                count[gid] = j + 1
                pad = (off + valid, off + pn) if valid < pn else None
                weights.append(_Weight(p, (gid, j), tuple(p.ds_shape), ranges, off, pad))
                off += pn
            if flat.numel() != off:
                raise RuntimeError(f"{PREFIX}ZeRO-3 sub-group {s}: flat has {flat.numel()} elements, expected {off}")
            units.append(_Unit(flat, weights, pg, me, world, gid))
        return units

    # -- the Layout protocol (stateless_opt.layouts)
    def unit(self, tensor: torch.Tensor) -> _Unit:
        u = self._units.get(id(tensor))
        if u is None or u.tensor is not tensor:
            self._build()  # DeepSpeed replaced its flat tensors (e.g. after a checkpoint load)
            u = self._units.get(id(tensor))
            if u is None or u.tensor is not tensor:
                raise RuntimeError(
                    f"{PREFIX}the optimizer is being stepped on a tensor of shape {tuple(tensor.shape)} that is not one "
                    f"of the {self.kind} flat partitions of the engine this optimizer was attached to"
                )
        return u

    def shards(self, tensor: torch.Tensor, group: dict, key: tuple) -> list[WeightShard]:
        u = self.unit(tensor)
        grad, data = tensor.grad.view(-1), tensor.data.view(-1)
        out = []
        for k, w in enumerate(u.weights):
            if w.pad is not None:  # ZeRO-3 padding: uninitialised memory, never part of any weight
                grad[w.pad[0] : w.pad[1]].zero_()
                data[w.pad[0] : w.pad[1]].zero_()
            s, e = w.ranges[u.rank]
            out.append(
                WeightShard(
                    key=w.key, shape=w.shape, extents=w.ranges, rank=u.rank,
                    grad=grad[w.local : w.local + e - s], param=data[w.local : w.local + e - s],
                    group=u.group, row_groups=(u.group,), col_groups=(u.group,), unit_index=k, offset=w.local,
                )
            )
        return out

    # -- what checkpoints ask (stateless_opt.checkpoint)
    def params_of(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The model parameters whose pieces ``tensor`` holds, in the order of ``shards()``."""
        return [w.param for w in self.unit(tensor).weights]

    def units(self) -> list[_Unit]:
        return list(self._units.values())

    def stepped_tensors(self) -> list[tuple[int, int, torch.Tensor]]:
        """(param group, position, flat tensor) of every partition the optimizer steps (ZeRO-3 empties
        ``param_groups`` between steps); rebuilt in case DeepSpeed replaced its flat tensors."""
        self._build()
        return [(u.group_index, k, u.tensor) for k, u in enumerate(self._units.values())]

    def saved_paths(self, k: int) -> tuple[list, list]:
        """Where DeepSpeed's ``save_checkpoint`` puts unit ``k``'s fp32 master and its base-optimizer
        state inside this rank's ``*optim_states.pt`` (keys from the root of the saved dict)."""
        root = ["optimizer_state_dict"]
        if self.kind == "zero3":
            # the base optimizer's state_dict numbers the sub-groups group by group (_set_fp32_optimizer_param_groups)
            gids = self.wrapper.sub_group_to_group_id
            order = sorted(range(len(gids)), key=lambda s: (gids[s], s))
            return root + ["fp32_flat_groups", k], root + ["optimizer_state_dict", "state", order.index(k)]
        return root + ["single_partition_of_fp32_groups", k], root + ["base_optimizer_state", "state", k]

    def weights_loaded(self) -> None:
        """The fp32 masters were written (a portable checkpoint): refresh the model's weights from them."""
        zo = self.wrapper
        if self.kind == "zero3":
            for s in range(len(zo.fp32_partitioned_groups_flat)):
                zo._reassign_or_swap_out_partitioned_parameters(s)
        else:
            zo.update_lp_params()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _classes(*paths: str) -> tuple[type, ...]:
    """DeepSpeed classes by ``module:Name`` (those this version lacks are left out)."""
    import importlib

    out = []
    for path in paths:
        module, name = path.split(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # pragma: no cover - depends on the DeepSpeed version
            pass
    return tuple(out)


def wrapper_kind(wrapper) -> str | None:
    """"zero3", "zero1/2" or "bf16" for DeepSpeed's partitioning wrappers; None for anything else (an
    optimizer itself, or FP16_UnfusedOptimizer's whole fp32 copies)."""
    if isinstance(wrapper, _classes("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3")):
        return "zero3"
    if isinstance(wrapper, _classes("deepspeed.runtime.zero.stage_1_and_2:DeepSpeedZeroOptimizer")):
        return "zero1/2"
    if isinstance(wrapper, _classes("deepspeed.runtime.bf16_optimizer:BF16_Optimizer")):
        return "bf16"
    return None


def attach(engine) -> DeepSpeedLayout | None:
    """Put the layout of ``engine``'s ZeRO wrapper first in its base optimizer's (ours) ``layouts``.
    Called by the patched ``_configure_optimizer``; safe to call again."""
    opt = engine.basic_optimizer
    wrapper = engine.optimizer
    unsupported = _classes("deepspeed.runtime.zero.mics:MiCS_Optimizer",
                           "deepspeed.runtime.zenflow.zenflow_stage_1_and_2:ZenFlowZeroOptimizer",
                           "deepspeed.runtime.superoffload.superoffload_stage3:SuperOffloadOptimizer_Stage3")
    if isinstance(wrapper, unsupported):
        raise ValueError(f"{PREFIX}{type(wrapper).__name__} is not supported with {type(opt).__name__}")
    if wrapper is opt or isinstance(wrapper, _classes("deepspeed.runtime.fp16.unfused_optimizer:FP16_UnfusedOptimizer")):
        # No ZeRO (fp32, or bf16/fp16 through FP16_UnfusedOptimizer's per-weight fp32 copies): the engine
        # all-reduces whole gradients (DDP-like), so every rank holds every weight: replicated layout.
        group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            opt.replicate_group = group
        opt.layouts = [lay for lay in opt.layouts if not isinstance(lay, DeepSpeedLayout)]
        return None
    kind = wrapper_kind(wrapper)
    if kind is None:
        raise ValueError(
            f"{PREFIX}DeepSpeed wrapped {type(opt).__name__} in {type(wrapper).__name__}, which has no layout here "
            "(supported: ZeRO stage 1/2/3, BF16_Optimizer, and no ZeRO with fp32 or FP16_UnfusedOptimizer)"
        )
    layout = DeepSpeedLayout(wrapper, kind)
    opt.add_layout(layout)
    # "load_universal": true reads the universal checkpoint our ds_to_universal writes (a portable
    # checkpoint), not DeepSpeed's per-parameter Adam files
    from .ds_to_universal import load_universal

    wrapper._load_universal_checkpoint = functools.partial(load_universal, weakref.ref(engine))
    if kind == "zero1/2":
        _screen_all_groups_first(wrapper, opt)
    return layout


def _screen_all_groups_first(wrapper, opt) -> None:
    """ZeRO-1/2 call our ``step()`` once per param group, with ``param_groups`` swapped to that group, so
    our screen sees one group at a time: a NaN/Inf in a later group's gradient would be found after the
    earlier groups stepped (a partial step). DeepSpeed checks every group first itself when it computes
    the gradient norm or checks for overflow; when it does neither (fp32 with ``compute_grad_norm:
    false``), check every group's gradients before its loop with its own finiteness test (reduced over
    its data- and model-parallel groups), and have every per-group call of that step skip, counted once."""
    if getattr(wrapper, "_stateless_opt_screens_first", False):
        return
    _need(wrapper, "compute_grad_norm", "check_grad_overflow", "has_overflow", "partition_gradients")
    wrapper._stateless_opt_screens_first = True
    inner = wrapper.step

    def step(*args, **kwargs):
        opt.skip_whole_step = (not wrapper.compute_grad_norm and not wrapper.check_grad_overflow
                               and bool(wrapper.has_overflow(partition_gradients=wrapper.partition_gradients)))
        try:
            return inner(*args, **kwargs)
        finally:
            opt.skip_whole_step = False

    wrapper.step = step


def layout_of(engine_or_optimizer) -> DeepSpeedLayout | None:
    """The layout attached to an engine's (or an optimizer's) stateless_opt optimizer."""
    opt = getattr(engine_or_optimizer, "basic_optimizer", engine_or_optimizer)
    return next((lay for lay in getattr(opt, "layouts", ()) if isinstance(lay, DeepSpeedLayout)), None)



# ----------------------------------------------------------------------------------- memory report
class ZeroMemory:
    """``stateless_opt.memory.EngineView`` of a DeepSpeed engine (or ZeRO wrapper): where it keeps its
    partitions, fp32 masters and gradient buffers, and which base optimizer steps which flat tensor."""

    def __init__(self, module: torch.nn.Module, wrapper, kind: str | None):
        self.module, self.wrapper, self.kind = module, wrapper, kind
        self.optimizer = wrapper.optimizer if kind is not None else wrapper
        initialized = dist.is_available() and dist.is_initialized()
        if kind is None:  # an engine without ZeRO: every rank holds everything
            self.backend, self.stage, self.shard = "zero0", 0, 1
        else:
            if kind == "zero3":
                self.stage, self.backend = 3, "zero3"
            elif kind == "bf16":
                self.stage, self.backend = 1, "zero1-bf16"
            else:
                self.stage = 2 if getattr(wrapper, "partition_gradients", False) else 1
                self.backend = f"zero{self.stage}"
            pg = getattr(wrapper, "dp_process_group", None)
            rpg = getattr(wrapper, "real_dp_process_group", None)
            if rpg:
                pg = rpg[0]
            self.shard = dist.get_world_size(pg) if initialized else 1
        self.offloaded = bool(getattr(wrapper, "cpu_offload", False) or getattr(wrapper, "offload_optimizer", False))

    def units(self) -> list[StateUnit]:
        w, groups = self.wrapper, self.optimizer.param_groups
        if self.kind == "zero1/2":
            rr = getattr(w, "round_robin_bit16_groups", None) or getattr(w, "bit16_groups")
            return [StateUnit(t, groups[i], len(rr[i])) for i, t in enumerate(w.single_partition_of_fp32_groups)]
        if self.kind == "bf16":
            return [StateUnit(t, groups[i], len(w.bf16_groups[i])) for i, t in enumerate(w.fp32_groups_flat_partition)]
        if self.kind == "zero3":
            return [StateUnit(t, groups[w.sub_group_to_group_id[s]], len(w.fp16_groups[s]))
                    for s, t in enumerate(w.fp32_partitioned_groups_flat)]
        return [StateUnit(p, g) for g in groups for p in g["params"]]

    def param_tensors(self) -> list:
        if self.kind == "zero3":  # each weight's partition (plus the persistent small weights, as parameters)
            return [getattr(p, "ds_tensor", None) for p in self.module.parameters()]
        return []

    def master_tensors(self) -> list:
        w = self.wrapper
        return list({"zero1/2": getattr(w, "single_partition_of_fp32_groups", []),
                     "zero3": getattr(w, "fp32_partitioned_groups_flat", []),
                     "bf16": getattr(w, "fp32_groups_flat_partition", [])}.get(self.kind, []))

    def grad_tensors(self) -> list:
        if self.kind is None:
            return []
        w = self.wrapper
        out = [getattr(w, "grads_in_partition", None), getattr(w, "grad_partitions_flat_buffer", None)]
        out += list(getattr(w, "fp32_groups_gradients_flat", None) or [])
        for v in (getattr(w, "averaged_gradients", None) or {}).values():
            out += list(v) if isinstance(v, (list, tuple)) else [v]
        return out

    def state_model(self):
        """DeepSpeed's own Adams keep AdamW's state (the report knows torch's and ours)."""
        if isinstance(self.optimizer, _classes("deepspeed.ops.adam:FusedAdam", "deepspeed.ops.adam:DeepSpeedCPUAdam")):
            return memory.BASELINES["adamw"]
        return None


def memory_view(model, optimizer) -> ZeroMemory | None:
    """The ``memory.EngineView`` of a DeepSpeed engine (``model``) or ZeRO wrapper (``optimizer``)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    engine = model if isinstance(model, DeepSpeedEngine) else None
    if engine is not None:
        model, optimizer = engine.module, optimizer if optimizer is not None else engine.optimizer
    kind = wrapper_kind(optimizer)
    if kind is None and engine is None:
        return None
    return ZeroMemory(model, optimizer, kind)


require("deepspeed", "stateless_opt.integrations.deepspeed")  # before register() imports DeepSpeed
register()
memory.register_engine(memory_view)

__all__ = [
    "register", "unregister", "is_registered", "check_version", "lookup", "json_params", "json_groups",
    "fill_auto", "attach", "layout_of", "DeepSpeedLayout", "ZeroMemory", "memory_view", "wrapper_kind", "SUPPORTED",
    "VERIFIED",
]
