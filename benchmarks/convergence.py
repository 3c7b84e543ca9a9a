r"""Convergence benchmark: validation loss per token of AdamW, SWAN, SinkGD and SGD-SaI, each tuned with
the same budget, on real text; a study is a *plan* (a config plus a list of sweeps).

Every run is one ``launch/train.py`` run of a committed config (``PLANS[...]["config"]``), differing
only in optimizer, its two LRs, seed (and, for labelled runs, the overrides that say so):

    bash benchmarks/gpu_convergence.sh prepare                      # CPU: token caches + wheels
    python benchmarks/convergence.py --plan kjv23m --workers 8 --time-budget 440 --tag fair_h100
    python benchmarks/convergence.py --plan mix69m --centres-from benchmarks/results/convergence_fair_h100.json \
        --workers 4 --time-budget 430 --tag fair69m_h100
    python benchmarks/convergence.py --report-only --plan kjv23m --runs-dir runs/convergence --tag fair_h100
    python benchmarks/convergence.py --quick --workers 0            # CPU smoke run (tests/test_convergence_bench.py)

**Sweeps.** Each sweep is an optimizer configuration tuned on a lattice of LRs sqrt(10) ~ 3.16x apart:
the matrix LR (``lr``) and, where the optimizer has one, the fallback group's LR as a multiple of it
(``fallback_lr_ratio``: embeddings, LM head and norms, the ``stateless_opt.param_groups`` split;
AdamW gets the same split through launch's ``optimizer.adamw.fallback_lr_ratio``). Shapes: ``grid``
(3 x 3, or 3 points in 1-D) or ``plus`` (the centre and its 4 neighbours). Then, until the best point
(lowest seed-0 final validation loss) is strictly inside along each axis, the missing neighbour
beyond it is added (at most ``MAX_EXTENSIONS`` points). Then seeds 1..n-1 at that best; the row reports
the mean and spread over all seeds there (the point is chosen on seed 0 alone, the same for every
sweep). A sweep may take its centre from another sweep's best (``after``).

**Scheduling.** Runs go to ``--workers`` processes sharing one GPU (small models leave it mostly idle),
highest priority first, as soon as they are ready (a sweep's seeds start when its own grid is done;
no round barriers). ``--time-budget`` stops *starting* runs; what did not start is listed. First,
each timed sweep's centre runs alone for ``TIMING["steps"]`` steps: the median step time (no other run
on the GPU) gives the time-to-target column.

**Report** (``benchmarks/results/convergence_<tag>.json/.md/.png``, run metrics and per-tensor
diagnostics under ``convergence_<tag>_runs/``): per sweep the best point, whether it is inside, final
validation loss (mean; min-max; std; seeds), the tokens each seed needs to reach the *target*'s
final loss (the per-group AdamW: the fair baseline) and the one-LR AdamW's, the time to it from the
measured step time, optimizer state and peak GPU memory. Diagnostics (``--diag``, on by default):
every ``DIAG_EVERY`` steps (and steps 1, 2, 5, 10) the RMS of each tensor's update, weight and
gradient, the spread of per-row update RMS of embeddings/LM head, and SGD-SaI's frozen vs current
g-SNR, read by optimizer hooks in the benchmark's workers (launch/train.py is unchanged by them).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Q = math.sqrt(10.0)  # lattice step of every LR axis
MAX_EXTENSIONS = 4  # points a sweep may add beyond its initial shape to get its best inside
TIMING = {"steps": 30, "skip": 10}  # exclusive timing run: median step time over steps skip+1..steps
DIAG_EVERY = 22
NOT_STARTED = "not started (time budget)"


@dataclass(frozen=True)
class Sweep:
    """One tuned configuration. ``lr``/``ratio``: the lattice centre (``ratio`` None: no ratio axis,
    the optimizer's default). ``axes``: which of "lr", "ratio" are swept. ``after``: take the centre
    from that sweep's best (``after_fallback_lr``: the ratio that puts the fallback LR at that sweep's
    best fallback LR instead)."""

    name: str
    optimizer: str
    label: str
    lr: float
    ratio: float | None = None
    axes: tuple[str, ...] = ("lr", "ratio")
    shape: str = "grid"  # grid | plus | point
    seeds: int = 3
    priority: int = 0
    seed_priority: int | None = None  # default: priority
    overrides: tuple[str, ...] = ()
    section: str = "headline"  # headline | memory | sgdsai | candidates | budget
    after: str | None = None
    after_fallback_lr: str | None = None
    timed: bool = False
    note: str = ""

    @property
    def opt_key(self) -> str:
        return f"--optimizer.{self.optimizer}"


STATELESS = ("--optimizer.{o}.fallback=stateless",)
LONG_23M = ("--training.steps=484", "--training.warmup_steps=48", "--training.eval_every=12")

# Centres: the committed 23M study (one-LR AdamW 1e-3, SWAN 1e-3, SinkGD 3.16e-4, SGD-SaI 9.49e-4; ratio
# 20) and issue 19's 16.9M study (per-group AdamW: matrix 1e-3, embeddings/head/norms 3e-2). The mix69m
# plan re-centres on the 23M results (--centres-from).
SWEEPS_23M = [
    Sweep("adamw_pg", "adamw", "AdamW, per-group LRs (fair baseline)", 1e-3, 10 * Q, timed=True,
       note="target: the same param_groups split and the same 3x3 grid budget as SWAN/SinkGD"),
    Sweep("swan", "swan", "SWAN (AdamW fallback)", 1e-3, 20.0, timed=True),
    Sweep("sinkgd", "sinkgd", "SinkGD (AdamW fallback)", 1e-3 / Q, 20.0, timed=True),
    Sweep("adamw", "adamw", "AdamW, one LR", 1e-3, axes=("lr",), priority=1, timed=True,
       note="every tensor at one LR (the baseline of the README's earlier claim)"),
    Sweep("swan_stateless", "swan", "SWAN, stateless fallback", 1e-3, 10.0, shape="plus", priority=2,
       overrides=STATELESS, section="memory", timed=True),
    Sweep("sinkgd_stateless", "sinkgd", "SinkGD, stateless fallback", 1e-3 / Q, 10.0, shape="plus", priority=2,
       overrides=STATELESS, section="memory", timed=True),
    Sweep("sgdsai", "sgdsai", "SGD-SaI (the paper: one LR, every tensor)", 3e-4 * Q, axes=("lr",), priority=3,
       section="sgdsai", timed=True),
    Sweep("sgdsai_adamw", "sgdsai", "SGD-SaI + AdamW fallback (not the paper)", 3e-4 * Q, 10 * Q, shape="plus",
       priority=3, seed_priority=5, overrides=("--optimizer.sgdsai.fallback=adamw",), section="sgdsai",
       after_fallback_lr="adamw_pg",
       note="embeddings/LM head/norms on AdamW at the fair AdamW's best fallback LR (centre)"),
    Sweep("sgdsai_ratio", "sgdsai", "SGD-SaI, fallback group at its own LR (SGD-SaI rule)", 0.0, Q,
       axes=("ratio",), seeds=1, priority=5, section="sgdsai", after="sgdsai",
       note="isolates step size from adaptivity: the same SGD-SaI rule on embeddings/head/norms, larger LR"),
    Sweep("swan_rowclip", "swan", "SWAN, stateless fallback 'rowclip' (new)", 1e-3, 10 * Q, shape="plus", priority=4,
       seed_priority=6, overrides=("--optimizer.swan.fallback=rowclip",), section="candidates"),
    Sweep("adamw_pg_2x", "adamw", "AdamW per-group, 2x steps", 0.0, None, shape="point", seeds=1, priority=6,
       overrides=LONG_23M, section="budget", after="adamw_pg"),
    Sweep("sgdsai_adamw_2x", "sgdsai", "SGD-SaI + AdamW fallback, 2x steps", 0.0, None, shape="point", seeds=1,
       priority=6, overrides=("--optimizer.sgdsai.fallback=adamw", *LONG_23M), section="budget",
       after="sgdsai_adamw"),
]

# The larger scale: one LR axis (3 points) per sweep at the 23M study's best ratio, centred on its best
# LR (see PLANS["mix69m"]["why"]).
SWEEPS_69M = [
    replace(s, axes=("lr",), shape="grid", after=None, after_fallback_lr=None, priority=p, seed_priority=sp,
            timed=s.name in ("adamw_pg", "swan", "sinkgd", "swan_stateless"))
    for s, p, sp in [  # (sweep, grid priority, seeds priority): the headline trio first, then the memory row
        (SWEEPS_23M[0], 0, 1), (SWEEPS_23M[1], 0, 1), (SWEEPS_23M[2], 0, 1), (SWEEPS_23M[4], 1, 2),
        (SWEEPS_23M[3], 2, 3), (SWEEPS_23M[5], 4, 5), (SWEEPS_23M[6], 4, 6), (SWEEPS_23M[7], 4, 6),
        (SWEEPS_23M[9], 5, 6),
    ]
]

PLANS = {
    "kjv23m": {
        "config": "configs/convergence.yaml",
        "sweeps": SWEEPS_23M,
        "why": "23M LLaMA on the KJV (the committed study's setup): 3x3 matrix-LR x ratio grids for the "
        "headline trio, plus-shaped 2-D searches for the other rows, 3 seeds at each best",
    },
    "mix69m": {
        "config": "configs/convergence_69m.yaml",
        "sweeps": SWEEPS_69M,
        "why": "69M LLaMA on KJV + Shakespeare: each sweep's LR on 3 points (extended at an edge) around "
        "its 23M best, the ratio fixed at its 23M best (muP-style width scaling, 512 -> 768, would move "
        "the LR and the ratio by 1.5x, under half a lattice step); 3 seeds at each best; the headline trio "
        "first, then SWAN's stateless fallback, the one-LR AdamW and the rest as the time budget allows",
    },
}
QUICK = [  # CPU smoke run: a 1-block model, a few steps (checks the pipeline, not the optimizers)
    "--model.preset=tiny", "--model.num_layers=1", "--data.seq_len=32", "--model.max_position_embeddings=32",
    "--training.steps=6", "--training.warmup_steps=1", "--training.eval_every=2", "--training.batch_size=4",
    "--training.eval_batch_size=4", "--training.eval_batches=1", "--training.autocast=none",
]


def quick_sweep(s: Sweep) -> Sweep:
    """--quick: plus shapes, 2 seeds, 6-step "long" runs."""
    over = tuple(o for o in s.overrides if not o.startswith(("--training.steps", "--training.warmup",
                                                               "--training.eval_every")))
    if s.section == "budget":
        over += ("--training.steps=8",)
    return replace(s, shape="plus" if s.shape == "grid" else s.shape, seeds=min(s.seeds, 2), overrides=over)


# ------------------------------------------------------------------------------------ lattice
def run_name(sweep: str, lr: float, ratio: float | None, seed: int) -> str:
    return f"{sweep}_lr{lr:.3g}" + (f"_r{ratio:.3g}" if ratio is not None else "") + f"_s{seed}"


def _same(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6))


def initial_points(s: Sweep, lr: float, ratio: float | None) -> list[tuple[float, float | None]]:
    if s.shape == "point":
        return [(lr, ratio)]
    lrs = [lr / Q, lr, lr * Q] if "lr" in s.axes else [lr]
    ratios = [ratio / Q, ratio, ratio * Q] if ("ratio" in s.axes and ratio is not None) else [ratio]
    if s.shape == "plus":
        return list(dict.fromkeys([(lr, ratio)] + [(x, ratio) for x in lrs] + [(lr, r) for r in ratios]))
    return [(x, r) for x in lrs for r in ratios]


def _loss(res: dict | None) -> float:
    v = (res or {}).get("final_val_loss")
    return v if (res or {}).get("status") == "ok" and v is not None and math.isfinite(v) else math.inf


def _attempted(res: dict) -> bool:
    return res.get("status") not in (None, NOT_STARTED)


def seed0_points(s: Sweep, results: dict[str, dict]) -> list[tuple[float, float | None, float]]:
    """(lr, ratio, seed-0 final loss) of the sweep's attempted seed-0 runs."""
    return [(r["lr"], r.get("ratio"), _loss(r)) for r in results.values()
            if r["sweep"] == s.name and r["seed"] == 0 and _attempted(r)]


