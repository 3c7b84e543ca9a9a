"""Checkpoints of launch/train.py: written atomically, found again after any crash, loaded without
running code, resumable at another backend, world size, ZeRO stage or tp.

One checkpoint is a folder ``<checkpoint dir>/step_00000050/``::

    meta.json      formats, step, layout (backend, world size, ZeRO stage, tp), optimizer, training
                   time so far, resolved config
    state.pt       rank 0: step and LR scheduler (+ DeepSpeed's step counters); native single/DDP also
                   the model and optimizer (identical on every rank there)
    rank00000.pt   every rank: its RNG states; native FSDP2 also this rank's model and optimizer shards
                   (DTensors stored as their local tensors, re-wrapped on load)
    deepspeed/     native DeepSpeed: the engine's own ``save_checkpoint`` (model, ZeRO partitions, scheduler)
    portable/      portable: ``stateless_opt.checkpoint.save_portable`` (safetensors + JSON): the optimizer
                   state and the weights it steps (fp32 masters under ZeRO), by parameter name

**Formats** (``checkpoint.format``; ``FORMATS``): ``native`` is each rank's own shards, so it resumes
at the same backend, world size, ZeRO stage and tp only; ``portable`` resumes at any (each rank reads the
rectangles it holds). ``both`` writes the two; a resume takes the first of a checkpoint's formats whose
``can_load`` accepts this run's layout (native where it can: the engine's own, exact, usable by
DeepSpeed's tools). The step, LR scheduler and RNG (the data order is a function of the step) are
written the same way for every format; a rank the saving run did not have takes rank 0's RNG states.

**Writing** (``save``), correct on every rank's view of a shared filesystem: rank 0 makes a fresh
``.step_00000050.partial`` folder (removing a killed attempt's leftover); every rank writes its files
into it (every format's) and fsyncs them; after a barrier rank 0 writes ``meta.json`` and renames the
folder to ``step_00000050`` (an atomic rename of a folder whose files are all on disk), then every rank
checks that it sees its own file under the final name (a node-local ``checkpoint.dir`` fails here, at
the first checkpoint, not at the resume). A ``step_*`` folder is therefore complete by construction: a
kill at any point leaves either the previous checkpoints alone or one more complete one. Retention
deletes the oldest complete checkpoints beyond ``keep``, never one newer than the checkpoint just written.

**Reading** (``load``): every ``.pt`` file goes through ``torch.load(..., weights_only=True)`` (tensors,
numbers, strings and containers only; DeepSpeed's loads too, through its checkpoint engine, with three
of its plain data classes allow-listed), the portable files are safetensors and JSON, so a checkpoint
from someone else cannot run code; one that carries any other pickled object is refused with an error
naming the file. ``meta.json`` is JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from .config import UserError

PREFIX = "step_"
PARTIAL = ".partial"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed here (missing, incomplete, unsafe, or another layout)."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (a ``step_*`` folder exists only once complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / "meta.json").is_file())


def read_meta(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a complete checkpoint (meta.json: {err})") from None


def resolve(resume: str, root: Path) -> Path | None:
    """The checkpoint ``checkpoint.resume`` asks for: ``auto`` the newest complete one under ``root`` or
    None; ``latest`` the newest (an error if there is none); ``never`` None; else a checkpoint folder
    (or a folder of checkpoints: its newest)."""
    if resume == "never":
        return None
    if resume in ("auto", "latest"):
        found = complete_checkpoints(root)
        if not found and resume == "latest":
            raise CheckpointError(f"--resume latest: no complete checkpoint under {root} (--resume auto starts "
                                  "fresh when there is none)")
        return found[-1] if found else None
    path = Path(resume)
    if (path / "meta.json").is_file():
        return path
    found = complete_checkpoints(path)  # a checkpoint *directory* was given: take its newest
    if not found:
        raise CheckpointError(f"checkpoint.resume={resume!r}: no complete checkpoint there (no meta.json)")
    return found[-1]


# --------------------------------------------------------------------------- safe files
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync(path)


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's plain data classes inside its checkpoints (loss scaler state, ZeRO stage enum, the
    bf16 optimizer's fragment addresses): no code runs when they are rebuilt."""
    out = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            out.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return out


