"""Per-rank memory accounting: what this rank holds, measured, next to what AdamW would hold.

Components per rank (bytes): parameters, gradients, fp32 master weights, optimizer state (split into
matrix-rule and fallback), and the rest (activations, buffers, allocator slack) = measured peak minus
the known components. The AdamW prediction swaps our optimizer state for AdamW's, computed by the
formula below for the same backend, ZeRO stage, world size and dtypes; everything else is equal.

Bytes per parameter of optimizer state (N = world size over which state is sharded):
  AdamW                      8 / N      (two fp32 moments; 2 x param bytes if params are not fp32)
  SWAN / SinkGD, matrix      0
  fallback AdamW             8 / N      of the fallback's parameters
  fallback stateless         0
  SGD-SaI                    momentum (param bytes, fp32 under a master) / N + 4 bytes per tensor
N is 1 for single/DDP, the shard size for FSDP2/HSDP, the data-parallel size for ZeRO-1/2/3.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
import torch
import torch.distributed as dist

GiB = 2**30


@dataclass
class RankMemory:
    rank: int
    backend: str
    world: int
    optimizer: str
    params: int = 0
    grads: int = 0
    master: int = 0
    state_matrix: int = 0
    state_fallback: int = 0
    state_other: int = 0
    peak_allocated: int = 0
    peak_reserved: int = 0
    rss: int = 0
    peak_rss: int = 0
    device: str = "cpu"
    numel: int = 0
    predicted_state: int = 0
    adamw_state: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> int:
        return self.state_matrix + self.state_fallback + self.state_other

    @property
    def peak(self) -> int:
        return self.peak_allocated if self.device != "cpu" else self.peak_rss

    @property
    def rest(self) -> int:
        return max(0, self.peak - self.params - self.grads - self.master - self.state)

    @property
    def adamw_peak(self) -> int:
        return self.peak - self.state + self.adamw_state

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(state=self.state, peak=self.peak, rest=self.rest, adamw_peak=self.adamw_peak,
                 saving_bytes=self.adamw_peak - self.peak,
                 saving_pct=100.0 * (self.adamw_peak - self.peak) / self.adamw_peak if self.adamw_peak else 0.0)
        return d


def _local(t: torch.Tensor) -> torch.Tensor:
    try:
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.to_local()
    except ImportError:  # pragma: no cover
        pass
    return t


def _nbytes(t: torch.Tensor | None) -> int:
    if t is None or not torch.is_tensor(t):
        return 0
    t = _local(t)
    return t.numel() * t.element_size()


def _state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(matrix-rule, fallback, other) bytes of tensors in ``optimizer.state``, by the owning group's rule."""
    rule_of = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            rule_of[id(p)] = g.get("rule", "other")
    out = {"matrix": 0, "fallback": 0, "other": 0}
    for p, st in optimizer.state.items():
        rule = rule_of.get(id(p), "other")
        out[rule if rule in out else "other"] += sum(_nbytes(v) for v in st.values())
    return out["matrix"], out["fallback"], out["other"]


def _shard_size(p: torch.Tensor) -> int:
    mesh, placements = getattr(p, "device_mesh", None), getattr(p, "placements", ())
    if mesh is None:
        return 1
    return math.prod(mesh.size(i) for i, pl in enumerate(placements) if pl.is_shard())


def _measure_process(rec: RankMemory, device: torch.device) -> None:
    if device.type == "cuda":
        rec.peak_allocated = torch.cuda.max_memory_allocated(device)
        rec.peak_reserved = torch.cuda.max_memory_reserved(device)
        rec.device = torch.cuda.get_device_name(device)
    rec.rss = psutil.Process().memory_info().rss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rec.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _predict_state(optimizer, numel_by_rule: dict[str, int], shard: int, param_bytes: int, tensors: int) -> tuple[int, int]:
    """(our predicted state bytes, AdamW's) per rank from the formula in the module docstring."""
    total = sum(numel_by_rule.values())
    moment = 4 if param_bytes <= 4 else param_bytes
    adamw = int(2 * moment * total / shard)
    name = type(optimizer).__name__
    if name in ("SWAN", "SinkGD"):
        fb = optimizer.param_groups[0].get("fallback", "adamw") if optimizer.param_groups else "adamw"
        ours = int(2 * moment * numel_by_rule.get("fallback", 0) / shard) if fb == "adamw" else 0
    elif name == "SGDSaI":
        ours = int(moment * total / shard) + 4 * tensors
    elif name == "AdamW" or name == "Adam":
        ours = adamw
    else:
        ours = 0
    return ours, adamw