def best_point(points: list[tuple[float, float | None, float]]) -> tuple[float, float | None] | None:
    """Lowest seed-0 loss (a diverged run counts as +inf); ties to the smaller LR, then ratio."""
    if not points:
        return None
    lr, ratio, _ = min(points, key=lambda p: (p[2], p[0], p[1] or 0.0))
    return lr, ratio


def missing_neighbours(s: Sweep, points, best) -> list[tuple[float, float | None]]:
    """The points beyond ``best`` along each swept axis where nothing was tried on that side."""
    lr, ratio = best
    out = []
    if "lr" in s.axes and s.shape != "point":
        line = [p[0] for p in points if _same(p[1], ratio)]
        if not any(x < lr * (1 - 1e-6) for x in line):
            out.append((lr / Q, ratio))
        if not any(x > lr * (1 + 1e-6) for x in line):
            out.append((lr * Q, ratio))
    if "ratio" in s.axes and ratio is not None and s.shape != "point":
        line = [p[1] for p in points if _same(p[0], lr)]
        if not any(x < ratio * (1 - 1e-6) for x in line):
            out.append((lr, ratio / Q))
        if not any(x > ratio * (1 + 1e-6) for x in line):
            out.append((lr, ratio * Q))
    return out


def inside(s: Sweep, points, best) -> dict[str, bool]:
    """Per swept axis: is the best strictly inside (tried points on both sides along its line)?"""
    miss = missing_neighbours(s, points, best)
    out = {}
    if "lr" in s.axes:
        out["lr"] = not any(_same(r, best[1]) and not _same(x, best[0]) for x, r in miss)
    if "ratio" in s.axes and best[1] is not None:
        out["ratio"] = not any(_same(x, best[0]) and not _same(r, best[1]) for x, r in miss)
    return out


