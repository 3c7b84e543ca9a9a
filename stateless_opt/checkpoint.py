"""A portable checkpoint of an optimizer and the weights it steps: resume on any backend (one process,
DDP, FSDP2/HSDP, DeepSpeed ZeRO-1/2/3, any layout an engine attaches), any world size, any stage.

    from stateless_opt.checkpoint import save_portable, load_portable
    save_portable(model, optimizer, "run/step_100/optimizer")   # every rank calls it
    ...                                                          # another world size, backend, stage
    load_portable(model, optimizer, "run/step_100/optimizer")   # every rank calls it

``model``: the module (plain, DDP-wrapped, ``fully_shard``-ed) or a DeepSpeed engine (then the optimizer
may be left out). What is saved, per weight and keyed by its parameter NAME: the weight as the optimizer
steps it (the fp32 master under ZeRO), every state tensor (AdamW fallback moments and step counter,
SGD-SaI momentum and g-SNR scale, and whatever a rule keeps), and its param group's hyper-parameters
and counters (``step``, ``skipped_steps``). Module buffers and frozen weights are the model's own
checkpoint's business, as are the LR scheduler and the RNG.

How it scales: built on the layouts (``layouts.py``), the same description ``step()`` uses. Each rank
writes the pieces its shards hold (``rank00003.safetensors``: rectangles of each weight's matrix view,
copies held by replicas written once), rank 0 gathers only their *extents* and writes ``portable.json``
last (its presence marks the checkpoint complete). On load each rank reads, of every saved piece, only
the rectangle that overlaps what its shards hold (safetensors slices). No rank ever holds more than its
own share; the index is O(weights x ranks) small entries. Nothing is pickled: tensors in safetensors,
everything else in JSON, so loading a checkpoint runs no code.

A new layout needs nothing here: whatever its ``shards()`` reports (flat ranges, boxes, replicas) is
what gets written and read. A layout whose tensors are not ``param_group["params"]`` (ZeRO-3 empties
them between steps) lists them with ``stepped_tensors()``; one that holds several weights per tensor
names them with ``params_of(tensor)``; one that keeps master weights apart from the model refreshes the
model after a load in ``weights_loaded()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist

from .layouts import Piece, WeightShard, local_views

FORMAT = "stateless_opt.portable"
VERSION = 1
INDEX = "portable.json"
# Param-group entries that are facts of the run that holds the optimizer, not of the checkpoint.
RUN_FACTS = frozenset({"params", "names", "param_names", "_shapes", "replicate_group"})
# The matrix / fallback split is fixed when the optimizer is built: a group's "rule" is never loaded. What
# must agree is each weight's rule, saved per weight in the index (SWAN(model.parameters()) and
# param_groups(model) group the weights differently but may step each alike).
NOT_LOADED = RUN_FACTS | {"rule"}
ELEMENTWISE, PER_WEIGHT, PER_TENSOR = "elementwise", "per_weight", "per_tensor"


class CheckpointError(ValueError):
    """A portable checkpoint that cannot be written or loaded as asked (the message says why)."""


# ====================================================================================== what a rank holds
def _resolve(model, optimizer):
    """(module whose ``named_parameters`` name the weights, our optimizer) from a module (plain, DDP,
    ``fully_shard``-ed, compiled) or a DeepSpeed engine, and our optimizer or DeepSpeed's wrapper of it."""
    from .optimizer import StatelessOptimizer

    engine = hasattr(model, "basic_optimizer") and hasattr(model, "module")
    opt = optimizer
    if engine and (opt is None or opt is model.optimizer):
        opt = model.basic_optimizer
    if not isinstance(opt, StatelessOptimizer) and isinstance(getattr(opt, "optimizer", None), StatelessOptimizer):
        opt = opt.optimizer  # a ZeRO wrapper
    if not isinstance(opt, StatelessOptimizer):
        raise CheckpointError(f"the portable checkpoint holds stateless_opt optimizers; got {type(opt).__name__}")
    module = model.module if engine else model
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):  # torch.compile
            module = module._orig_mod
        else:
            return module, opt