def safe_load(path: Path, extra_globals: list | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file carrying any other object is refused."""
    try:
        with torch.serialization.safe_globals(extra_globals or []):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (checkpoint.dir must be on a filesystem every rank shares)") from None
    except Exception as err:  # the unpickler's refusal (pickle.UnpicklingError and friends)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), first)
        raise CheckpointError(
            f"{path}: refused, it holds more than tensors, numbers and strings ({detail}); loading it could run "
            "code. Only resume checkpoints you trust, written by this version of launch/."
        ) from None


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, as tensors and numbers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
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
        raise CheckpointError(f"checkpoint and model disagree on keys: {sorted(missing)[:8]}")
    with torch.no_grad():
        for k, v in current.items():
            dst = v.to_local() if _is_dtensor(v) else v
            if dst.shape != saved[k].shape:
                raise CheckpointError(f"{k}: checkpoint shard {tuple(saved[k].shape)} != this rank's {tuple(dst.shape)}")
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


# --------------------------------------------------------------------------- what a run hands over
@dataclass
class Parts:
    """What a checkpoint saves and restores: the (wrapped) model, its optimizer and LR scheduler, the
    DeepSpeed engine if any, and where this rank sits."""

    model: Any
    optimizer: Any
    scheduler: Any
    backend: str
    rank: int
    world: int
    engine: Any = None
    tp: int = 1  # tensor-parallel degree (backend fsdp2): each rank's shards depend on it


def layout_of(parts: Parts) -> dict[str, Any]:
    """Where a run's state lives: backend, world size, ZeRO stage (None without DeepSpeed) and tp."""
    stage = parts.engine.zero_optimization_stage() if parts.engine is not None else None
    return {"backend": parts.backend, "world_size": parts.world, "zero_stage": stage, "tp": parts.tp}


_LAYOUT = (("backend", "backend"), ("world_size", "ranks"), ("zero_stage", "ZeRO stage"), ("tp", "tp"))


def layout_changes(meta: dict, layout: dict) -> list[str]:
    """What differs between the layout a checkpoint was written at and ``layout``: ``"ranks 2 -> 1"``."""
    out = []
    for key, label in _LAYOUT:
        # a checkpoint of before zero_stage / tp were recorded: no DeepSpeed stage to compare, tp 1
        saved = meta.get(key, 1 if key == "tp" else layout[key])
        if saved != layout[key]:
            out.append(f"{label} {'none' if saved is None else saved} -> {'none' if layout[key] is None else layout[key]}")
    return out


# --------------------------------------------------------------------------- the common part
# Every checkpoint, whatever its formats, holds what the launch needs beyond the model and optimizer:
# state.pt (rank 0) the step and the LR scheduler; rank*.pt (every rank) its RNG states. A format adds
# its own entries to these two files and/or writes its own files beside them.
def _save_common(out: Path, step: int, parts: Parts, formats: tuple[str, ...]) -> None:
    shared: dict[str, Any] = {"step": step, "scheduler": parts.scheduler.state_dict()}
    per_rank: dict[str, Any] = {"rng": rng_state()}
    for name in formats:
        FORMATS[name].save(out, parts, shared, per_rank)
    _save(per_rank, out / f"rank{parts.rank:05d}.pt")
    if parts.rank == 0:
        _save(shared, out / "state.pt")


def _read_common(path: Path, meta: dict, parts: Parts) -> dict[str, Any]:
    """state.pt and this rank's rank*.pt (a rank the saving run did not have: rank 0's RNG, which every
    rank starts from, seeded alike)."""
    rank = parts.rank if parts.rank < int(meta["world_size"]) else 0
    return {"shared": safe_load(path / "state.pt"), "rank": safe_load(path / f"rank{rank:05d}.pt")}


# --------------------------------------------------------------------------- the native format
def _save_native(out: Path, parts: Parts, shared: dict, per_rank: dict) -> None:
    if parts.backend == "deepspeed":
        parts.engine.save_checkpoint(str(out), tag="deepspeed", save_latest=False)
    elif parts.backend == "fsdp2":
        per_rank["model"] = local_model_state(parts.model)
        per_rank["optimizer"], per_rank["optimizer_dtensors"] = local_optimizer_state(parts.optimizer)
    elif parts.rank == 0:
        shared["model"] = getattr(parts.model, "module", parts.model).state_dict()
        shared["optimizer"] = parts.optimizer.state_dict()


def _read_native(path: Path, meta: dict, parts: Parts) -> None:
    """Nothing beyond the common files (DeepSpeed's engine reads its own, through ``safe_load``)."""


def _apply_native(staged: "Staged", parts: Parts, *, optimizer_state: bool, scheduler_state: bool) -> bool:
    shared, per_rank = staged.files["shared"], staged.files["rank"]
    if parts.backend == "deepspeed":
        _deepspeed_load(parts.engine, staged.path, optimizer_state=optimizer_state, scheduler_state=scheduler_state)
        return True  # DeepSpeed's checkpoint restores the scheduler the engine steps
    if parts.backend == "fsdp2":
        load_local_model_state(parts.model, per_rank["model"])
        if optimizer_state:
            load_local_optimizer_state(parts.optimizer, per_rank["optimizer"], per_rank["optimizer_dtensors"])
    else:
        getattr(parts.model, "module", parts.model).load_state_dict(shared["model"])
        if optimizer_state:
            parts.optimizer.load_state_dict(shared["optimizer"])
    return False


def _native_loads(meta: dict, layout: dict) -> bool:
    return not layout_changes(meta, layout)


def _deepspeed_load(engine, path: Path, *, optimizer_state: bool, scheduler_state: bool) -> None:
    """``engine.load_checkpoint`` with every file read through ``safe_load`` (DeepSpeed's own engine
    loads with ``weights_only=False``)."""
    extra = _deepspeed_safe_globals()
    ckpt_engine = engine.checkpoint_engine
    original = ckpt_engine.load
    ckpt_engine.load = lambda p, map_location=None: safe_load(Path(p), extra)
    try:
        loaded, _ = engine.load_checkpoint(str(path), tag="deepspeed", load_optimizer_states=optimizer_state,
                                           load_lr_scheduler_states=scheduler_state)
    finally:
        ckpt_engine.load = original
    if loaded is None:
        raise CheckpointError(f"{path}/deepspeed: DeepSpeed found no checkpoint to load")


# --------------------------------------------------------------------------- the portable format
PORTABLE = "portable"  # the folder stateless_opt.checkpoint writes into


def _module(parts: Parts):
    return parts.engine if parts.engine is not None else parts.model


def _save_portable(out: Path, parts: Parts, shared: dict, per_rank: dict) -> None:
    """``stateless_opt.checkpoint.save_portable``: the optimizer's state and the weights it steps (the fp32
    masters under ZeRO, which a resume must continue from), by parameter name; its files fsynced like ours."""
    from stateless_opt import checkpoint as portable

    try:
        folder = portable.save_portable(_module(parts), parts.optimizer, out / PORTABLE)
    except portable.CheckpointError as err:
        raise CheckpointError(f"checkpoint.format portable: {err}") from None
    box = [_outside(parts, set(json.loads((folder / portable.INDEX).read_text())["weights"]))
           if parts.rank == 0 else None]
    if dist.is_initialized() and parts.world > 1:
        dist.broadcast_object_list(box, src=0)  # rank 0's verdict: every rank raises, or none
    outside = box[0]
    if outside:
        raise CheckpointError(f"checkpoint.format portable holds the weights the optimizer steps; this model also has "
                              f"{outside[:6]} (buffers or frozen weights), which a resume would lose: use "
                              "--checkpoint.format=native")
    if (folder / portable.rank_file(parts.rank)).exists():
        _fsync(folder / portable.rank_file(parts.rank))
    if parts.rank == 0:
        _fsync(folder / portable.INDEX)
        _fsync_dir(folder)
    if parts.engine is not None:  # the engine's counters (its native checkpoint carries them)
        shared["engine"] = {"global_steps": parts.engine.global_steps, "global_samples": parts.engine.global_samples,
                            "skipped_steps": parts.engine.skipped_steps}


def _outside(parts: Parts, saved: set[str]) -> list[str]:
    """Entries of the model's ``state_dict`` the portable checkpoint does not hold (tied weights count
    under any of their names)."""
    module = parts.engine.module if parts.engine is not None else getattr(parts.model, "module", parts.model)
    every = dict(module.named_parameters(remove_duplicate=False))
    first = {id(p): n for n, p in module.named_parameters()}
    return [k for k in module.state_dict() if k not in every or first[id(every[k])] not in saved]


def _read_portable(path: Path, meta: dict, parts: Parts) -> None:
    """The index (JSON) is read and checked here; the tensors are read by ``load_portable``, each rank
    only the rectangles it holds (safetensors: no code runs)."""
    from stateless_opt import checkpoint as portable

    try:
        portable.Reader(path / PORTABLE).close()
    except (portable.CheckpointError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _apply_portable(staged: "Staged", parts: Parts, *, optimizer_state: bool, scheduler_state: bool) -> bool:
    from stateless_opt import checkpoint as portable

    try:
        portable.load_portable(_module(parts), parts.optimizer, staged.path / PORTABLE,
                               optimizer_state=optimizer_state)
    except portable.CheckpointError as err:
        raise CheckpointError(str(err)) from None
    if parts.engine is not None:
        step = int(staged.files["shared"]["step"])
        counters = staged.files["shared"].get("engine") or {}
        parts.engine.global_steps = counters.get("global_steps", step)
        parts.engine.global_samples = counters.get("global_samples", step * parts.engine.train_batch_size())
        parts.engine.skipped_steps = counters.get("skipped_steps", 0)
    return False


@dataclass(frozen=True)
class Format:
    """How a checkpoint's model and optimizer state is laid out. ``save`` writes this rank's part (its own
    files in the folder, or entries of the common ``state.pt`` / ``rank*.pt`` dicts); ``read`` checks what
    this rank will load (every rank reads before any applies, so a refused or missing file stops all
    ranks together); ``apply`` restores it (True: it restored the LR scheduler too); ``can_load`` says
    whether a run at ``layout`` (``layout_of``) can resume it; ``what`` is its one-line description."""

    save: Callable[[Path, Parts, dict, dict], None]
    read: Callable[[Path, dict, Parts], None]
    apply: Callable[..., bool]
    can_load: Callable[[dict, dict], bool]
    what: str


def _same_layout(meta: dict, parts: Parts) -> bool:
    return (meta["backend"], meta["world_size"], meta.get("tp", 1)) == (parts.backend, parts.world, parts.tp)


FORMATS: dict[str, Format] = {
    "native": Format(_save_native, _read_native, _apply_native, _native_loads,
                     "each rank's own shards: the same backend, world size, ZeRO stage and tp"),
    "portable": Format(_save_portable, _read_portable, _apply_portable, lambda meta, layout: True,
                       "by parameter name: any backend, world size, ZeRO stage and tp"),
}


def formats_of(meta: dict) -> list[str]:
    """The formats a checkpoint was written in, the preferred first."""
    return list(meta.get("formats") or [meta.get("format", "native")])


def choose(meta: dict, layout: dict) -> str | None:
    """The first of the checkpoint's formats a run at ``layout`` can load (None: none can)."""
    return next((f for f in formats_of(meta) if f in FORMATS and FORMATS[f].can_load(meta, layout)), None)


@dataclass
class Staged:
    """A checkpoint read by this rank, not yet applied."""

    path: Path
    meta: dict
    format: str
    files: dict


# --------------------------------------------------------------------------- save / load
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        _fsync(path)
    except OSError:  # some filesystems do not fsync folders; the rename is still atomic
        pass


def save(root: Path, step: int, parts: Parts, meta_extra: dict, *, keep: int,
         formats: tuple[str, ...] = ("native",)) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically (see the module docstring) in ``formats``
    (``FORMATS`` names, the preferred first); every rank calls."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise CheckpointError(f"checkpoint formats {list(formats)}: known are {', '.join(FORMATS)}")
    root = Path(root)
    final, partial = step_dir(root, step), root / f".{PREFIX}{step:08d}{PARTIAL}"
    if parts.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a killed attempt's leftover
        partial.mkdir()
    _barrier()
    _save_common(partial, step, parts, tuple(formats))
    _barrier()
    if parts.rank == 0:
        meta = {"format": formats[0], "formats": list(formats), "version": VERSION, "step": step, **layout_of(parts),
                **meta_extra}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync(partial / "meta.json")
        _fsync_dir(partial)
        if final.exists():  # written meanwhile by another run: a complete checkpoint is never overwritten
            shutil.rmtree(partial, ignore_errors=True)
            print(f"[checkpoint] {final} already exists (another run writes to {root}?): kept, this one discarded",
                  flush=True)
        else:
            partial.rename(final)
        _fsync_dir(root)
    _barrier()
    _check_visible(final / f"rank{parts.rank:05d}.pt")
    if parts.rank == 0:
        done = complete_checkpoints(root)
        older = [p for p in done if p.name < final.name]
        for old in older[: max(0, len(older) - (keep - 1))]:  # keep `keep` including this one; never newer ones
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _check_visible(path: Path, wait_s: float = 5.0) -> None:
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{path} is not visible on this rank after rank 0 committed the checkpoint: checkpoint.dir must be "
                "on a filesystem every node shares"
            )
        time.sleep(0.1)


def read(path: Path, parts: Parts) -> Staged:
    """Read this rank's part of checkpoint ``path`` (``weights_only``) in the first of its formats this
    run's layout can load; raises ``CheckpointError``."""
    path = Path(path)
    meta = read_meta(path)
    unknown = [f for f in formats_of(meta) if f not in FORMATS]
    if len(unknown) == len(formats_of(meta)):
        raise CheckpointError(f"{path}: format {', '.join(unknown)} is not known to this version "
                              f"(known: {', '.join(FORMATS)})")
    name = choose(meta, layout_of(parts))
    if name is None:
        raise CheckpointError(refusal(path, meta, layout_of(parts)))
    FORMATS[name].read(path, meta, parts)
    return Staged(path, meta, name, _read_common(path, meta, parts))


def refusal(path: Path, meta: dict, layout: dict) -> str:
    """Why no format of checkpoint ``path`` loads at ``layout``, and what to do instead."""
    formats = formats_of(meta)
    saved = (f"backend={meta['backend']} with {rank_count(meta['world_size'])}"
             + (f", ZeRO stage {meta['zero_stage']}" if meta.get("zero_stage") is not None else "")
             + (f", tp {meta['tp']}" if meta.get("tp", 1) > 1 else ""))
    stage = f" and the DeepSpeed JSON of ZeRO stage {meta['zero_stage']}" if meta.get("zero_stage") is not None else ""
    stage += f" --tp {meta['tp']}" if meta.get("tp", 1) > 1 else ""
    return (f"checkpoint {path} holds only the {'/'.join(formats)} format ({FORMATS[formats[0]].what}), written by "
            f"{saved}; this run differs: {', '.join(layout_changes(meta, layout))}. Resume it with "
            f"--backend {meta['backend']} on {rank_count(meta['world_size'])}{stage}; to move a run to another layout, "
            "write its checkpoints with --checkpoint.format=both (or portable; the default for swan, sinkgd, sgdsai)")


def rank_count(n: int) -> str:
    return f"{n} rank" + ("" if n == 1 else "s")


def load(checkpoint: Path | Staged, parts: Parts, *, optimizer_state: bool = True, scheduler_state: bool = True) -> int:
    """Restore ``parts`` from a checkpoint (a path, or what ``read`` staged); returns the step to continue
    from. ``optimizer_state`` False: not the optimizer's state (a checkpoint of another optimizer);
    ``scheduler_state`` False: not the LR schedule's (the caller places its own at the step)."""
    staged = checkpoint if isinstance(checkpoint, Staged) else read(checkpoint, parts)
    done = FORMATS[staged.format].apply(staged, parts, optimizer_state=optimizer_state, scheduler_state=scheduler_state)
    if scheduler_state and not done:
        parts.scheduler.load_state_dict(staged.files["shared"]["scheduler"])
    set_rng_state(staged.files["rank"]["rng"])
    return int(staged.files["shared"]["step"])
