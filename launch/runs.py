"""A run's folder: ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``summary.json``,
``loss.png`` and ``checkpoints/``; what may be resumed there, and how its metrics read back.

``metrics.jsonl`` is append-only: every attempt (first launch, relaunch after a crash, torchrun
restart) first appends ``{"event": "start", "step": s}`` where ``s`` is the step it resumes from, then
its records. Records of an earlier attempt past ``s`` belong to work that was lost with the crash;
``read_metrics`` drops them, so the file keeps every attempt and the curve shows the run that counts.
"""

from __future__ import annotations

import json
import os
import shutil
import typing
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint as ckpt
from .config import UserError, dump, run_differences

METRICS = "metrics.jsonl"
OWNED = ("config.yaml", METRICS, "summary.json", "loss.png", "memory_report.json")  # deleted by run.overwrite


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of the attempts that count, in step order: each ``start`` event at step ``s`` drops the
    earlier records past ``s``; a record repeated for the same (kind, step) keeps its last value."""
    records: dict[tuple[str, int], dict] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        if rec.get("event") == "start":
            records = {k: v for k, v in records.items() if k[1] <= rec["step"]}
            continue
        kind = "val" if "val_loss" in rec else "train"
        records[(kind, rec["step"])] = rec
    return [records[k] for k in sorted(records, key=lambda k: (k[1], k[0] == "val"))]


def read_starts(path: Path) -> list[dict]:
    """The ``start`` events: one per attempt (launch, relaunch, restart), in order."""
    out = []
    for line in Path(path).read_text().splitlines():
        if '"event"' in line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def final_record(records: list[dict], key: str) -> dict | None:
    return next((r for r in reversed(records) if key in r), None)


# --------------------------------------------------------------------------- what to resume
def plan(cfg, world: int) -> tuple[Path | None, list[str]]:
    """Rank 0's decision for this launch: the checkpoint to resume (None: start fresh) and notes to log.
    Raises ``UserError`` where resuming or starting would mix or overwrite another run's results."""
    run_dir, ck_dir = cfg.run_dir, cfg.checkpoint_dir
    notes: list[str] = []
    if cfg.run.overwrite:
        removed = [run_dir / name for name in OWNED if (run_dir / name).exists()]
        for p in removed:
            p.unlink()
        if ck_dir.exists():
            shutil.rmtree(ck_dir)
            removed.append(ck_dir)
        if removed:
            notes.append(f"run.overwrite: deleted {', '.join(str(p) for p in removed)}")
    clean_partials(ck_dir)
    existing = ckpt.complete_checkpoints(ck_dir)
    path = ckpt.resolve(cfg.checkpoint.resume, ck_dir)
    new = dump(cfg)
    hint = "pick another --run.name (or --run.dir), or --run.overwrite=true to delete it and start over"
    if path is None:
        notes += _other_backends(cfg)
        if existing:  # resume=never
            raise UserError(f"{ck_dir} holds checkpoints up to {existing[-1].name}; --resume never would overwrite "
                            f"them: {hint}")
        previous = run_dir / "config.yaml"
        if previous.exists():
            diffs = run_differences(yaml.safe_load(previous.read_text()) or {}, new)
            if diffs and not cfg.checkpoint.allow_changes:
                raise UserError(f"{run_dir} holds another run ({'; '.join(diffs[:6])}): {hint}")
        return None, notes
    meta = ckpt.read_meta(path)
    here = layout(cfg, world)
    fmt = ckpt.choose(meta, here)
    if fmt is None:
        raise UserError(ckpt.refusal(path, meta, here))
    diffs = run_differences(meta.get("config", {}), new,
                            worlds=(int(meta["world_size"]) // int(meta.get("tp", 1)), world // cfg.backend.tp))
    if diffs and not cfg.checkpoint.allow_changes:
        raise UserError(
            f"checkpoint {path} was written by another run ({'; '.join(diffs[:6])}); resuming it would mix the two: "
            f"{hint}; or --checkpoint.allow_changes=true to continue from its weights with this config"
        )
    if diffs:
        notes.append(f"checkpoint.allow_changes: this config differs from the checkpoint's ({'; '.join(diffs)})")
    moved = ckpt.layout_changes(meta, here)
    if fmt == "portable" and meta.get("optimizer") != cfg.optimizer.name:
        native = "native" in ckpt.formats_of(meta)
        raise UserError(
            f"checkpoint {path} was written by {meta.get('optimizer')}; its portable format loads into that optimizer "
            f"only, so --optimizer {cfg.optimizer.name} cannot take its weights here"
            + (f" ({', '.join(moved)}): relaunch with --backend {meta['backend']} on "
               f"{ckpt.rank_count(meta['world_size'])} (its native format gives the weights to another optimizer), or"
               if native else ":") + f" keep --optimizer {meta.get('optimizer')}"
        )
    if moved:
        notes.append(f"resuming at another layout ({', '.join(moved)}) from the {fmt} format")
    newer = [p for p in existing if p.name > path.name]
    if newer and path.resolve().parent == ck_dir.resolve():
        raise UserError(f"{path} is older than {newer[-1]} in the same folder; continuing from it would overwrite the "
                        f"newer checkpoints: resume into another --run.dir, or delete {', '.join(p.name for p in newer)}")
    return path, notes


def _other_backends(cfg) -> list[str]:
    """The default folder names the backend, so a relaunch with another ``--backend`` starts a new run;
    say where this run name's checkpoints of other backends are, and how to continue one of them."""
    if cfg.run.dir or cfg.checkpoint.dir:
        return []
    names = typing.get_args(type(cfg.backend).model_fields["name"].annotation)
    folders = [cfg.model_copy(update={"backend": cfg.backend.model_copy(update={"name": b, "tp": 1})}).run_dir
               for b in names]
    folders += sorted(Path("runs").glob(f"{cfg.run.name}-{cfg.optimizer.name}-fsdp2-tp*"))  # --tp N's folders
    return [f"{f} holds checkpoints of this run name under another backend; to continue that run here, relaunch with "
            f"--run.dir {f} (the default folder names the backend)"
            for f in folders if f != cfg.run_dir and ckpt.complete_checkpoints(f / "checkpoints")]


def layout(cfg, world: int) -> dict:
    """The layout this launch will run at (``checkpoint.layout_of`` of the run it builds)."""
    stage = None
    if cfg.backend.name == "deepspeed":
        try:
            stage = int(json.loads(cfg.deepspeed_config_path().read_text()).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError, AttributeError):
            stage = None  # deepspeed_json reports a broken JSON with its field name, later
    return {"backend": cfg.backend.name, "world_size": world, "zero_stage": stage, "tp": cfg.backend.tp}


def clean_partials(ck_dir: Path) -> None:
    """Remove what a killed checkpoint write left behind (never a complete checkpoint)."""
    if ck_dir.is_dir():
        for p in ck_dir.glob(f".{ckpt.PREFIX}*{ckpt.PARTIAL}"):
            shutil.rmtree(p, ignore_errors=True)


def start(run_dir: Path, cfg, record: dict) -> None:
    """Rank 0, each attempt: the resolved config and the ``start`` event."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(dump(cfg), sort_keys=False))
    metrics = run_dir / METRICS
    if metrics.exists() and metrics.stat().st_size:
        with open(metrics, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:  # a kill mid-line: end that line so the start event is a line of its own
            with open(metrics, "a") as f:
                f.write("\n")
    append(metrics, {"event": "start", **record})


def summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}