def _stepped_tensors(opt) -> list[tuple[int, int, torch.Tensor]]:
    """(param group, position, tensor) of every tensor the optimizer steps: a layout may list them
    (ZeRO-3 empties ``param_groups`` between steps), else the param groups."""
    for layout in opt.layouts:
        listed = getattr(layout, "stepped_tensors", None)
        if listed is not None:
            return listed()
    return [(gi, pos, t) for gi, g in enumerate(opt.param_groups) for pos, t in enumerate(g["params"])]


@contextlib.contextmanager
def _grads_present(tensors: Iterable[torch.Tensor]):
    """Layouts describe a tensor together with its gradient; outside a step there may be none. Lend
    each tensor its own data as gradient (no memory) while it is described, then take it back."""
    lent = []
    try:
        for t in tensors:
            if t.grad is None:
                t.grad = t.detach()
                lent.append(t)
        yield
    finally:
        for t in lent:
            t.grad = None


@dataclass
class _Held:
    """One stepped tensor: its param group, the shards the layout reports and the weights' names."""

    group: int
    tensor: torch.Tensor
    shards: list[WeightShard]
    names: list[str]
    layout: Any


def _held(module, opt) -> list[_Held]:
    names = {id(p): n for n, p in module.named_parameters()}  # tied weights: the first name
    out = []
    for gi, pos, t in _stepped_tensors(opt):
        group = opt.param_groups[gi]
        for layout in opt.layouts:
            shards = layout.shards(t, group, (gi, pos))
            if shards is not None:
                break
        else:
            raise CheckpointError(f"no layout of {opt.layouts} describes a tensor of shape {tuple(t.shape)}")
        params = layout.params_of(t) if hasattr(layout, "params_of") else [t]
        if len(params) != len(shards):
            raise CheckpointError(f"{type(layout).__name__}: {len(params)} weights but {len(shards)} shards")
        missing = [tuple(p.shape) for p in params if id(p) not in names]
        if missing:
            raise CheckpointError(
                f"the optimizer steps weights of shapes {missing} that are not parameters of the model given "
                "(pass the module, or the engine, whose parameters the optimizer was built on)"
            )
        out.append(_Held(gi, t, shards, [names[id(p)] for p in params], layout))
    return out


def _described(module, opt) -> list[_Held]:
    with _grads_present([t for _, _, t in _stepped_tensors(opt)]):
        return _held(module, opt)


