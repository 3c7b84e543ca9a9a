"""Per-rank memory report: what this rank holds, measured, next to what AdamW would hold.

``memory_report(model, optimizer)`` (or ``memory_report(engine)`` for DeepSpeed) measures on every
rank, after a training step:

* **params**: the model's parameters as this rank stores them (FSDP2: the local shards; ZeRO-1/2:
  DeepSpeed's flat low-precision buffers; ZeRO-3: each weight's ``ds_tensor`` partition plus the
  persistent small weights);
* **grads**: the gradient storage the backend holds (``p.grad``; ZeRO: its gradient partitions and
  buffers). Gradients already freed when the report runs (``zero_grad(set_to_none=True)``, or ZeRO
  releasing them after its step) read 0; the formula's figure is then used for ``rest``;
* **master**: fp32 master weights held outside the model (ZeRO's ``single_partition_of_fp32_groups``
  for stage 1/2, ``fp32_partitioned_groups_flat`` for stage 3, BF16_Optimizer's
  ``fp32_groups_flat_partition``); a master sharing the parameters' storage would count once, as
  params;
* **state**: the bytes of ``optimizer.state``, split by the owning param group's ``"rule"`` into
  matrix-rule, fallback and other (groups without a rule key: torch optimizers, SGD-SaI on a plain
  parameter list). Under ZeRO the base optimizer steps one flat tensor per param group (per ZeRO-3
  sub-group), so state is mapped to its group through DeepSpeed's flat partitions;
* **peak**: ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``) on a GPU, the peak RSS
  (``resource.getrusage``) on the CPU, where the current RSS (psutil) is reported too. Reset the CUDA
  peak (``torch.cuda.reset_peak_memory_stats()``) before the steps you want measured;
* **rest** = peak - params - grads - master - state: activations, buffers (DDP buckets, ZeRO's
  reduce buckets, FSDP2's all-gathered weights), temporaries of the optimizer step, allocator slack.

Tensors on the host while the peak is measured on a GPU (the ``step`` scalars of AdamW, SGD-SaI's
per-weight scales, ZeRO-Offload's master and state) are counted in ``host``, not in the components.
Storages are counted once however many views point into them (FSDP2 and ZeRO hand out views of flat
buffers). What an engine keeps besides the model (ZeRO's partitions, masters, gradient buffers) is
read by the integration that knows it, through ``EngineView`` (``stateless_opt.integrations.deepspeed``
registers one on import); each optimizer's state model comes from ``registry.py``. Every rank's
record is gathered (``all_gather_object``, so every rank must call), printed on rank 0 as a table,
returned on every rank as a dict, and written as JSON on request.

The AdamW prediction: same backend, ZeRO stage, world size and dtypes; only the optimizer state is
swapped for torch AdamW's (``exp_avg`` + ``exp_avg_sq`` shaped and typed like each tensor the
optimizer steps, plus a 4-byte ``step`` per tensor), computed from this rank's actual layout, so
padding is included. ``adamw_peak = peak - state + adamw_state`` (device bytes): AdamW's state is
resident for the whole step, like ours; differences in step temporaries are not modelled (torch's
foreach AdamW allocates about one fp32 copy of a group's parameters during its step, fused AdamW
does not). ``saving = adamw_peak - peak``.

Formula (bytes per parameter on each rank; ``P`` = bytes of a stored parameter (4 fp32, 2 bf16),
``N`` = ranks the backend shards over (1 single/DDP, the FSDP2 shard-mesh size, the ZeRO
data-parallel size), ``S`` = optimizer-state bytes per parameter, below):

    backend              params   grads   fp32 master            optimizer state
    single GPU / DDP     P        P       0                      S
    FSDP2 (shard N)      P/N      P/N     0                      S/N
    TP / FSDP2 x TP      P/N_p    P/N_p   0                      S/N_p   (per parameter, below)
    ZeRO-1               P        P       4/N                    S/N
    ZeRO-2               P        P/N     4/N                    S/N
    ZeRO-3               P/N (*)  P/N     4/N                    S/N
    ZeRO-1 BF16_Optimizer  2      4       4/N                    S/N

    S: AdamW 2D (D = bytes of the tensor stepped: the fp32 master under ZeRO, else P) + 4 bytes per
       stepped tensor; SGD 0; SGD with momentum D; SGD-SaI D + 4 bytes per weight (its g-SNR scale,
       kept on the host), except on its fallback groups with the opt-in fallback="adamw": 8 + 4 bytes
       per tensor; SWAN / SinkGD 0 on matrix-rule weights, 8 (fp32 moments) + 4 bytes per tensor on
       fallback weights with fallback="adamw", 0 with fallback="stateless" or "rowclip".

ZeRO-1/2/3 keep a separate fp32 master even for fp32 parameters: stage 1/2 clone the partition, and
stage 3's intended sharing for fp32 parameters never triggers in DeepSpeed 0.19.8 (it compares a
``torch.device`` with a device string); measured by storage, so a version that shares reads 0.
(*) ZeRO-3 keeps weights under ``stage3_param_persistence_threshold`` (default 1e5 elements: norms,
biases) whole on every rank, on top of their partitions. ZeRO's partitions are padded (a few
elements per group), so measured figures exceed ``numel / N`` by that padding; FSDP2's uneven row
shards leave some ranks a little above, some below ``numel / N``. Tensor parallelism ("tp": DTensor
parameters and no FSDP2 module) and FSDP2 over it ("fsdp2_tp": some parameter cut over two mesh dims)
cut each parameter over its own ``N_p`` ranks (the mesh dims that cut it: the TP degree, or dp x tp),
and leave what TP replicates (norms) whole on every TP rank: the formula counts each parameter at
``1/N_p``, and ``shard`` reports the largest ``N_p``. The same table in Markdown is
``FORMULA_MARKDOWN``; ``predict(...)`` evaluates it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Protocol

import psutil
import torch
import torch.distributed as dist

from . import registry
from .layouts import strided_shard_type
from .optimizer import StateSize

KiB, MiB, GiB = 2**10, 2**20, 2**30

FORMULA_MARKDOWN = """\
| backend | params | grads | fp32 master | optimizer state |
|---|---|---|---|---|
| single GPU / DDP | P | P | 0 | S |
| FSDP2 (shard size N) | P/N | P/N | 0 | S/N |
| TP, FSDP2 x TP (each parameter over its N_p ranks) | P/N_p | P/N_p | 0 | S/N_p |
| ZeRO-1 | P | P | 4/N | S/N |
| ZeRO-2 | P | P/N | 4/N | S/N |
| ZeRO-3 | P/N (+ small persistent weights whole) | P/N | 4/N | S/N |
| ZeRO-1 + BF16_Optimizer (bf16, fp32 grad accumulation) | 2 | 4 | 4/N | S/N |