def sweep_centre(s: Sweep, results: dict[str, dict], sweeps: dict[str, Sweep], centres: dict) -> tuple | None:
    """The sweep's lattice centre; None while the sweep it depends on has no final best."""
    lr, ratio = centres.get(s.name, (s.lr, s.ratio))
    if s.after:
        state = sweep_state(sweeps[s.after], results, sweeps, centres)
        if state["stage"] not in ("seeds", "done") or state["best"] is None:
            return None
        lr, ratio = state["best"][0], state["best"][1] if state["best"][1] is not None else ratio
    if s.after_fallback_lr:
        state = sweep_state(sweeps[s.after_fallback_lr], results, sweeps, centres)
        if state["stage"] not in ("seeds", "done") or state["best"] is None:
            return None
        blr, bratio = state["best"]
        ratio = blr * (bratio or 1.0) / lr
    return lr, ratio


def sweep_state(s: Sweep, results: dict[str, dict], sweeps: dict[str, Sweep], centres: dict,
                inflight: frozenset = frozenset()) -> dict:
    """Where a sweep stands: stage (blocked | grid | extend | seeds | done), its best point, and the
    specs it wants run now (none while it waits for a run in flight). A spec is "done" once it is in
    ``results`` (run, diverged, failed, or not started for lack of time)."""
    centre = sweep_centre(s, results, sweeps, centres)
    if centre is None:
        return {"stage": "blocked", "best": None, "want": []}

    def specs(points, seed, prio):
        return [{"sweep": s.name, "lr": lr, "ratio": r, "seed": seed, "priority": prio,
                 "name": run_name(s.name, lr, r, seed)} for lr, r in points]

    def pending(stage, best, wanted):
        todo = [w for w in wanted if w["name"] not in results]
        if not todo:
            return None
        return {"stage": stage, "best": best, "want": [w for w in todo if w["name"] not in inflight]}

    grid_points = initial_points(s, *centre)
    state = pending("grid", None, specs(grid_points, 0, s.priority))
    if state:
        return state
    points = seed0_points(s, results)
    best = best_point(points)
    if best is None:  # nothing of the grid ran (time budget): nothing to decide
        return {"stage": "done", "best": None, "want": []}
    extensions = [p for p in points if not any(_same(p[0], x) and _same(p[1], r) for x, r in grid_points)]
    miss = missing_neighbours(s, points, best)
    if miss and len(extensions) < MAX_EXTENSIONS:
        state = pending("extend", best, specs(miss, 0, s.priority))
        if state:
            return state
    prio = s.priority if s.seed_priority is None else s.seed_priority
    state = pending("seeds", best, [w for k in range(1, s.seeds) for w in specs([best], k, prio)])
    return state or {"stage": "done", "best": best, "want": []}


def run_argv(s: Sweep, lr: float, ratio: float | None, seed: int, runs_dir: Path, config: str,
             extra: list[str], name: str | None = None) -> list[str]:
    name = name or run_name(s.name, lr, ratio, seed)
    argv = ["-c", str(ROOT / config), "--optimizer", s.optimizer, f"{s.opt_key}.lr={lr!r}",
            f"--training.seed={seed}", f"--run.name={name}", f"--run.dir={runs_dir / name}", *extra]
    if ratio is not None:
        argv.append(f"{s.opt_key}.fallback_lr_ratio={ratio!r}")
    return argv + [o.format(o=s.optimizer) for o in s.overrides]


# ------------------------------------------------------------------------------------ workers
_DIAG: dict = {"path": None, "steps": frozenset(), "count": 0, "snap": None}


def _worker_init(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)
    _install_diag_hooks()