def matrix_view(shape) -> tuple[int, int]:
    """(rows, cols) of the matrix a weight is viewed as by the layouts: shape[0] x prod(rest)."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:])) if shape else (1, 1)


def _is_copy(s: WeightShard) -> bool:
    """A replica's copy of a piece another rank writes (DDP replicas, HSDP's replicate dims)."""
    if s.replicated and s.rank != 0:
        return True
    return any(dist.get_rank(g) != 0 for g in s.agree_groups)


def _holds_first(s: WeightShard) -> bool:
    """This rank writes the weight's per-weight values: it holds its first element (rank 0 of the
    group for an empty weight), and is not a copy."""
    if _is_copy(s):
        return False
    if s.numel == 0:
        return s.rank == 0
    m, n = matrix_view(s.shape)
    return bool(s.local.numel) and s.local.pieces(m, n)[0][0:4:2] == (0, 0)


def state_kind(opt, key: str, value, unit: torch.Tensor) -> str:
    """How a state value maps onto weights: one value per weight the stepped tensor holds
    (``weight_state``: SGD-SaI's g-SNR), one for the whole tensor (``tensor_state``: AdamW's step
    counter; any non-tensor), or one per element (shaped like the tensor's local data)."""
    if key in getattr(opt, "weight_state", ()):
        return PER_WEIGHT
    if key in getattr(opt, "tensor_state", ()) or not torch.is_tensor(value):
        return PER_TENSOR
    if local_views(value)[0].numel() == local_views(unit)[0].numel():
        return ELEMENTWISE
    raise CheckpointError(
        f"{type(opt).__name__} state {key!r} of shape {tuple(value.shape)} is not shaped like its tensor "
        f"{tuple(unit.shape)}: list it in {type(opt).__name__}.weight_state (one value per weight) or "
        "tensor_state (one value per stepped tensor)"
    )


# ====================================================================================== the pieces
@dataclass
class Entry:
    """One piece of one logical tensor: ``name`` ("weight/<param>" or "state/<param>/<key>"), the
    rectangle ``rows`` x ``cols`` of the weight's matrix view (None for a scalar), and where its data
    sits: ``source`` (("weight",) or ("state", key)) of stepped tensor number ``unit``, at flat
    ``offset`` of its local storage (a per-weight value: its index; a per-tensor one: -1)."""

    name: str
    rows: tuple[int, int] | None
    cols: tuple[int, int] | None
    source: tuple
    offset: int
    unit: int = 0  # index of the stepped tensor in this rank's description


@dataclass
class Plan:
    """What this rank writes (``entries``) and the facts every rank agrees on (``weights``: per name,
    param group, shape and state kinds; ``tensors``: per logical tensor, shape and dtype)."""

    entries: list[Entry] = field(default_factory=list)
    weights: dict[str, dict] = field(default_factory=dict)
    tensors: dict[str, dict] = field(default_factory=dict)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def plan(opt, held: list[_Held], *, weights: bool = True) -> Plan:
    """Every piece this rank writes, from the layouts' description of what it holds."""
    out = Plan()
    for u, h in enumerate(held):
        state = opt.state.get(h.tensor, {})
        kinds = {k: state_kind(opt, k, v, h.tensor) for k, v in state.items()}
        for s, name in zip(h.shards, h.names):
            m, n = matrix_view(s.shape)
            out.weights[name] = {"group": h.group, "shape": list(s.shape), "state": kinds,
                                 "rule": opt.weight_rule(opt.param_groups[h.group], tuple(s.shape))}
            rects = s.local.pieces(m, n) if not _is_copy(s) else ()
            first = _holds_first(s)
            if weights:
                key = f"weight/{name}"
                out.tensors[key] = {"shape": list(s.shape), "dtype": _dtype_name(s.param)}
                out.entries += [Entry(key, (p.r0, p.r1), (p.c0, p.c1), ("weight",), s.offset + p.offset, u)
                                for p in rects]
            for k, kind in kinds.items():
                key, v = f"state/{name}/{k}", state[k]
                if kind == ELEMENTWISE:
                    out.tensors[key] = {"shape": list(s.shape), "dtype": _dtype_name(v)}
                    out.entries += [Entry(key, (p.r0, p.r1), (p.c0, p.c1), ("state", k), s.offset + p.offset, u)
                                    for p in rects]
                else:
                    is_tensor = torch.is_tensor(v)
                    out.tensors[key] = {"shape": [], "dtype": _dtype_name(v) if is_tensor else "float64"}
                    if first:
                        index = s.unit_index if kind == PER_WEIGHT else -1
                        out.entries.append(Entry(key, None, None, ("state", k), index, u))
    return out


def resolve(opt, held: list[_Held], e: Entry) -> torch.Tensor:
    """The data of a live entry: a (rows x cols) tensor, or a 0-d one for a scalar."""
    h = held[e.unit]
    if e.source[0] == "weight":
        flat = local_views(h.tensor)[0].reshape(-1)
    else:
        v = opt.state[h.tensor][e.source[1]]
        if e.rows is None:
            v = v if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64)
            return (v.reshape(-1)[e.offset] if e.offset >= 0 else v.reshape(())).detach()
        flat = local_views(v)[0].reshape(-1)
    r, c = e.rows[1] - e.rows[0], e.cols[1] - e.cols[0]
    return flat[e.offset : e.offset + r * c].detach().view(r, c)


def groups_json(opt) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Each param group's hyper-parameters and counters as JSON, tensor-valued ones apart."""
    out, tensors = [], {}
    for gi, g in enumerate(opt.param_groups):
        entry = {}
        for k, v in g.items():
            if k in RUN_FACTS:
                continue
            if torch.is_tensor(v):
                tensors[f"group/{gi}/{k}"] = v.detach().cpu().clone()
                entry[k] = {"__tensor__": f"group/{gi}/{k}"}
                continue
            entry[k] = list(v) if isinstance(v, tuple) else v
            try:
                json.dumps(entry[k])
            except (TypeError, ValueError):
                raise CheckpointError(f"param group {gi}: {k}={v!r} is neither JSON data nor a tensor") from None
        out.append(entry)
    return out, tensors


# ====================================================================================== writing
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere); one process: [obj]."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def write_rank_file(path: Path, file: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if tensors:
        tmp = path / f".{file}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path / file)