Bytes per parameter on each rank. P: bytes of a stored parameter (4 fp32, 2 bf16). N: ranks the
backend shards over (the FSDP2 shard-mesh size, the ZeRO data-parallel size); N_p: the ranks that cut
one parameter (the TP degree, dp x tp under FSDP2 x TP, 1 for norms TP replicates). S, optimizer state per
parameter: AdamW 2D (D: bytes of the tensor it steps, the fp32 master under ZeRO, else P) + a 4-byte
step per tensor; SGD 0; SGD with momentum D; **SGD-SaI D** + a 4-byte scale per weight (8 on its
fallback groups with the opt-in `fallback="adamw"`); **SWAN and SinkGD 0** on matrix-rule weights, 8
(fp32 moments) on fallback weights with `fallback="adamw"`, **0 end to end with `fallback="stateless"`
or `"rowclip"`**. ZeRO partitions are padded by a few elements per group.
Activations, communication buckets and step temporaries come on top ("rest").
"""

# backend -> (params sharded, grads sharded, master: None | "always" | "unless_fp32", state sharded)
_LAYOUT: dict[str, tuple[bool, bool, str | None, bool]] = {
    "single": (False, False, None, False),
    "ddp": (False, False, None, False),
    "zero0": (False, False, None, False),
    "fsdp2": (True, True, None, True),
    "tp": (True, True, None, True),  # N = the TP degree; weights TP leaves whole (norms) count whole
    "fsdp2_tp": (True, True, None, True),  # N = dp x tp for weights cut over both
    "zero1": (False, False, "always", True),
    "zero2": (False, True, "always", True),
    "zero3": (True, True, "always", True),
    "zero1-bf16": (False, False, "always", True),
}
BACKENDS = tuple(_LAYOUT)
_DTENSOR_BACKENDS = ("fsdp2", "tp", "fsdp2_tp")


def _adamw_state(group: dict, element_bytes: int) -> StateSize:
    """torch AdamW: two moments typed like the tensor; its step counter on the device when fused or
    capturable, else on the host."""
    on_host = not (group.get("fused") or group.get("capturable"))
    return StateSize(per_element=2.0 * element_bytes, per_tensor=4, scalars_on_host=on_host)


def _sgd_state(group: dict, element_bytes: int) -> StateSize:
    """torch SGD: a momentum buffer typed like the tensor, if momentum is on."""
    return StateSize(per_element=float(element_bytes) if group.get("momentum", 0) else 0.0)


# The baselines the report compares with, by what they are (torch's classes); ours come from the registry.
BASELINES: dict[str, Callable[[dict, int], StateSize]] = {
    "adamw": _adamw_state, "adam": _adamw_state, "sgd": _sgd_state,
    "sgd_momentum": lambda group, b: _sgd_state({"momentum": 0.9}, b),
}


def state_model(optimizer: Any) -> Callable[[dict, int], StateSize] | None:
    """How much state ``optimizer`` keeps per tensor: ours from the registry, torch's AdamW/Adam/SGD
    (subclasses included), else None (unknown: no prediction)."""
    spec = registry.spec_of(optimizer)
    if spec is not None:
        return spec.state_size
    if isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam)):
        return _adamw_state
    if isinstance(optimizer, torch.optim.SGD):
        return _sgd_state
    return None


def state_bytes_per_param(optimizer: str, *, dtype_bytes: int = 4, fallback_fraction: float = 0.0,
                          fallback: str | None = None) -> float:
    """``S`` of the formula (excluding the per-tensor scalars) for ``optimizer``: one of ``BASELINES``
    ("adamw", "adam", "sgd", "sgd_momentum") or a registered name ("swan", "sinkgd", "sgdsai", ...);
    ``fallback_fraction`` is the share of parameters in fallback groups (``param_groups``' split) and
    ``fallback`` their rule (None: the optimizer's default)."""
    name = optimizer.lower()
    if name in BASELINES:
        return BASELINES[name]({}, dtype_bytes).per_element
    spec = registry.find(name)
    if spec is None:
        raise ValueError(f"no state formula for optimizer {optimizer!r}")
    if fallback is None:
        fallback = getattr(spec.config.model_fields.get("fallback"), "default", None)
    matrix = spec.state_size({"rule": "matrix"}, dtype_bytes).per_element
    fb = spec.state_size({"rule": "fallback", "fallback": fallback}, dtype_bytes).per_element
    return (1.0 - fallback_fraction) * matrix + fallback_fraction * fb


def predict(numel: int, *, backend: str = "single", world: int = 1, param_bytes: int = 4,
            state_bytes: float = 8.0, scalars: int = 0) -> dict[str, float]:
    """Per-rank bytes of params, grads, fp32 master and optimizer state by the formula (module
    docstring) for ``numel`` parameters; ``state_bytes`` is ``S`` (``state_bytes_per_param``) and
    ``scalars`` the number of 4-byte per-tensor state scalars this rank holds (AdamW's ``step``)."""
    if backend not in _LAYOUT:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    p_sh, g_sh, master, s_sh = _LAYOUT[backend]
    n = max(int(world), 1)
    grad_bytes = 4 if backend == "zero1-bf16" else param_bytes
    p_bytes = 2 if backend == "zero1-bf16" else param_bytes
    has_master = master == "always" or (master == "unless_fp32" and p_bytes != 4)
    return {
        "params": numel * p_bytes / (n if p_sh else 1),
        "grads": numel * grad_bytes / (n if g_sh else 1),
        "master": 4 * numel / n if has_master else 0.0,
        "state": numel * state_bytes / (n if s_sh else 1) + 4 * scalars,
    }


# ------------------------------------------------------------------------------------- records
@dataclass
class RankMemory:
    rank: int
    world: int
    backend: str
    stage: int | None
    shard: int  # N: ranks the parameters / state are sharded over
    optimizer: str
    device: str
    param_dtype: str = ""
    numel: int = 0  # trainable parameters of the model (true shapes, all ranks together)
    tensors: int = 0
    local_numel: int = 0  # elements of the tensors the optimizer steps on this rank
    params: int = 0
    grads: int = 0
    master: int = 0
    state_matrix: int = 0
    state_fallback: int = 0
    state_other: int = 0
    host: int = 0  # bytes of the above components that live on the host while peak is a GPU's
    state_host: int = 0
    state_pred: int | None = None  # our optimizer's state, predicted from this rank's layout
    state_pred_host: int | None = None
    adamw_state: int = 0  # AdamW's state (device), predicted from this rank's layout
    adamw_state_host: int = 0
    grads_formula: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    rss: int = 0
    peak_rss: int = 0
    formula: dict[str, float] = field(default_factory=dict)
    label: str = ""

    @property
    def state(self) -> int:
        return self.state_matrix + self.state_fallback + self.state_other

    @property
    def peak(self) -> int:
        return self.peak_allocated if self.device != "cpu" else self.peak_rss

    @property
    def rest(self) -> int:
        grads = max(self.grads, self.grads_formula)
        return max(0, self.peak - self.params - grads - self.master - self.state)

    @property
    def adamw_peak(self) -> int:
        return self.peak - self.state + self.adamw_state

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        saving = self.adamw_peak - self.peak
        d.update(
            state=self.state, peak=self.peak, rest=self.rest, adamw_peak=self.adamw_peak,
            saving_bytes=saving, saving_gib=saving / GiB,
            saving_pct=100.0 * saving / self.adamw_peak if self.adamw_peak > 0 else 0.0,
            # the same breakdown predicted for AdamW: only the optimizer state differs
            adamw={"params": self.params, "grads": self.grads, "master": self.master, "state": self.adamw_state,
                   "state_host": self.adamw_state_host, "rest": self.rest, "peak": self.adamw_peak},
        )
        return d


# ------------------------------------------------------------------------------------- helpers
def _local(t: torch.Tensor) -> torch.Tensor:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    return t.to_local() if isinstance(t, DTensor) else t


class _Counter:
    """Bytes of storages, each counted once over all components, split into device / host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seen: set[tuple] = set()

    def add(self, tensors: Iterable[Any]) -> tuple[int, int]:
        dev = host = 0
        for t in tensors:
            if not torch.is_tensor(t):
                continue
            t = _local(t)
            if t.numel() == 0 or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
                key, nbytes = (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage
                key, nbytes = ("id", id(t)), t.numel() * t.element_size()
            if key in self.seen:
                continue
            self.seen.add(key)
            if self.device.type != "cpu" and t.device.type == "cpu":
                host += nbytes
            else:
                dev += nbytes
        return dev, host


@dataclass
class StateUnit:
    """A tensor the (base) optimizer steps, its param group, and how many model weights it holds
    pieces of (a ZeRO flat partition holds many)."""

    tensor: torch.Tensor
    group: dict
    weights: int = 1


class EngineView(Protocol):
    """What the report needs from a training engine that wraps the optimizer and keeps tensors of its
    own (DeepSpeed ZeRO: ``stateless_opt.integrations.deepspeed`` implements it). The core never reads
    an engine's internals itself."""

    module: torch.nn.Module  # the model the engine trains
    optimizer: torch.optim.Optimizer  # the base optimizer that steps ``units()``
    backend: str  # one of BACKENDS
    stage: int | None
    shard: int  # ranks the state (and master) is partitioned over
    offloaded: bool  # the optimizer (and its gradients) live on the host

    def units(self) -> list[StateUnit]: ...
    def param_tensors(self) -> list: ...  # parameter storage beyond ``module.parameters()``
    def master_tensors(self) -> list: ...  # fp32 master weights
    def grad_tensors(self) -> list: ...  # gradient partitions and buffers
    def state_model(self) -> Callable[[dict, int], StateSize] | None: ...  # for an optimizer the core does not know


# Functions ``probe(model, optimizer) -> EngineView | None`` that integrations add on import.
ENGINES: list[Callable[[Any, Any], Any]] = []


def register_engine(probe: Callable[[Any, Any], Any]) -> None:
    """Let ``memory_report`` see through an engine (idempotent)."""
    if probe not in ENGINES:
        ENGINES.append(probe)


def _engine_view(model: Any, optimizer: Any):
    for probe in ENGINES:
        view = probe(model, optimizer)
        if view is not None:
            return view
    for obj in (model, optimizer):  # an engine no integration described: refuse rather than mis-count
        if type(obj).__module__.split(".")[0] == "deepspeed":
            raise ValueError(
                f"memory_report got a DeepSpeed {type(obj).__name__}: `import stateless_opt.integrations.deepspeed` "
                "so the report can read its partitions"
            )
    return None


def _predict_state(model: Callable[[dict, int], StateSize] | None, units: list[StateUnit],
                   device: torch.device) -> tuple[int, int] | None:
    """(device, host) bytes of the state ``model`` predicts for these units, after the first step."""
    if model is None:
        return None
    dev = host = 0
    for u in units:
        t = _local(u.tensor)
        size = model(u.group, t.element_size())
        elements = int(size.per_element * t.numel())  # beside the tensor (on the host if it is offloaded)
        scalars = size.per_tensor + size.per_weight * u.weights
        off_device = device.type != "cpu" and t.device.type == "cpu"
        scalars_off = device.type != "cpu" and (size.scalars_on_host or off_device)
        host += elements * off_device + scalars * scalars_off
        dev += elements * (not off_device) + scalars * (not scalars_off)
    return dev, host


def _formula_state(model: Callable[[dict, int], StateSize], optimizer: Any, units: list[StateUnit],
                   numel: int, dtype_bytes: int, n_state: int, share: dict | None = None) -> float:
    """The formula's state for this rank: per-element state over the true sizes of each param group
    (ours record them; for others the model's ``numel`` at the first group's rate) / N, plus the
    scalars of the tensors this rank steps; each weight at its rule's rate (``_weight_groups``).
    ``share``: id(parameter) -> 1/N_p of a DTensor backend (the group's parameters are then counted
    one by one)."""
    groups = optimizer.param_groups
    if share is not None and all(id(p) in share for g in groups for p in g["params"]):
        elements = sum(_true_numel(p) * share[id(p)] * model(rule_group, dtype_bytes).per_element
                       for g in groups for p, (_, rule_group) in zip(g["params"], _weight_groups(optimizer, g)))
        n_state = 1
    elif groups and all("_shapes" in g for g in groups):
        elements = sum(math.prod(shape) * model(rule_group, dtype_bytes).per_element
                       for g in groups for shape, rule_group in _weight_groups(optimizer, g))
    else:
        elements = numel * model(groups[0] if groups else {}, dtype_bytes).per_element
    scalars = 0
    for u in units:
        size = model(u.group, dtype_bytes)
        scalars += size.per_tensor + size.per_weight * u.weights
    return elements / n_state + scalars


def _weight_groups(optimizer: Any, group: dict):
    """(true shape, the group with ``"rule"`` set to that weight's rule) for each tensor of ``group``: one
    param group of ours mixes matrix-rule and fallback weights (``weight_rule``), whose state differs."""
    shapes = group.get("_shapes") or [tuple(p.shape) for p in group["params"]]
    rule = getattr(optimizer, "weight_rule", None) if getattr(optimizer, "uses_rules", False) else None
    for shape in shapes:
        yield tuple(shape), ({**group, "rule": rule(group, tuple(shape))} if rule is not None else group)


def _cut_dims(p: torch.Tensor) -> list[int]:
    """The mesh dims that cut a DTensor (``Shard``, and FSDP2's ``_StridedShard`` over tensor
    parallelism, which ``is_shard()`` does not count)."""
    mesh, placements = getattr(p, "device_mesh", None), getattr(p, "placements", None)
    if mesh is None or placements is None:
        return []
    strided = strided_shard_type()
    return [i for i, pl in enumerate(placements)
            if (pl.is_shard() or (strided is not None and isinstance(pl, strided))) and mesh.size(i) > 1]


def _shard_size(p: torch.Tensor) -> int:
    """Ranks a parameter is cut over (1: whole on every rank)."""
    mesh = getattr(p, "device_mesh", None)
    return math.prod(mesh.size(i) for i in _cut_dims(p)) if mesh is not None else 1


def _dtensor_backend(model: torch.nn.Module, params: list) -> str:
    """"fsdp2" (FSDP2 / HSDP: parameters cut over one mesh dim), "tp" (DTensor parameters and no
    FSDP2 module: tensor parallelism) or "fsdp2_tp" (FSDP2 over tensor parallelism: some parameter cut
    over two mesh dims)."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = any(isinstance(m, FSDPModule) for m in model.modules())
    if not fsdp:
        return "tp"
    return "fsdp2_tp" if any(len(_cut_dims(p)) >= 2 for p in params) else "fsdp2"


def _true_numel(p: torch.Tensor) -> int:
    ds_numel = getattr(p, "ds_numel", None)
    return int(ds_numel) if ds_numel is not None else p.numel()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def measure_peak(device: torch.device) -> dict[str, int]:
    """Peak allocated / reserved bytes on a CUDA device (0 elsewhere), current and peak RSS."""
    out = {"peak_allocated": 0, "peak_reserved": 0}
    if device.type == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    out["rss"] = psutil.Process().memory_info().rss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return out


# ------------------------------------------------------------------------------------- report
def memory_report(
    model: Any,
    optimizer: Any = None,
    *,
    backend: str = "auto",
    label: str = "",
    print_table: bool = True,
    json_path: str | os.PathLike | None = None,
    group: Any = None,
) -> dict[str, Any]:
    """Measure this rank's memory, gather every rank's record, print a table on rank 0, return
    ``{"ranks": [...], "summary": {...}, "formula": ...}`` on every rank, write it as JSON (rank 0)
    if ``json_path``. Every rank of ``group`` (default: the whole world) must call it.

    ``model``: the module (plain, DDP, FSDP2-sharded, tensor-parallel) or a DeepSpeed engine (then ``optimizer``
    defaults to ``engine.optimizer``). ``optimizer``: ours, any torch optimizer, or DeepSpeed's ZeRO
    wrapper (its ``.optimizer`` is the base optimizer). ``backend``: "auto" (detected: ZeRO wrapper ->
    zero1/zero2/zero3/zero1-bf16, DTensor parameters -> fsdp2, tp or fsdp2_tp, more than one rank -> ddp,
    else single)
    or one of ``BACKENDS``. Call it after a step (state exists), before ``zero_grad``
    if the gradients should be measured rather than taken from the formula.
    """
    if isinstance(model, torch.optim.Optimizer) or isinstance(optimizer, torch.nn.Module):
        raise TypeError(
            f"memory_report(model, optimizer) got ({type(model).__name__}, {type(optimizer).__name__}): the "
            "model (or DeepSpeed engine) comes first, then the optimizer"
        )
    view = _engine_view(model, optimizer)
    if view is not None:
        model, inner = view.module, view.optimizer
    elif optimizer is None:
        raise ValueError("memory_report needs the optimizer (or a DeepSpeed engine)")
    else:
        inner = optimizer

    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if initialized else 0
    world = dist.get_world_size(group) if initialized else 1
    params = list(dict.fromkeys(model.parameters()))  # tied weights once
    device = next((p.device for p in params if p.device.type != "meta"), torch.device("cpu"))

    # backend, stage, shard size
    stage: int | None = None
    if view is not None:
        name, stage, shard = view.backend, view.stage, view.shard
    elif any(_shard_size(p) > 1 for p in params) or any(hasattr(p, "device_mesh") for p in params):
        name, shard = _dtensor_backend(model, params), max((_shard_size(p) for p in params), default=1)
    else:
        name, shard = ("ddp" if world > 1 else "single"), 1
    if backend != "auto":
        if backend not in _LAYOUT:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        name = backend

    counter = _Counter(device)
    rec = RankMemory(rank=rank, world=world, backend=name, stage=stage, shard=shard, optimizer=type(inner).__name__,
                     device=_device_name(device), label=label)
    trainable = [p for p in params if p.requires_grad]
    rec.numel = sum(_true_numel(p) for p in trainable)
    rec.tensors = len(trainable)
    rec.param_dtype = str(params[0].dtype).replace("torch.", "") if params else ""

    # params, fp32 master (a master sharing the params' storage was counted as params), gradients
    masters = view.master_tensors() if view is not None else []
    dev, host = counter.add([*params, *(view.param_tensors() if view is not None else [])])
    rec.params, rec.host = dev, rec.host + host
    dev, host = counter.add(masters)
    rec.master, rec.host = dev, rec.host + host
    gtensors = [p.grad for p in params] + [getattr(m, "grad", None) for m in masters]
    dev, host = counter.add(gtensors + (view.grad_tensors() if view is not None else []))
    rec.grads, rec.host = dev, rec.host + host

    # optimizer state, split by the owning group's rule
    units = view.units() if view is not None else [
        StateUnit(p, rule_group) for g in inner.param_groups
        for p, (_, rule_group) in zip(g["params"], _weight_groups(inner, g))]
    rule_of = {id(u.tensor): u.group.get("rule", "other") for u in units}
    for g in inner.param_groups:  # ZeRO-3 outside step(): groups are empty, units come from the engine
        for p, (_, rule_group) in zip(g["params"], _weight_groups(inner, g)):
            rule_of.setdefault(id(p), rule_group.get("rule", "other"))
    split = {"matrix": 0, "fallback": 0, "other": 0}
    for key, st in inner.state.items():
        rule = rule_of.get(id(key), "other")
        dev, host = counter.add(st.values() if isinstance(st, dict) else [st])
        split[rule if rule in split else "other"] += dev
        rec.state_host += host
    rec.state_matrix, rec.state_fallback, rec.state_other = split["matrix"], split["fallback"], split["other"]
    rec.host += rec.state_host
    rec.local_numel = sum(_local(u.tensor).numel() for u in units)

    # predictions from this rank's layout
    model_of_state = (view.state_model() if view is not None else None) or state_model(inner)
    ours = _predict_state(model_of_state, units, device)
    if ours is not None:
        rec.state_pred, rec.state_pred_host = ours
    rec.adamw_state, rec.adamw_state_host = _predict_state(_adamw_state, units, device)

    # the formula (numel / N, no padding), for the JSON and for the gradients at the peak
    big = max(trainable or params, key=_true_numel, default=None)
    pbytes = big.element_size() if big is not None else 4
    dtype_bytes = 4 if masters else pbytes  # what the stepped tensors (and AdamW's moments) are typed like
    n_state = shard if _LAYOUT[name][3] else 1
    # DTensor backends: each parameter counts 1/N_p of itself (tensor parallelism leaves norms whole)
    share = {id(p): 1.0 / _shard_size(p) for p in trainable} if name in _DTENSOR_BACKENDS else None
    numel_eff = sum(_true_numel(p) * shard * share[id(p)] for p in trainable) if share else rec.numel
    formula = predict(numel_eff, backend=name, world=shard, param_bytes=pbytes, state_bytes=0.0)
    formula.pop("state")
    formula["state_adamw"] = numel_eff * 2.0 * dtype_bytes / n_state + 4 * len(units)
    if model_of_state is not None:
        formula["state_ours"] = _formula_state(model_of_state, inner, units, rec.numel, dtype_bytes, n_state,
                                               share)
    rec.formula = formula
    offloaded = view is not None and view.offloaded
    rec.grads_formula = 0 if (offloaded and _LAYOUT[name][1]) else int(formula["grads"])
    rec.__dict__.update(measure_peak(device))

    rows = [rec.as_dict()]
    if initialized and world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows[0], group=group)
        rows = gathered
    report = {"ranks": rows, "summary": summarize(rows), "formula": FORMULA_MARKDOWN}
    if rank == 0:
        if print_table:
            print(format_table(rows), flush=True)
        if json_path:
            path = os.fspath(json_path)
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(report, f, indent=2)
    return report


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rank with the largest peak decides: its peak, AdamW's predicted peak, the saving."""
    top = max(rows, key=lambda r: r["peak"])
    return {
        "backend": top["backend"], "stage": top["stage"], "world": top["world"], "shard": top["shard"],
        "optimizer": top["optimizer"], "device": top["device"], "label": top["label"],
        "max_peak_gib": top["peak"] / GiB,
        "max_adamw_peak_gib": max(r["adamw_peak"] for r in rows) / GiB,
        "saving_gib": (max(r["adamw_peak"] for r in rows) - top["peak"]) / GiB,
        "saving_pct": top["saving_pct"],
        "state_gib_all_ranks": sum(r["state"] + r["state_host"] for r in rows) / GiB,
        "adamw_state_gib_all_ranks": sum(r["adamw_state"] + r["adamw_state_host"] for r in rows) / GiB,
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def human(n: float | None) -> str:
    """Bytes as B / KiB / MiB / GiB, whichever reads best."""
    if n is None:
        return "-"
    a = abs(n)
    if a >= GiB:
        return f"{n / GiB:.2f} GiB"
    if a >= MiB:
        return f"{n / MiB:.1f} MiB"
    if a >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


_ROWS = [
    ("params", "params"), ("grads", "grads"), ("master", "fp32 master"),
    ("state_matrix", "state: matrix rule"), ("state_fallback", "state: fallback"), ("state_other", "state: other"),
    ("state_pred", "state: predicted"), ("host", "on host (not in peak)"), ("rest", "rest (activations...)"),
    ("peak", "PEAK"), ("adamw_state", "AdamW state (pred.)"), ("adamw_peak", "AdamW peak (pred.)"),
    ("saving_bytes", "saving vs AdamW"), ("saving_pct", "saving %"),
]


def format_table(rows: list[dict[str, Any]], ranks_per_block: int = 8) -> str:
    """One column per rank (blocks of ``ranks_per_block``), one row per component."""
    r0 = rows[0]
    stage = f" stage {r0['stage']}" if r0["stage"] is not None else ""
    peak_kind = "peak allocated" if r0["device"] != "cpu" else "peak RSS"
    lines = [
        f"memory per rank: {r0['optimizer']} on {r0['backend']}{stage}, world {r0['world']}, shard {r0['shard']}, "
        f"{_count(r0['numel'])} {r0['param_dtype']} parameters, {r0['device']} ({peak_kind})"
        + (f" [{r0['label']}]" if r0["label"] else "")
    ]
    extra = [("peak_reserved", "peak reserved")] if r0["device"] != "cpu" else [("rss", "current RSS")]
    width = 11
    for b in range(0, len(rows), ranks_per_block):
        block = rows[b : b + ranks_per_block]
        lines.append(f"{'':<22}" + "".join(f"rank {r['rank']}".rjust(width) for r in block))
        for key, head in _ROWS + extra:
            cells = []
            for r in block:
                v = r[key]
                cells.append(f"{v:.1f}%" if key == "saving_pct" else human(v))
            lines.append(f"{head:<22}" + "".join(c.rjust(width) for c in cells))
    lines.append("state: predicted = our optimizer's state from this rank's layout (formula); AdamW = torch AdamW on the "
                 "same layout; AdamW peak = peak - state + AdamW state")
    return "\n".join(lines)