def _install_diag_hooks() -> None:
    """Global optimizer step hooks (any optimizer in this process); they act only while a run has
    diagnostics on. Only ever read tensors: the training itself is the launch/train.py run."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    if not _DIAG.get("installed"):
        register_optimizer_step_pre_hook(_diag_pre)
        register_optimizer_step_post_hook(_diag_post)
        _DIAG["installed"] = True


def _named_params(opt):
    for g in opt.param_groups:
        names = g.get("param_names") or [f"group{id(g)}.{i}" for i in range(len(g["params"]))]
        for name, p in zip(names, g["params"]):
            if p.grad is not None:
                yield name, p, g.get("rule", "all")


def _diag_pre(opt, args, kwargs) -> None:
    import torch

    d = _DIAG
    if d["path"] is None:
        return
    d["count"] += 1
    if d["count"] not in d["steps"]:
        return
    from stateless_opt.sgd_sai import gsnr_from_sums

    snap = {}
    with torch.no_grad():
        for name, p, rule in _named_params(opt):
            g = p.grad.detach().float()
            n = g.numel()
            count = torch.tensor(float(n), dtype=torch.float64, device=g.device)
            live = gsnr_from_sums(g.double().sum(), g.double().square().sum(), count, 1e-8).item()
            snap[name] = (p, p.detach().float().clone(), rule, g.square().mean().sqrt().item(), live, n)
    d["snap"] = snap


def _diag_post(opt, args, kwargs) -> None:
    import torch

    d = _DIAG
    if d["path"] is None or d["snap"] is None:
        return
    rec = {"step": d["count"], "tensors": {}}
    g4 = lambda v: float(f"{v:.4g}")  # noqa: E731 - 4 significant digits keep the files small
    with torch.no_grad():
        for name, (p, before, rule, grad_rms, live, n) in d["snap"].items():
            delta = p.detach().float() - before
            t = {"rule": rule, "numel": n, "update_rms": g4(delta.square().mean().sqrt().item()),
                 "weight_rms": g4(before.square().mean().sqrt().item()), "grad_rms": g4(grad_rms),
                 "gsnr_live_over_sqrt_n": g4(live / math.sqrt(max(n - 1, 1)))}
            frozen = opt.state.get(p, {}).get("gsnr") if hasattr(opt, "state") else None
            if frozen is not None and torch.is_tensor(frozen) and frozen.numel():
                t["gsnr_frozen_over_sqrt_n"] = g4(float(frozen.reshape(-1)[0]) / math.sqrt(max(n - 1, 1)))
            if rule == "fallback" and delta.dim() == 2 and delta.shape[0] > 1:
                rows = delta.square().mean(1).sqrt()
                qs = torch.quantile(rows, torch.tensor([0.1, 0.5, 0.9], device=rows.device)).tolist()
                t["row_update_rms_p10_p50_p90_max"] = [g4(v) for v in (*qs, rows.max().item())]
            rec["tensors"][name] = t
    d["snap"] = None
    with open(d["path"], "a") as f:
        f.write(json.dumps(rec) + "\n")


def _train_one(job: dict) -> dict:
    """One training run in this worker process; never raises (a diverged run is a result)."""
    import torch

    from launch import train

    if time.time() > job["deadline"]:
        return {**job["spec"], "status": NOT_STARTED}
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _install_diag_hooks()
    if job.get("diag"):
        (run_dir / "diag.jsonl").write_text("")
        _DIAG.update(path=str(run_dir / "diag.jsonl"), count=0, snap=None, steps=frozenset(job["diag"]))
    t0 = time.time()
    log = io.StringIO()
    status, summary = "ok", {}
    try:
        with contextlib.redirect_stdout(log):
            summary = train.main(job["argv"] + ["--training.threads=%d" % job["threads"]]) or {}
    except FloatingPointError as err:  # train.py stops a run whose loss is NaN/Inf
        status = f"diverged: {err}"
    except Exception as err:  # noqa: BLE001 - recorded in the report, the study goes on
        status = f"failed: {err!r}"
    finally:
        _DIAG.update(path=None, snap=None)
    (run_dir / "log.txt").write_text(log.getvalue())
    out = {**job["spec"], "status": status, "wall_s": round(time.time() - t0, 2), "run_dir": str(run_dir)}
    if summary:
        out["wall_time_train_s"] = summary.get("wall_time_s")
        out["final_val_loss"] = summary.get("final_val_loss")
        mem = (summary.get("memory") or [{}])[0]
        out["peak_gpu_bytes"] = mem.get("cuda_peak_allocated_bytes")
        out["optimizer_state_bytes"] = mem.get("optimizer_state_bytes")
        out["params"] = summary.get("params", {}).get("total")
    (run_dir / "result.json").write_text(json.dumps(out, indent=1))
    return out


class Runner:
    """Submit jobs, wait for one result: a process pool, or this process (``workers=0``, tests)."""

    def __init__(self, workers: int, threads: int):
        import queue

        self.done: "queue.Queue[dict]" = queue.Queue()
        self.pending: list[dict] = []
        self.pool = (mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(threads,))
                     if workers else None)
        self.slots = workers or 1
        self.inflight = 0

    def submit(self, job: dict) -> None:
        self.inflight += 1
        if self.pool is None:
            self.pending.append(job)
        else:
            self.pool.apply_async(_train_one, (job,), callback=self.done.put,
                                  error_callback=lambda e, j=job: self.done.put({**j["spec"], "status": f"failed: {e!r}"}))

    def wait(self) -> dict:
        if self.pool is None:
            res = _train_one(self.pending.pop(0))
        else:
            res = self.done.get()
        self.inflight -= 1
        return res

    def close(self, abort: bool = False) -> None:
        """Wait for the workers; ``abort``: kill them (a SIGTERM from ``timeout``, Ctrl-C), so no run
        keeps the GPU after the study has stopped."""
        if self.pool is not None:
            if abort:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()


def diag_steps(total: int) -> list[int]:
    return sorted({1, 2, 5, 10, total} | set(range(DIAG_EVERY, total + 1, DIAG_EVERY)))


def run_study(plan: dict, sweeps: list[Sweep], centres: dict, runs_dir: Path, extra: list[str], done: dict,
              workers: int, threads: int, deadline: float, diag: bool, steps: int, timing: bool) -> dict:
    """Timing runs first (alone on the device), then every sweep to completion or the deadline."""
    by_name = {s.name: s for s in sweeps}
    timings: dict[str, dict] = {}
    runner = Runner(workers, threads)
    index = runs_dir / "index.json"
    t0 = time.time()

    def job(s: Sweep, lr, ratio, seed, name, extra_args, spec_extra=None, with_diag=diag):
        return {"spec": {"sweep": s.name, "lr": lr, "ratio": ratio, "seed": seed, "name": name, **(spec_extra or {})},
                "argv": run_argv(s, lr, ratio, seed, runs_dir, plan["config"], extra + extra_args, name),
                "run_dir": str(runs_dir / name), "deadline": deadline, "threads": threads,
                "diag": diag_steps(steps) if with_diag else None}

    try:
        if timing:
            for s in sweeps:
                if not s.timed:
                    continue
                lr, ratio = centres.get(s.name, (s.lr, s.ratio))
                if s.after_fallback_lr:
                    ratio = ratio if ratio is not None else 10.0
                name = f"timing_{s.name}"
                over = [f"--training.steps={TIMING['steps']}", "--training.warmup_steps=1", "--training.eval_every=0"]
                runner.submit(job(s, lr, ratio, 0, name, over, {"timing": True}, with_diag=False))
                res = runner.wait()  # one at a time: nothing else on the device
                timings[s.name] = timing_from(res)
                print(f"  [timing] {s.name:<18} {timings[s.name].get('step_ms') or float('nan'):8.2f} ms/step "
                      f"({res['status'][:40]})", flush=True)
        inflight: dict[str, dict] = {}
        order = [x.name for x in sweeps]
        while True:
            want = [w for x in sweeps for w in sweep_state(x, done, by_name, centres, frozenset(inflight))["want"]]
            want.sort(key=lambda w: (w["priority"], order.index(w["sweep"]), w["seed"]))
            if want and time.time() > deadline:  # what is queued now will not start: say so, look again
                for w in want:
                    done[w["name"]] = {**w, "status": NOT_STARTED}
                continue
            for w in want[: max(0, runner.slots - runner.inflight)]:
                inflight[w["name"]] = w
                runner.submit(job(by_name[w["sweep"]], w["lr"], w["ratio"], w["seed"], w["name"], [],
                                  {"priority": w["priority"]}))
            if not runner.inflight:
                break
            res = runner.wait()
            inflight.pop(res["name"], None)
            done[res["name"]] = res
            index.write_text(json.dumps(done, indent=1))  # a killed study can still be reported
            print(f"  {res['name']:<40} {res['status'][:30]:<12} val {res.get('final_val_loss') or float('nan'):.4f} "
                  f"{res.get('wall_s', 0):6.1f}s  [{time.time() - t0:5.0f}s]", flush=True)
        index.write_text(json.dumps(done, indent=1))
    except BaseException:
        runner.close(abort=True)
        raise
    runner.close()
    if timings:
        (runs_dir / "timing.json").write_text(json.dumps(timings, indent=1))
    return timings


def timing_from(res: dict) -> dict:
    """Median step time of a timing run (steps after the first few: compilation, warm-up)."""
    rows = _rows(res.get("run_dir", ""))
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > TIMING["skip"]]
    per_step = next((r["tokens"] // r["step"] for r in rows if "tokens" in r and r["step"]), 0)
    return {"status": res.get("status"), "steps_timed": len(times), "tokens_per_step": per_step,
            "step_ms": 1e3 * statistics.median(times) if times else None,
            "step_ms_p10_p90": [1e3 * q for q in _quantiles(times, (0.1, 0.9))] if times else None}


def _quantiles(xs: list[float], qs) -> list[float]:
    s = sorted(xs)
    return [s[min(len(s) - 1, int(q * len(s)))] for q in qs]


# ------------------------------------------------------------------------------------ analysis
def metrics_file(run_dir: str | Path) -> Path:
    """A run's metrics.jsonl: inside its run dir, or the copy a results folder keeps (``*.jsonl``)."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.suffix == ".jsonl" else run_dir / "metrics.jsonl"