def piece_key(e: Entry) -> str:
    return e.name if e.rows is None else f"{e.name}@{e.rows[0]}:{e.rows[1]},{e.cols[0]}:{e.cols[1]}"


def merge_index(parts: list[dict], *, optimizer: str, groups: list[dict], saved: dict) -> dict:
    """One index from each writer's {"file", "pieces", "weights", "tensors"}; checks that the pieces of
    every tensor tile it exactly (no gap, no overlap) and that the writers agree on every weight."""
    weights: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    for part in parts:
        for name, w in part["weights"].items():
            if weights.setdefault(name, w) != w:
                raise CheckpointError(f"ranks disagree about weight {name!r}: {weights[name]} vs {w}")
        for name, t in part["tensors"].items():
            tensors.setdefault(name, {**t, "pieces": []})
        for name, piece in part["pieces"]:
            tensors[name]["pieces"].append({"file": part["file"], **piece})
    for name, t in tensors.items():
        _check_tiling(name, t)
    return {"format": FORMAT, "version": VERSION, "optimizer": optimizer, "saved": saved, "groups": groups,
            "weights": weights, "tensors": tensors}


def _check_tiling(name: str, t: dict) -> None:
    """The pieces of tensor ``name`` cover its matrix exactly once: all inside, areas adding up to the
    whole, no two overlapping (a sweep over rows: each piece is compared with the pieces whose rows it
    shares, a handful, however many ranks wrote)."""
    pieces = t["pieces"]
    if any("rows" not in p for p in pieces):  # a scalar: exactly one value
        if len(pieces) != 1:
            raise CheckpointError(f"{name}: {len(pieces)} values written for a scalar, expected 1")
        return
    m, n = matrix_view(t["shape"])
    total = 0
    active: list[dict] = []
    for p in sorted(pieces, key=lambda p: (p["rows"][0], p["cols"][0])):
        (r0, r1), (c0, c1) = p["rows"], p["cols"]
        if not (0 <= r0 < r1 <= m and 0 <= c0 < c1 <= n):
            raise CheckpointError(f"{name}: piece rows {p['rows']} cols {p['cols']} outside its {m} x {n} matrix")
        total += (r1 - r0) * (c1 - c0)
        active = [q for q in active if q["rows"][1] > r0]
        for q in active:
            if c0 < q["cols"][1] and q["cols"][0] < c1:
                raise CheckpointError(f"{name}: pieces {p} and {q} overlap (a replica wrote its copy?)")
        active.append(p)
    if total != m * n:
        raise CheckpointError(f"{name}: the pieces written cover {total} of {m * n} elements")


def save_portable(model, optimizer, path: str | os.PathLike, *, weights: bool = True) -> Path:
    """Write the portable checkpoint of ``optimizer`` (and, with ``weights``, of the weights it steps)
    to the directory ``path``; every rank calls it (a shared filesystem). ``optimizer`` may be None
    when ``model`` is a DeepSpeed engine. Returns the path."""
    path = Path(path)
    module, opt = _resolve(model, optimizer)
    rank = _rank_world()[0]
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / INDEX).unlink(missing_ok=True)  # incomplete until the new index is written
        for old in path.glob("rank*.safetensors"):
            old.unlink()
    _barrier()
    held = _described(module, opt)
    p = plan(opt, held, weights=weights)
    data = {piece_key(e): resolve(opt, held, e).detach().to("cpu", copy=True) for e in p.entries}
    file = rank_file(rank)
    groups, group_tensors = groups_json(opt)
    if rank == 0:
        data.update(group_tensors)
    write_rank_file(path, file, data)
    write_gathered(path, INDEX, opt, part_of(p, held, file), groups, group_file=file if group_tensors else None)
    return path


def part_of(p: Plan, held: list[_Held], file: str) -> dict:
    """This rank's contribution to the index: its pieces (extents only), the weights it describes."""
    return {"file": file, "weights": p.weights, "tensors": p.tensors,
            "pieces": [(e.name, {"key": piece_key(e), **_extent(e)}) for e in p.entries],
            "layouts": sorted({type(h.layout).__name__ for h in held})}


def _extent(e: Entry) -> dict:
    return {"rows": list(e.rows), "cols": list(e.cols)} if e.rows else {}