def memory_report(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    backend: str = "auto",
    world: int | None = None,
    shard_world: int | None = None,
    master_bytes: int = 0,
    print_table: bool = True,
    json_path: str | None = None,
) -> dict[str, Any]:
    """Measure this rank, gather every rank to rank 0, print a table there, return
    ``{"ranks": [...], "summary": {...}}`` (on every rank) and write JSON if ``json_path``.

    ``shard_world`` is the number of ranks the optimizer state is sharded over (1 for single/DDP; the
    FSDP2 shard size; the ZeRO data-parallel size) — detected from DTensor params if not given.
    ``master_bytes``: fp32 master weights this rank holds outside the model (ZeRO's partitions).
    """
    initialized = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if initialized else 0
    world = world or (dist.get_world_size() if initialized else 1)
    params = [p for p in model.parameters()]
    device = next((p.device for p in params), torch.device("cpu"))
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the client optimizer
    if shard_world is None:  # FSDP2: the largest shard-dim size of any DTensor parameter
        shard_world = max((_shard_size(p) for p in params), default=1)
    if backend == "auto":
        backend = "fsdp2" if shard_world > 1 and any(hasattr(p, "device_mesh") for p in params) else (
            "ddp" if world > 1 else "single")
    rec = RankMemory(rank=rank, backend=backend, world=world, optimizer=type(inner).__name__)
    rec.params = sum(_nbytes(p) for p in params)
    rec.grads = sum(_nbytes(p.grad) for p in params)
    rec.master = master_bytes
    rec.state_matrix, rec.state_fallback, rec.state_other = _state_bytes(inner)
    rec.numel = sum(p.numel() for p in params)
    _measure_process(rec, device)
    numel_by_rule: dict[str, int] = {}
    shapes_by_rule = getattr(inner, "rule_counts", None)
    if callable(shapes_by_rule):
        for rule, c in shapes_by_rule().items():
            numel_by_rule[rule] = c["params"]
        tensors = sum(c["tensors"] for c in shapes_by_rule().values())
    else:
        numel_by_rule = {"all": rec.numel}
        tensors = len(params)
    param_bytes = max((_local(p).element_size() for p in params), default=4)
    if master_bytes:
        param_bytes = 4
    rec.predicted_state, rec.adamw_state = _predict_state(inner, numel_by_rule, shard_world, param_bytes, tensors)
    rows = [rec.as_dict()]
    if initialized and world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows[0])
        rows = gathered
    summary = {
        "max_peak_gib": max(r["peak"] for r in rows) / GiB,
        "max_adamw_peak_gib": max(r["adamw_peak"] for r in rows) / GiB,
        "saving_gib": (max(r["adamw_peak"] for r in rows) - max(r["peak"] for r in rows)) / GiB,
    }
    report = {"ranks": rows, "summary": summary}
    if rank == 0:
        if print_table:
            print(format_table(rows))
        if json_path:
            with open(json_path, "w") as f:
                json.dump(report, f, indent=2)
    return report


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = ["rank", "params", "grads", "master", "state_matrix", "state_fallback", "state_other",
            "predicted_state", "rest", "peak", "adamw_state", "adamw_peak", "saving_pct"]
    head = f"memory per rank (GiB) — {rows[0]['optimizer']} on {rows[0]['backend']} x{rows[0]['world']}, device {rows[0]['device']}"
    lines = [head, " ".join(f"{c:>15}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:>15}" if c == "rank" else f"{v:>14.2f}%" if c == "saving_pct" else f"{v / GiB:>15.4f}")
        lines.append(" ".join(cells))
    return "\n".join(lines)