def _rows(run_dir) -> list[dict]:
    """The records that count (launch/runs.py: an attempt killed and rerun appends; its lost steps drop)."""
    from launch.runs import read_metrics as records

    path = metrics_file(run_dir) if run_dir else None
    if not path or not path.exists():
        return []
    return records(path)


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, int, float]], int]:
    """[(step, tokens, val_loss)] and tokens per step from a run's metrics.jsonl."""
    rows = _rows(run_dir)
    per_step = next((r["tokens"] // r["step"] for r in rows if "tokens" in r and r["step"]), 0)
    return [(r["step"], r["step"] * per_step, r["val_loss"]) for r in rows if "val_loss" in r], per_step


def tokens_to_reach(curve: list[tuple[int, int, float]], target: float) -> float | None:
    """First crossing of ``target`` by the validation curve, linearly interpolated in tokens."""
    for (s0, t0, v0), (s1, t1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            if v0 <= target:
                return float(t0)
            return t0 + (v0 - target) / (v0 - v1) * (t1 - t0)
    return None


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def diag_file(run_dir) -> Path | None:
    """A run's diag.jsonl, or the ``<name>.diag.jsonl`` a results folder keeps."""
    if not run_dir:
        return None
    p = Path(run_dir)
    cand = p.with_name(p.name.replace(".jsonl", ".diag.jsonl")) if p.suffix == ".jsonl" else p / "diag.jsonl"
    return cand if cand.exists() else None


def tensor_class(name: str, rule: str) -> str:
    n = name.lower()
    if "embed" in n:
        return "embedding"
    if "lm_head" in n:
        return "lm_head"
    if "norm" in n:
        return "norms"
    if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return "attention"
    if any(k in n for k in ("gate_proj", "up_proj", "down_proj")):
        return "mlp"
    return rule


def diag_summary(path: Path | None) -> dict | None:
    """Per tensor class and logged step: median update RMS (and relative to the weight); the embedding
    / LM head rows' update RMS spread; SGD-SaI's frozen g-SNR and the current one, over sqrt(numel-1)."""
    if path is None:
        return None
    out: dict = {"steps": [], "classes": {}}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        out["steps"].append(rec["step"])
        per: dict[str, list[dict]] = {}
        for name, t in rec["tensors"].items():
            per.setdefault(tensor_class(name, t["rule"]), []).append(t)
        for cls, ts in per.items():
            c = out["classes"].setdefault(cls, {"update_rms": [], "update_over_weight": [], "rows": [],
                                                "gsnr_frozen": [], "gsnr_live_over_frozen": []})
            c["update_rms"].append(statistics.median(t["update_rms"] for t in ts))
            c["update_over_weight"].append(statistics.median(t["update_rms"] / max(t["weight_rms"], 1e-30) for t in ts))
            rows = [t["row_update_rms_p10_p50_p90_max"] for t in ts if "row_update_rms_p10_p50_p90_max" in t]
            c["rows"].append(rows[0] if rows else None)
            fr = [t for t in ts if "gsnr_frozen_over_sqrt_n" in t]
            c["gsnr_frozen"].append([min(t["gsnr_frozen_over_sqrt_n"] for t in fr), max(t["gsnr_frozen_over_sqrt_n"] for t in fr)]
                                    if fr else None)
            ratio = [t["gsnr_live_over_sqrt_n"] / t["gsnr_frozen_over_sqrt_n"] for t in fr if t["gsnr_frozen_over_sqrt_n"] > 0]
            c["gsnr_live_over_frozen"].append([min(ratio), statistics.median(ratio), max(ratio)] if ratio else None)
    return out


def analyse(plan: dict, sweeps: list[Sweep], results: dict[str, dict], centres: dict, timings: dict) -> dict:
    by_name = {s.name: s for s in sweeps}
    curves = {n: read_metrics(Path(r["run_dir"]))[0] if r.get("run_dir") else [] for n, r in results.items()}
    out: dict = {"sweeps": {}}
    for s in sweeps:
        st = sweep_state(s, results, by_name, centres)
        points = seed0_points(s, results)
        best = best_point(points)
        tried = [r for r in results.values() if r["sweep"] == s.name and _attempted(r)]
        if best is None:
            out["sweeps"][s.name] = {"label": s.label, "stage": st["stage"], "runs": len(tried)}
            continue
        at_best = [r for r in tried if _same(r["lr"], best[0]) and _same(r.get("ratio"), best[1])]
        finals = [r for r in at_best if r.get("status") == "ok"]
        losses = [r["final_val_loss"] for r in sorted(finals, key=lambda r: r["seed"])]
        ratio = best[1]
        ratio_eff = ratio if ratio is not None else 1.0
        grid = {run_name(s.name, lr, r, 0): {"lr": lr, "ratio": r, "final_val_loss": None if math.isinf(v) else v}
                for lr, r, v in points}
        first = finals[0] if finals else {}
        diag = diag_summary(diag_file(first.get("run_dir", ""))) if first else None
        out["sweeps"][s.name] = {
            "label": s.label, "optimizer": s.optimizer, "section": s.section, "note": s.note,
            "overrides": [o.format(o=s.optimizer) for o in s.overrides], "stage": st["stage"],
            "shape": s.shape, "axes": list(s.axes), "centre": list(sweep_centre(s, results, by_name, centres) or []),
            "best_lr": best[0], "best_ratio": ratio, "fallback_lr": best[0] * ratio_eff if s.optimizer != "sgdsai" or ratio else None,
            "inside": inside(s, points, best), "grid": grid, "runs_at_best": [r["name"] for r in sorted(finals, key=lambda r: r["seed"])],
            "seeds_at_best": sorted(r["seed"] for r in finals),
            "status_at_best": {r["name"]: r["status"][:80] for r in at_best if r.get("status") != "ok"},
            "final_val_loss": _stats(losses),
            "wall_train_s_mean": (sum(r.get("wall_time_train_s") or 0 for r in finals) / len(finals)) if finals else None,
            "peak_gpu_gib": (max((r.get("peak_gpu_bytes") or 0) for r in finals) / 2**30 or None) if finals else None,
            "optimizer_state_mib": (first.get("optimizer_state_bytes") or 0) / 2**20 if finals else None,
            "params": first.get("params"),
            "timing": timings.get(s.name),
            "diag": diag,
        }
    target = out["sweeps"].get("adamw_pg", {}).get("final_val_loss", {}).get("mean")
    one_lr = out["sweeps"].get("adamw", {}).get("final_val_loss", {}).get("mean")
    out["target_val_loss"], out["one_lr_adamw_val_loss"] = target, one_lr
    for name, info in out["sweeps"].items():
        if "runs_at_best" not in info:
            continue
        budget = max((c[-1][1] for n, c in curves.items() if n in info["runs_at_best"] and c), default=None)
        info["tokens_budget"] = budget
        for key, tgt, owner in (("target", target, "adamw_pg"), ("one_lr", one_lr, "adamw")):
            if tgt is None:
                continue
            per = [tokens_to_reach(curves.get(n, []), tgt) for n in info["runs_at_best"]]
            reached = [t for t in per if t is not None]
            info[f"tokens_to_{key}"] = per
            mean = sum(reached) / len(reached) if reached and len(reached) == len(per) else None
            if name == owner:  # its own seed mean: reached with the whole budget by definition (the seeds
                mean = budget  # above the mean never cross it; their crossings are listed all the same)
            info[f"tokens_to_{key}_mean"] = mean
            info[f"tokens_to_{key}_ratio"] = mean / budget if (mean is not None and budget) else None
            t = info.get("timing") or {}
            if mean is not None and t.get("step_ms") and t.get("tokens_per_step"):
                info[f"time_to_{key}_s"] = mean / t["tokens_per_step"] * t["step_ms"] / 1e3
        fl = info["final_val_loss"]["mean"]
        info["vs_target"] = (fl / target - 1) if (fl is not None and target) else None
    out["curves"] = {n: c for n, c in curves.items()}
    return out


# ------------------------------------------------------------------------------------ report
def _f(v, fmt=".4f", none="-"):
    return none if v is None else format(v, fmt)


def _seed0(info: dict) -> float | None:
    """Seed 0's final loss at the best point (what the budget rows compare)."""
    p = next((p for p in (info.get("grid") or {}).values()
              if _same(p["lr"], info.get("best_lr")) and _same(p["ratio"], info.get("best_ratio"))), None)
    return p["final_val_loss"] if p else None


def markdown(summary: dict) -> str:
    meta = summary.get("setup", {})
    sw = summary["sweeps"]
    target = summary.get("target_val_loss")
    lines = [f"Convergence ({meta.get('plan', '?')}) on {meta.get('device', '?')}: {meta.get('model', '')}; "
             f"{meta.get('tokens', '')}", "", f"Tuning: {meta.get('why', '')}; centres: {meta.get('centres', '-')}.", ""]
    if target is not None:
        lines.append(f"Target: the per-group AdamW's final validation loss {target:.4f} (mean over its seeds). "
                     "Time = tokens to it / tokens per step x the median step time measured alone on the device "
                     "at this scale (timing runs, no other run sharing the GPU).")
        lines.append("")
    head = ("| configuration | best LR (fallback LR) | inside | final val loss: mean (min-max; std; n) | vs target "
            "| tokens to target (x budget) | time to target | tokens to one-LR AdamW's final | step ms | opt. state MiB "
            "| peak GiB |")
    sections = [("headline", "Headline: each optimizer at its best, same tuning budget"),
                ("memory", "Memory configuration: the stateless fallback (zero optimizer state)"),
                ("candidates", "State-free fallback candidates (new; labelled)"),
                ("sgdsai", "SGD-SaI diagnosis (labelled departures from the paper are not defaults)"),
                ("budget", "Budget: 2x the steps at the 1x best point (seed 0)")]
    for key, title in sections:
        rows = [(n, i) for n, i in sw.items() if i.get("section") == key or (key == "headline" and "section" not in i and False)]
        if not rows:
            continue
        lines += [f"**{title}**", "", head, "|" + " --- |" * 11]
        for n, i in rows:
            if "best_lr" not in i:
                lines.append(f"| {i['label']} | not run ({i.get('stage')}) |" + " |" * 10)
                continue
            fl = i["final_val_loss"]
            loss = (f"{fl['mean']:.4f} ({fl['min']:.4f}-{fl['max']:.4f}; {fl['std']:.4f}; {fl['n']})"
                    if fl["mean"] is not None else "diverged")
            lr = f"{i['best_lr']:.3g}" + (f" ({i['fallback_lr']:.3g})" if i.get("fallback_lr") and i.get("best_ratio") else "")
            ins = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in i["inside"].items()) or "-"
            vs = f"{100 * i['vs_target']:+.2f}%" if i.get("vs_target") is not None else "-"

            def tok(key):
                per = i.get(f"tokens_to_{key}") or []
                if not per:
                    return "-"
                if i.get(f"tokens_to_{key}_mean") is not None:
                    return f"{i[f'tokens_to_{key}_mean'] / 1e6:.3f}M ({i[f'tokens_to_{key}_ratio']:.2f}x)"
                return f"{sum(t is not None for t in per)}/{len(per)} seeds reach it"

            t = i.get("timing") or {}
            tt = f"{i['time_to_target_s']:.1f}s" if i.get("time_to_target_s") is not None else "-"
            lines.append(f"| {i['label']} | {lr} | {ins} | {loss} | {vs} | {tok('target')} | {tt} | {tok('one_lr')} | "
                         f"{_f(t.get('step_ms'), '.1f')} | {_f(i.get('optimizer_state_mib'), '.1f')} | "
                         f"{_f(i.get('peak_gpu_gib'), '.2f')} |")
        if key == "budget":  # the question these rows answer: does the gap shrink with the budget?
            for a, b in (("sgdsai_adamw", "adamw_pg"),):
                pair = [(sw.get(a + sfx) or {}, sw.get(b + sfx) or {}) for sfx in ("", "_2x")]
                g = [_seed0(x) / _seed0(y) - 1 if _seed0(x) and _seed0(y) else None for x, y in pair]
                if all(v is not None for v in g):
                    lines.append(f"Gap of {sw[a]['label']} to {sw[b]['label']} (seed 0 at the 1x best points): "
                                 f"{100 * g[0]:+.2f}% at 1x, {100 * g[1]:+.2f}% at 2x the steps.")
                    lines.append("")
        lines.append("")
    lines += ["**Sweeps** (seed-0 final validation loss at each point; * = best)", ""]
    for n, i in sw.items():
        if "grid" not in i:
            continue
        pts = sorted(i["grid"].values(), key=lambda p: (p["ratio"] or 0, p["lr"]))
        txt = "; ".join(f"{'*' if _same(p['lr'], i['best_lr']) and _same(p['ratio'], i['best_ratio']) else ''}"
                        f"lr {p['lr']:.3g}" + (f" r {p['ratio']:.3g}" if p["ratio"] is not None else "") +
                        f": {_f(p['final_val_loss'], '.3f', 'div.')}" for p in pts)
        lines.append(f"- {n} ({i['shape']}, {'x'.join(i['axes'])}; {' '.join(i['overrides'])}): {txt}")
    diag = [(n, i["diag"]) for n, i in sw.items() if i.get("diag")]
    if diag:
        lines += ["", "**Per-tensor update RMS** (median over the class's tensors, seed 0 at the best point; "
                  "at the first, middle and last logged steps; embedding/LM head rows: p10 / p50 / p90 of the rows' "
                  "update RMS at the last logged step)", "",
                  "| configuration | embedding | LM head | attention | MLP | norms | embedding rows | LM head rows |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n, d in diag:
            def cls(c):
                v = d["classes"].get(c, {}).get("update_rms") or []
                return " / ".join(f"{v[k]:.2g}" for k in sorted({0, len(v) // 2, len(v) - 1})) if v else "-"

            def rows(c):
                r = [x for x in (d["classes"].get(c, {}).get("rows") or []) if x]
                return " / ".join(f"{x:.2g}" for x in r[-1][:3]) if r else "-"

            lines.append(f"| {sw[n]['label']} | {cls('embedding')} | {cls('lm_head')} | {cls('attention')} | "
                         f"{cls('mlp')} | {cls('norms')} | {rows('embedding')} | {rows('lm_head')} |")
        gs = [(n, d) for n, d in diag if any(x for c in d["classes"].values() for x in c["gsnr_frozen"])]
        if gs:
            lines += ["", "**SGD-SaI g-SNR** (each tensor's frozen g-SNR over sqrt(numel - 1), min-max over the "
                      "class; the current gradient's g-SNR over the frozen one, min / median / max over the class, at "
                      "the last logged step)", "", "| configuration | class | frozen / sqrt(n-1) | current / frozen |",
                      "| --- | --- | --- | --- |"]
            for n, d in gs:
                for c, v in d["classes"].items():
                    fr = [x for x in v["gsnr_frozen"] if x]
                    lv = [x for x in v["gsnr_live_over_frozen"] if x]
                    if fr:
                        lines.append(f"| {sw[n]['label']} | {c} | {fr[-1][0]:.3g}-{fr[-1][1]:.3g} | "
                                     f"{' / '.join(f'{x:.3g}' for x in lv[-1]) if lv else '-'} |")
    missing = summary.get("not_run") or []
    if missing:
        lines += ["", f"Not run (time budget): {', '.join(missing)}"]
    return "\n".join(lines)


COLORS = {"adamw_pg": "k", "adamw": "0.55", "swan": "tab:blue", "sinkgd": "tab:green", "sgdsai": "tab:red",
          "swan_stateless": "tab:cyan", "sinkgd_stateless": "tab:olive", "sgdsai_adamw": "tab:orange",
          "swan_rowclip": "tab:purple"}


SHORT = {"adamw_pg": "AdamW per-group", "swan": "SWAN", "sinkgd": "SinkGD", "adamw": "AdamW one LR"}


def plot(summary: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sw = summary["sweeps"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    ax, ax2, ax3, ax4 = axes.ravel()
    shown = [n for n in COLORS if n in sw and sw[n].get("runs_at_best")]
    for n in shown:
        i = sw[n]
        cs = [summary["curves"].get(r) or [] for r in i["runs_at_best"]]
        cs = [c for c in cs if c]
        if not cs:
            continue
        k = min(len(c) for c in cs)
        xs = [cs[0][j][1] / 1e6 for j in range(k)]
        lo = [min(c[j][2] for c in cs) for j in range(k)]
        hi = [max(c[j][2] for c in cs) for j in range(k)]
        mean = [sum(c[j][2] for c in cs) / len(cs) for j in range(k)]
        ax.plot(xs, mean, color=COLORS[n], label=f"{i['label']} ({len(cs)} seeds)")
        ax.fill_between(xs, lo, hi, color=COLORS[n], alpha=0.2, lw=0)
    if summary.get("target_val_loss"):
        ax.axhline(summary["target_val_loss"], color="grey", lw=0.8, ls=":", label="target (per-group AdamW)")
        ax.set_ylim(summary["target_val_loss"] - 0.3, summary["target_val_loss"] + 1.5)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss")
    ax.set_title("validation loss at each best point: seed mean, min-max band")
    ax.legend(fontsize=7)
    for n in ("adamw_pg", "swan", "sinkgd", "adamw"):
        i = sw.get(n)
        if not i or "grid" not in i:
            continue
        by_ratio: dict = {}
        for p in i["grid"].values():
            by_ratio.setdefault(p["ratio"], []).append((p["lr"], p["final_val_loss"]))
        for r, pts in sorted(by_ratio.items(), key=lambda kv: kv[0] or 0):
            pts.sort()
            ax2.plot([p[0] for p in pts], [p[1] if p[1] is not None else math.nan for p in pts], "o-",
                     color=COLORS[n], alpha=0.35 + 0.65 * _same(r, i["best_ratio"]),
                     label=f"{SHORT[n]} r={r:.3g}" if r else SHORT[n])
    ax2.set_xscale("log")
    ax2.set_xlabel("matrix LR")
    ax2.set_ylabel("final validation loss (seed 0)")
    ax2.set_title("LR sweeps (one line per fallback ratio; solid: best ratio)")
    if summary.get("target_val_loss"):
        ax2.set_ylim(summary["target_val_loss"] - 0.2, summary["target_val_loss"] + 1.2)
    ax2.legend(fontsize=6, ncol=2)
    for n in ("adamw_pg", "sgdsai", "sgdsai_adamw", "swan", "swan_stateless"):
        d = (sw.get(n) or {}).get("diag")
        if not d:
            continue
        for c, ls in (("embedding", "-"), ("lm_head", "--"), ("mlp", ":")):
            v = d["classes"].get(c, {}).get("update_rms")
            if v:
                ax3.plot(d["steps"], v, ls, color=COLORS.get(n, "k"), label=f"{sw[n]['label'][:28]}: {c}")
    ax3.set_yscale("log")
    ax3.set_xlabel("step")
    ax3.set_ylabel("update RMS (median over the class)")
    ax3.set_title("per-tensor update RMS at each best point (seed 0)")
    ax3.legend(fontsize=6)
    for n, i in sw.items():
        fl = (i.get("final_val_loss") or {})
        if fl.get("mean") is None or i.get("optimizer_state_mib") is None or i.get("section") == "budget":
            continue
        ax4.errorbar([i["optimizer_state_mib"]], [fl["mean"]], yerr=[[fl["mean"] - fl["min"]], [fl["max"] - fl["mean"]]],
                     fmt="o", color=COLORS.get(n, "0.3"), capsize=3)
        ax4.annotate(i["label"][:34], (i["optimizer_state_mib"], fl["mean"]), fontsize=6, xytext=(4, 2),
                     textcoords="offset points")
    ax4.set_xlabel("optimizer state (MiB, this model)")
    ax4.set_ylabel("final validation loss (mean, min-max)")
    ax4.set_title("memory and quality of the same configuration")
    fig.suptitle(summary.get("setup", {}).get("title", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------ main
def base_config_and_data(config: str, extra: list[str]):
    """The plan's resolved base config and its token files (built once here, before any worker
    starts, so the workers only read the cache)."""
    from launch import train
    from launch.data import prepare

    cfg, _ = train.parse_args(["-c", str(ROOT / config), *extra])
    return cfg, prepare(cfg.data.corpus, cfg.data.vocab_size, cfg.data.val_fraction, cfg.data.cache_dir, verbose=False)


def setup_info(plan_name: str, plan: dict, results: dict, extra: list[str], cfg, data) -> dict:
    import torch

    from launch.model import PRESETS

    t = cfg.training
    seen = t.steps * t.batch_size * cfg.data.seq_len
    unique = int(data.meta["tokens"]["train"])
    params = next((r.get("params") for r in results.values() if r.get("params")), None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = f"LLaMA {params / 1e6:.1f}M params" if params else "LLaMA"
    shape = PRESETS[cfg.model.preset] | {k: v for k, v in cfg.model.model_dump().items() if k in PRESETS["tiny"] and v}
    model += (f" (width {shape['hidden_size']}, {shape['num_layers']} blocks, MLP {shape['intermediate_size']}, "
              f"vocab {data.vocab_size}), seq {cfg.data.seq_len}")
    tokens = (f"{seen:,} tokens seen ({t.steps} steps x {t.batch_size} x {cfg.data.seq_len}) = {seen / unique:.2f} passes "
              f"over {unique:,} unique training tokens of {cfg.data.corpus}; {data.meta['tokens']['val']:,} validation tokens; "
              f"warm-up {t.warmup_steps} then cosine to {t.min_lr_ratio:g} x peak; grad clip {t.grad_clip:g}; "
              f"autocast {t.autocast}")
    return {"plan": plan_name, "config": plan["config"], "why": plan["why"], "device": device, "model": model,
            "tokens": tokens, "steps": t.steps, "tokens_seen": seen, "unique_train_tokens": unique,
            "title": f"{plan_name}: {model}; {device}; {seen / 1e6:.2f}M tokens ({seen / unique:.1f} passes)",
            "overrides": extra}


def centres_from(path: str | None, sweeps: list[Sweep]) -> tuple[dict, str]:
    """Each sweep's (lr, ratio) centre from an earlier study's best points (same sweep names)."""
    if not path:
        return {}, "plan defaults"
    p = Path(path)
    if not p.exists():
        print(f"[centres] {p} not found: the plan's default centres are used", flush=True)
        return {}, f"plan defaults ({p} not found)"
    earlier = json.loads(p.read_text()).get("sweeps", {})
    out = {}
    for s in sweeps:
        e = earlier.get(s.name) or {}
        if e.get("best_lr"):
            out[s.name] = (e["best_lr"], e.get("best_ratio") if e.get("best_ratio") is not None else s.ratio)
    return out, f"best points of {p} ({len(out)} sweeps)"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plan", default="kjv23m", choices=sorted(PLANS))
    ap.add_argument("--sweeps", default="", help="comma list: only these sweeps (default: the plan's all)")
    ap.add_argument("--workers", type=int, default=4, help="training processes at once, sharing the GPU (0: in-process)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds after which no run is started (0: none)")
    ap.add_argument("--runs-dir", default="runs/convergence")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="results file suffix (default: <plan>_<device>)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: 1-block tiny model, 6 steps, plus shapes")
    ap.add_argument("--report-only", action="store_true", help="re-analyse --runs-dir without training")
    ap.add_argument("--resume-from", metavar="JSON", default=None,
                    help="a results file of an earlier study (its runs count as done; metrics from <stem>_runs/)")
    ap.add_argument("--centres-from", metavar="JSON", default=None, help="centre each sweep on its best in this study")
    ap.add_argument("--no-diag", action="store_true", help="no per-tensor diagnostics")
    ap.add_argument("--no-timing", action="store_true", help="no exclusive timing runs")
    ap.add_argument("--set", action="append", default=[], help="extra launch/train.py override, e.g. --set=--data.seq_len=512")
    args = ap.parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # `timeout` stops us: clean up the workers
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))

    plan = PLANS[args.plan]
    sweeps = list(plan["sweeps"])
    if args.sweeps:
        wanted = [x for x in args.sweeps.split(",") if x]
        unknown = [x for x in wanted if x not in {s.name for s in sweeps}]
        if unknown:  # before any training: a typo must not cost the study
            ap.error(f"--sweeps: unknown {unknown}; the plan has {[s.name for s in sweeps]}")
        needed, grow = set(wanted), True
        while grow:  # a sweep's dependencies come along
            deps = {d for s in sweeps if s.name in needed for d in (s.after, s.after_fallback_lr) if d}
            grow = not deps <= needed
            needed |= deps
        sweeps = [s for s in sweeps if s.name in needed]
    if args.quick:
        sweeps = [quick_sweep(s) for s in sweeps]
        TIMING.update(steps=6, skip=2)
    centres, centre_source = centres_from(args.centres_from, sweeps)
    if args.resume_from and not args.centres_from:  # re-analysing a study: the centres it used
        used = json.loads(Path(args.resume_from).read_text()).get("centres_used") or {}
        centres = {k: tuple(v) for k, v in used.items()}
        centre_source = json.loads(Path(args.resume_from).read_text()).get("setup", {}).get("centres", centre_source)
    runs_dir = Path(args.runs_dir)
    extra = (QUICK if args.quick else []) + args.set
    index = runs_dir / "index.json"
    done: dict[str, dict] = json.loads(index.read_text()) if index.exists() else {}
    earlier_timing = {}
    if args.resume_from:  # e.g. re-analyse a committed study: its runs, metrics from <stem>_runs/
        earlier = Path(args.resume_from)
        earlier_summary = json.loads(earlier.read_text())
        earlier_timing = earlier_summary.get("timing") or {}
        for r in earlier_summary["runs"]:
            done.setdefault(r["name"], {**r, "run_dir": str(earlier.with_name(f"{earlier.stem}_runs") / f"{r['name']}.jsonl")})
    done = {n: r for n, r in done.items() if r.get("status") != NOT_STARTED or args.report_only}
    t_start = time.time()
    cfg, data = base_config_and_data(plan["config"], extra)
    timings = (json.loads((runs_dir / "timing.json").read_text()) if (runs_dir / "timing.json").exists()
               else earlier_timing)
    if not args.report_only:
        runs_dir.mkdir(parents=True, exist_ok=True)
        deadline = t_start + args.time_budget if args.time_budget else math.inf
        timings = run_study(plan, sweeps, centres, runs_dir, extra, done, args.workers, args.threads, deadline,
                            not args.no_diag, cfg.training.steps, not args.no_timing) or timings
    results = {n: r for n, r in done.items() if r.get("sweep") in {s.name for s in sweeps}}
    summary = analyse(plan, sweeps, results, centres, timings)
    summary["setup"] = setup_info(args.plan, plan, results, extra, cfg, data)
    summary["setup"]["centres"] = centre_source
    summary["not_run"] = sorted(n for n, r in results.items() if not _attempted(r))
    summary["runs"] = list(results.values())
    summary["timing"] = timings
    summary["centres_used"] = {k: list(v) for k, v in centres.items()}
    summary["elapsed_s"] = round(time.time() - t_start, 1)
    tag = args.tag or f"{args.plan}_{summary['setup']['device'].replace('NVIDIA ', '').split()[0].lower()}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"convergence_{tag}"
    table = markdown(summary)
    print(table)
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    png = plot(summary, stem.with_suffix(".png"))
    keep = out / f"convergence_{tag}_runs"
    keep.mkdir(exist_ok=True)
    reported = {i["runs_at_best"][0] for i in summary["sweeps"].values() if i.get("runs_at_best")}
    for n, r in results.items():  # every run's metrics next to the table; the diagnostics the report reads
        src = metrics_file(r.get("run_dir", ""))
        dst = keep / f"{n}.jsonl"
        if src.exists() and src.resolve() != dst.resolve():
            shutil.copy(src, dst)
        d = diag_file(r.get("run_dir", ""))
        if n in reported and d is not None and d.resolve() != (keep / f"{n}.diag.jsonl").resolve():
            shutil.copy(d, keep / f"{n}.diag.jsonl")
    for name, t in timings.items():
        src = metrics_file(runs_dir / f"timing_{name}")
        if src.exists():
            shutil.copy(src, keep / f"timing_{name}.jsonl")
    print(f"[written] {stem}.json, {stem}.md{', ' + png if png else ''}, {keep}/ ({summary['elapsed_s']}s)")
    return summary


if __name__ == "__main__":
    main()