def write_gathered(path: Path, index_name: str, opt, part: dict, groups: list[dict],
                   group_file: str | None) -> dict | None:
    """Gather every rank's ``part`` on rank 0, check and write the index there (last: it marks the
    checkpoint complete); every rank raises if rank 0 found it inconsistent."""
    parts = _gather(part)
    error = index = None
    if parts is not None:
        try:
            from .registry import spec_of

            spec = spec_of(opt)
            saved = {"world_size": len(parts), "layouts": sorted({x for q in parts for x in q["layouts"]})}
            index = merge_index(parts, optimizer=spec.name if spec else type(opt).__name__, groups=groups, saved=saved)
            if group_file:
                index["group_file"] = group_file
            write_index(path, index, index_name)
        except Exception as err:  # noqa: BLE001 - every rank must hear of it, or they wait forever
            error = f"{type(err).__name__}: {err}"
    _raise_everywhere(error)
    return index


def write_index(path: Path, index: dict, name: str = INDEX) -> None:
    tmp = path / f".{name}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path / name)


def _raise_everywhere(error: str | None) -> None:
    """Rank 0's verdict on every rank (one broadcast), so no rank goes on alone."""
    rank, world = _rank_world()
    if world > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise CheckpointError(error)


# ====================================================================================== reading
class Reader:
    """A portable checkpoint on disk: its index, and the rectangles of its pieces on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX
        if not index.exists():
            raise CheckpointError(f"{self.path}: no {INDEX} (not a portable checkpoint, or an incomplete one)")
        self.index = json.loads(index.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            found = (self.index.get("format"), self.index.get("version"))
            raise CheckpointError(f"{index}: format {found[0]!r} version {found[1]!r}, expected {FORMAT!r} "
                                  f"version {VERSION}")
        self._files: dict[str, Any] = {}

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._files:
            self._files[file] = safe_open(str(self.path / file), framework="pt", device="cpu")
        return self._files[file]

    def close(self) -> None:
        self._files.clear()

    def has(self, name: str) -> bool:
        return name in self.index["tensors"]

    def scalar(self, name: str) -> torch.Tensor:
        piece = self.index["tensors"][name]["pieces"][0]
        return self._open(piece["file"]).get_tensor(piece["key"])

    def group_tensor(self, key: str) -> torch.Tensor:
        return self._open(self.index["group_file"]).get_tensor(key)

    def fill(self, name: str, dst: torch.Tensor, rects: Iterable[Piece]) -> None:
        """Write the rectangles ``rects`` of tensor ``name`` into ``dst`` (flat local storage: each
        rectangle row-major at its offset), reading only the overlap of each saved piece."""
        pieces = self.index["tensors"][name]["pieces"]
        for t in rects:
            if not t.numel:
                continue
            block = dst[t.offset : t.offset + t.numel].view(t.r1 - t.r0, t.c1 - t.c0)
            covered = 0
            for p in pieces:
                (r0, r1), (c0, c1) = p["rows"], p["cols"]
                a, b, c, d = max(r0, t.r0), min(r1, t.r1), max(c0, t.c0), min(c1, t.c1)
                if a >= b or c >= d:
                    continue
                src = self._open(p["file"]).get_slice(p["key"])[a - r0 : b - r0, c - c0 : d - c0]
                block[a - t.r0 : b - t.r0, c - t.c0 : d - t.c0].copy_(src)
                covered += (b - a) * (d - c)
            if covered != t.numel:
                raise CheckpointError(f"{self.path}: {name} rows {t.r0}:{t.r1} cols {t.c0}:{t.c1}: only {covered} of "
                                      f"{t.numel} elements saved")

    def full(self, name: str) -> torch.Tensor:
        """The whole tensor ``name`` (one process: tools, tests, consolidation)."""
        t = self.index["tensors"][name]
        if not t["pieces"] or "rows" not in t["pieces"][0]:
            return self.scalar(name)
        m, n = matrix_view(t["shape"])
        out = torch.empty(m * n, dtype=getattr(torch, t["dtype"]))
        self.fill(name, out, [Piece(0, m, 0, n, 0)])
        return out.view(t["shape"])


def read_portable(path: str | os.PathLike) -> dict:
    """The whole checkpoint in one process: {"optimizer", "groups", "weights": {name: tensor},
    "state": {name: {key: tensor}}, "index"}. For inspection, tests and consolidation."""
    r = Reader(path)
    out = {"optimizer": r.index["optimizer"], "groups": r.index["groups"], "weights": {}, "state": {}, "index": r.index}
    for name, w in r.index["weights"].items():
        if r.has(f"weight/{name}"):
            out["weights"][name] = r.full(f"weight/{name}")
        out["state"][name] = {k: r.full(f"state/{name}/{k}") for k in w["state"]}
    r.close()
    return out


def consolidate(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Rewrite a portable checkpoint as one piece per tensor in one file (one process; needs the
    whole checkpoint in memory). Loads like the original."""
    r = Reader(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    file = rank_file(0)
    data, tensors = {}, {}
    for name, t in r.index["tensors"].items():
        value = r.full(name)
        data[name] = value.reshape(matrix_view(t["shape"])) if t["shape"] else value.reshape(())
        piece = {"key": name, "file": file}
        if t["shape"]:
            m, n = matrix_view(t["shape"])
            piece |= {"rows": [0, m], "cols": [0, n]}
        tensors[name] = {"shape": t["shape"], "dtype": t["dtype"], "pieces": [piece]}
    index = dict(r.index, tensors=tensors)
    if "group_file" in r.index:
        for g in r.index["groups"]:
            for v in g.values():
                if isinstance(v, dict) and "__tensor__" in v:
                    data[v["__tensor__"]] = r.group_tensor(v["__tensor__"])
        index["group_file"] = file
    r.close()
    write_rank_file(dst, file, data)
    write_index(dst, index)
    return dst


# ====================================================================================== loading
def load_portable(model, optimizer, path: str | os.PathLike, *, strict: bool = True,
                  optimizer_state: bool = True) -> dict:
    """Load a portable checkpoint into ``optimizer`` and the weights it steps, whatever the backend,
    world size or stage it was saved from; every rank calls it. Hyper-parameters and counters are
    restored like ``torch.optim.Optimizer.load_state_dict`` does (the saved values win), except facts of
    this run (which process group replicates the weights) and the matrix / fallback split, which must
    agree. ``strict``: every weight of the checkpoint must be one of the optimizer's and vice versa;
    ``optimizer_state=False`` loads the weights only. Returns {"missing", "unexpected", "saved"} (names,
    and how the checkpoint was saved)."""
    module, opt = _resolve(model, optimizer)
    r = Reader(path)
    idx = r.index
    from .registry import spec_of

    spec = spec_of(opt)
    mine = spec.name if spec else type(opt).__name__
    if idx["optimizer"] != mine:
        raise CheckpointError(f"{r.path} holds a {idx['optimizer']!r} optimizer; this one is {mine!r}")
    held = _described(module, opt)
    for h in held:
        for s, n in zip(h.shards, h.names):
            if n in idx["weights"] and tuple(idx["weights"][n]["shape"]) != tuple(s.shape):
                raise CheckpointError(f"{r.path}: {n} has shape {tuple(idx['weights'][n]['shape'])} in the "
                                      f"checkpoint, {tuple(s.shape)} here")
    names = {n for h in held for n in h.names}
    missing = sorted(names - set(idx["weights"]))
    unexpected = sorted(set(idx["weights"]) - names)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{r.path}: weights of this optimizer not in the checkpoint: {missing[:8]}; "
                              f"in the checkpoint but not stepped by this optimizer: {unexpected[:8]} "
                              "(strict=False loads the weights both have)")
    if optimizer_state:
        _load_groups(opt, held, r)
    with torch.no_grad():
        for h in held:
            _load_weights(h, r)
            if optimizer_state:
                _load_state(opt, h, r)
    for layout in opt.layouts:
        hook = getattr(layout, "weights_loaded", None)
        if hook is not None:
            hook()
    r.close()
    return {"missing": missing, "unexpected": unexpected, "saved": idx["saved"]}


