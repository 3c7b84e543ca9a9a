"""Checkpoints that resume a run bit-identically (same backend and world size).

Layout of one checkpoint, ``<checkpoint dir>/step_00000050/``::

    meta.json      written last, by rank 0, after every rank finished: its presence marks the
                   checkpoint complete (step, world size, backend, optimizer, resolved config)
    state.pt       rank 0: step, LR scheduler; single/DDP also the model and optimizer (identical
                   on every rank there)
    rank00000.pt   every rank: its RNG states; FSDP2 also this rank's model and optimizer shards
                   (DTensors stored as their local tensors, re-wrapped on load)

DeepSpeed: the engine's own ``save_checkpoint`` / ``load_checkpoint`` write ``<tag>/`` beside ours.
The files are pickles (RNG states include Python objects): load only checkpoints you wrote.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

PREFIX = "step_"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if (p / "meta.json").exists())


def resolve(resume: str, root: Path) -> Path:
    """'latest' -> newest complete checkpoint under ``root``; else the given path."""
    if resume == "latest":
        found = complete_checkpoints(root)
        if not found:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {root}")
        return found[-1]
    path = Path(resume)
    if not (path / "meta.json").exists():
        found = complete_checkpoints(path)  # a checkpoint *directory* was given: take its newest
        if not found:
            raise FileNotFoundError(f"checkpoint.resume={resume!r}: no meta.json there (incomplete or not a checkpoint)")
        path = found[-1]
    return path


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- DTensor <-> local
def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.to_local() if _is_dtensor(v) else v).detach().clone() for k, v in model.state_dict().items()}


def load_local_model_state(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    missing = set(current) ^ set(saved)
    if missing:
        raise KeyError(f"checkpoint and model disagree on keys: {sorted(missing)[:8]}")
    with torch.no_grad():
        for k, v in current.items():
            dst = v.to_local() if _is_dtensor(v) else v
            if dst.shape != saved[k].shape:
                raise ValueError(f"{k}: checkpoint shard {tuple(saved[k].shape)} != this rank's {tuple(dst.shape)}")
            dst.copy_(saved[k])


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, list[tuple[int, str]]]:
    """``optimizer.state_dict()`` with DTensors replaced by local tensors, and where they were."""
    sd = optimizer.state_dict()
    was_dtensor = []
    state = {}
    for idx, st in sd["state"].items():
        state[idx] = {}
        for k, v in st.items():
            if _is_dtensor(v):
                was_dtensor.append((idx, k))
                v = v.to_local()
            state[idx][k] = v.clone() if torch.is_tensor(v) else v
    return {"state": state, "param_groups": sd["param_groups"]}, was_dtensor


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict, was_dtensor: list) -> None:
    from torch.distributed.tensor import DTensor

    optimizer.load_state_dict(sd)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, key in was_dtensor:
        p = params[idx]
        local = optimizer.state[p][key]
        optimizer.state[p][key] = DTensor.from_local(
            local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
        )


# --------------------------------------------------------------------------- save / load
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(
    root: Path, step: int, *, model, optimizer, scheduler, backend: str, rank: int, world: int,
    meta_extra: dict, keep: int, engine=None,
) -> Path:
    out = step_dir(root, step)
    if rank == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    _barrier()
    per_rank: dict[str, Any] = {"rng": rng_state()}
    if backend == "deepspeed":
        engine.save_checkpoint(str(root), tag=out.name, client_state={"step": step})
    elif backend == "fsdp2":
        per_rank["model"] = local_model_state(model)
        per_rank["optimizer"], per_rank["optimizer_dtensors"] = local_optimizer_state(optimizer)
    torch.save(per_rank, out / f"rank{rank:05d}.pt")
    if rank == 0:
        shared: dict[str, Any] = {"step": step, "scheduler": scheduler.state_dict() if scheduler is not None else None}
        if backend in ("single", "ddp"):
            inner = getattr(model, "module", model)
            shared["model"] = inner.state_dict()
            shared["optimizer"] = optimizer.state_dict()
        torch.save(shared, out / "state.pt")
    _barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world, "backend": backend, **meta_extra}
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return out


def load(
    path: Path, *, model, optimizer, scheduler, backend: str, rank: int, world: int, engine=None
) -> int:
    """Restore everything; returns the step to continue from."""
    meta = json.loads((Path(path) / "meta.json").read_text())
    if meta["backend"] != backend or meta["world_size"] != world:
        raise ValueError(
            f"checkpoint {path} was written by backend={meta['backend']} with {meta['world_size']} ranks; "
            f"this run is backend={backend} with {world}: resume with the same backend and world size"
        )
    shared = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    per_rank = torch.load(Path(path) / f"rank{rank:05d}.pt", map_location="cpu", weights_only=False)
    if backend == "deepspeed":
        engine.load_checkpoint(str(Path(path).parent), tag=Path(path).name)
    elif backend == "fsdp2":
        load_local_model_state(model, per_rank["model"])
        load_local_optimizer_state(optimizer, per_rank["optimizer"], per_rank["optimizer_dtensors"])
    else:
        getattr(model, "module", model).load_state_dict(shared["model"])
        optimizer.load_state_dict(shared["optimizer"])
    if scheduler is not None and shared["scheduler"] is not None and backend != "deepspeed":
        scheduler.load_state_dict(shared["scheduler"])
    set_rng_state(per_rank["rng"])
    return int(shared["step"])