def _load_groups(opt, held: list[_Held], r: Reader) -> None:
    """Each param group takes the hyper-parameters of the saved groups of its weights (which must agree)."""
    saved = r.index["groups"]
    for gi, group in enumerate(opt.param_groups):
        names = [n for h in held if h.group == gi for n in h.names if n in r.index["weights"]]
        sources = sorted({r.index["weights"][n]["group"] for n in names})
        if not sources:
            continue
        for h in (h for h in held if h.group == gi):
            for n, s in zip(h.names, h.shards):
                if n not in r.index["weights"]:
                    continue
                saved_rule, live_rule = r.index["weights"][n]["rule"], opt.weight_rule(group, tuple(s.shape))
                if saved_rule != live_rule:
                    raise CheckpointError(
                        f"{n}: saved stepped by the {saved_rule!r} rule, here by {live_rule!r} (param group {gi}): "
                        "build the optimizer with the same matrix / fallback split (e.g. stateless_opt.param_groups(model))"
                    )
        values: dict[str, Any] = {}
        for sg in sources:
            for k, v in saved[sg].items():
                if k in NOT_LOADED:
                    continue
                if k in values and values[k] != v:
                    raise CheckpointError(
                        f"param group {gi} holds weights saved with different {k!r} ({values[k]!r} vs {v!r}; "
                        f"weights {names[:6]}): split the param groups as the saved run did"
                    )
                values[k] = v
        for k, v in values.items():
            if isinstance(v, dict) and "__tensor__" in v:
                v = r.group_tensor(v["__tensor__"])
                if torch.is_tensor(group.get(k)):
                    group[k].copy_(v)
                    continue
            elif isinstance(v, list) and isinstance(group.get(k), tuple):
                v = tuple(v)
            group[k] = v


def _rects(s: WeightShard) -> tuple[Piece, ...]:
    return s.local.pieces(*matrix_view(s.shape))


def _load_weights(h: _Held, r: Reader) -> None:
    data = local_views(h.tensor)[0].reshape(-1)
    for s, name in zip(h.shards, h.names):
        if r.has(f"weight/{name}"):
            buf = data[s.offset : s.offset + s.param.numel()]
            tmp = torch.empty_like(buf, dtype=getattr(torch, r.index["tensors"][f"weight/{name}"]["dtype"]))
            r.fill(f"weight/{name}", tmp, _rects(s))
            buf.copy_(tmp)


def _load_state(opt, h: _Held, r: Reader) -> None:
    """The tensor's state as the optimizer allocates it (its zero-filled template), filled from the
    checkpoint; a tensor whose weights had no state when saved gets none."""
    opt.state.pop(h.tensor, None)
    saved = [r.index["weights"].get(n, {}).get("state") for n in h.names]
    present = [n for n, st in zip(h.names, saved) if st]
    if not present:
        return
    if len(present) != len([s for s in saved if s is not None]):
        raise CheckpointError(f"weights {h.names[:6]} share one stepped tensor, but only {present[:6]} had state "
                              "when saved")
    with _grads_present([h.tensor]):
        opt._ensure_state(opt.param_groups[h.group], [h.tensor], [h.shards])
    state = opt.state.get(h.tensor, {})
    kinds = {k: state_kind(opt, k, v, h.tensor) for k, v in state.items()}
    for name, st in zip(h.names, saved):
        if st is None:
            continue
        if set(st) != set(kinds) or any(st[k] != kinds[k] for k in st):
            raise CheckpointError(f"{name}: saved state {st} but this optimizer keeps {kinds} for it "
                                  "(another optimizer variant, e.g. fallback='adamw' vs 'stateless'?)")
    for k, kind in kinds.items():
        value = state[k]
        if kind == ELEMENTWISE:
            flat = local_views(value)[0].reshape(-1)
            for s, name in zip(h.shards, h.names):
                if name in r.index["weights"]:
                    buf = flat[s.offset : s.offset + s.param.numel()]
                    tmp = torch.empty_like(buf, device="cpu")
                    r.fill(f"state/{name}/{k}", tmp, _rects(s))
                    buf.copy_(tmp)
        elif kind == PER_WEIGHT:
            for s, name in zip(h.shards, h.names):
                value[s.unit_index] = r.scalar(f"state/{name}/{k}")
        else:
            values = {float(r.scalar(f"state/{n}/{k}")) for n in h.names if n in r.index["weights"]}
            if len(values) > 1:
                raise CheckpointError(f"state {k!r} of weights {h.names[:6]} (one stepped tensor here) was saved with "
                                      f"different values {sorted(values)}: this layout cannot hold them")
            scalar = r.scalar(f"state/{h.names[0]}/{k}")
            if torch.is_tensor(value):
                value.copy_(scalar)
            else:
                state[k] = type(value)(scalar.item())
