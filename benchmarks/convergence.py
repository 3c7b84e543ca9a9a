r"""Convergence benchmark: validation loss per token for AdamW, SWAN, SinkGD and SGD-SaI on real text.

Every run is one ``launch/train.py`` run of ``configs/convergence.yaml`` (same model, data order,
tokens and warm-up + cosine schedule), differing only in optimizer, peak LR and seed:

    python benchmarks/convergence.py --workers 6 --time-budget 260 --tag h100      # GPU: the study
    python benchmarks/convergence.py --quick --workers 2                           # CPU smoke run
    python benchmarks/convergence.py --report-only --runs-dir runs/convergence --tag h100
    python benchmarks/convergence.py --resume-from benchmarks/results/convergence_h100.json --ablations all \
        --tag h100_ablations --workers 8                     # labelled ablations around a committed study

Rounds (all inside one call, so a single GPU lease does the whole study):
1. seed 0 on each optimizer's LR grid (``GRIDS``: 5 points, sqrt(10) ~ 3.2x apart);
2. where the best LR sits on the grid's edge, one more point beyond it; seed 1 at each current best;
3. seed 1 at a best that moved in round 2.
Runs are spread over ``--workers`` processes sharing one GPU (the model is small, one run leaves the
GPU mostly idle); each worker imports torch once and runs many trainings. ``--time-budget`` stops
*starting* runs after that many seconds: what finished is reported, what did not is listed.

Report (``benchmarks/results/convergence_<tag>.json`` / ``.png`` / ``.md``, run metrics under
``convergence_<tag>_runs/``): each optimizer's best LR (lowest final validation loss, mean over the
seeds run there) and whether it lies strictly inside the grid; final validation loss (mean, min-max over
seeds); tokens each needs to reach AdamW's final validation loss (linear interpolation between
evaluations; "not reached" when it never does) and the ratio to AdamW's own tokens; wall time and peak
GPU memory. Wall times of runs that shared the GPU are comparable only roughly.
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
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BASE_CONFIG = ROOT / "configs" / "convergence.yaml"
OPTIMIZERS = ("adamw", "swan", "sinkgd", "sgdsai")
LABELS = {"adamw": "AdamW", "swan": "SWAN", "sinkgd": "SinkGD", "sgdsai": "SGD-SaI"}
_R = math.sqrt(10.0)
# Peak LRs. SWAN/SinkGD: the matrix LR; their Adam fallback (embeddings, head, norms) runs at 20x it,
# the papers' "matrix LR = 0.05 x Adam LR" recipe. Centres from the quickstart sweep, scaled down for a
# 12x wider model.
GRIDS = {
    "adamw": [1e-4 * _R**k for k in range(5)],  # 1e-4 .. 1e-2
    "swan": [1e-4 * _R**k for k in range(5)],
    "sinkgd": [1e-4 * _R**k for k in range(5)],
    "sgdsai": [3e-4 * _R**k for k in range(5)],  # 3e-4 .. 3e-2
}
# Labelled ablations (``--ablations``), never the default: "<optimizer>+<label>" -> (extra overrides, LRs
# as multiples of that optimizer's best LR ("around") or an absolute grid). Seed 0 only.
ABLATIONS = {
    "sgdsai+noclip": (["--training.grad_clip=0"], {"around": [1 / _R, 1.0, _R]}),
    # the paper's Alg. 1: every g-SNR divided by the max over all tensors (~sqrt(numel) of the embedding)
    "sgdsai+maxnorm": (["--optimizer.sgdsai.max_normalized_gsnr=true"], {"grid": [0.1 * _R**k for k in range(4)]}),
    "swan+stored_rows": (["--optimizer.swan.gradnorm_axis=stored_rows"], {"around": [1.0]}),
    "swan+fallback10": (["--optimizer.swan.fallback_lr_ratio=10"], {"around": [1.0]}),
    "swan+fallback40": (["--optimizer.swan.fallback_lr_ratio=40"], {"around": [1.0]}),
    "sinkgd+fallback10": (["--optimizer.sinkgd.fallback_lr_ratio=10"], {"around": [1.0]}),
    "sinkgd+fallback40": (["--optimizer.sinkgd.fallback_lr_ratio=40"], {"around": [1.0]}),
}
QUICK = [  # CPU smoke run: tiny model, a few steps, a 3-point grid (checks the pipeline, not the optimizers)
    "--model.preset=tiny", "--model.num_layers=2", "--data.seq_len=64", "--model.max_position_embeddings=64",
    "--training.steps=12", "--training.warmup_steps=2", "--training.eval_every=3", "--training.batch_size=8",
    "--training.eval_batch_size=8", "--training.eval_batches=2", "--training.autocast=none",
]


NOT_STARTED = "not started (time budget)"


# ------------------------------------------------------------------------------------ runs
def run_name(opt: str, lr: float, seed: int) -> str:
    return f"{opt}_lr{lr:.3g}_s{seed}"


def run_argv(opt: str, lr: float, seed: int, runs_dir: Path, extra: list[str]) -> list[str]:
    """``opt`` is an optimizer or an ablation "<optimizer>+<label>" (its overrides come last)."""
    base = opt.partition("+")[0]
    ablation = ABLATIONS[opt][0] if "+" in opt else []
    return [
        "-c", str(BASE_CONFIG), "--optimizer", base, f"--optimizer.{base}.lr={lr!r}", f"--training.seed={seed}",
        f"--run.name={run_name(opt, lr, seed)}", f"--run.dir={runs_dir / run_name(opt, lr, seed)}", *extra, *ablation,
    ]


def ablation_specs(results: list[dict], names: list[str]) -> list[tuple[str, float, int]]:
    """Seed-0 runs of each ablation, at LRs placed around its optimizer's best LR (or its own grid)."""
    specs = []
    for name in names:
        best = best_lr(results, name.partition("+")[0])
        if best is None:
            continue
        lrs = ABLATIONS[name][1]
        specs += [(name, lr, 0) for lr in lrs.get("grid") or [best * m for m in lrs["around"]]]
    return specs


def _worker_init(threads: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


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


def run_round(pool, specs: list[tuple[str, float, int]], runs_dir: Path, extra: list[str], deadline: float,
              threads: int, done: dict) -> None:
    jobs = [
        {"spec": {"optimizer": o, "lr": lr, "seed": s}, "argv": run_argv(o, lr, s, runs_dir, extra),
         "run_dir": str(runs_dir / run_name(o, lr, s)), "deadline": deadline, "threads": threads}
        for o, lr, s in specs if run_name(o, lr, s) not in done
    ]
    for res in pool.imap_unordered(_train_one, jobs):
        name = run_name(res["optimizer"], res["lr"], res["seed"])
        done[name] = res
        (runs_dir / "index.json").write_text(json.dumps(done, indent=1))  # a killed study can still be reported
        print(f"  {name:<28} {res['status'][:60]:<20} val {res.get('final_val_loss') or float('nan'):.4f}  "
              f"{res.get('wall_s', 0):6.1f}s", flush=True)


# ------------------------------------------------------------------------------------ analysis
def _attempted(res: dict) -> bool:
    return res.get("status") != NOT_STARTED


def _loss(res: dict) -> float:
    v = res.get("final_val_loss")
    return v if res.get("status") == "ok" and v is not None and math.isfinite(v) else math.inf


def best_lr(results: list[dict], opt: str) -> float | None:
    """The LR with the lowest final validation loss, averaged over the seeds run at that LR."""
    by_lr: dict[float, list[float]] = {}
    for r in results:
        if r["optimizer"] == opt and r.get("status", "").startswith(("ok", "diverged")):
            by_lr.setdefault(r["lr"], []).append(_loss(r))
    if not by_lr:
        return None
    return min(by_lr, key=lambda lr: (sum(by_lr[lr]) / len(by_lr[lr]), lr))


def next_specs(results: list[dict], grids: dict[str, list[float]]) -> list[tuple[str, float, int]]:
    """Round 2/3: extend an edge-best grid by one point; seed 1 at every current best."""
    specs = []
    for opt, grid in grids.items():
        best = best_lr(results, opt)
        if best is None:
            continue
        lrs = sorted({r["lr"] for r in results if r["optimizer"] == opt} | set(grid))
        if best == lrs[0]:
            specs.append((opt, best / _R, 0))
        elif best == lrs[-1]:
            specs.append((opt, best * _R, 0))
        specs.append((opt, best, 1))
    return specs


def metrics_file(run_dir: str | Path) -> Path:
    """A run's metrics.jsonl: inside its run dir, or the copy a results folder keeps (``*.jsonl``)."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.suffix == ".jsonl" else run_dir / "metrics.jsonl"


def read_metrics(run_dir: Path) -> tuple[list[tuple[int, int, float]], int]:
    """[(step, tokens, val_loss)] and tokens per step from a run's metrics.jsonl."""
    path = metrics_file(run_dir)
    if not path.exists():
        return [], 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    per_step = next((r["tokens"] // r["step"] for r in rows if "tokens" in r and r["step"]), 0)
    vals = [(r["step"], r["step"] * per_step, r["val_loss"]) for r in rows if "val_loss" in r]
    return vals, per_step


def tokens_to_reach(curve: list[tuple[int, int, float]], target: float) -> float | None:
    """First crossing of ``target`` by the validation curve, linearly interpolated in tokens."""
    for (s0, t0, v0), (s1, t1, v1) in zip(curve, curve[1:]):
        if v1 <= target:
            if v0 <= target:
                return float(t0)
            return t0 + (v0 - target) / (v0 - v1) * (t1 - t0)
    return None


def analyse(results: list[dict], runs_dir: Path) -> dict:
    from stateless_opt import registry

    curves = {}
    for r in results:
        curve, _ = read_metrics(Path(r.get("run_dir") or runs_dir / run_name(r["optimizer"], r["lr"], r["seed"])))
        curves[run_name(r["optimizer"], r["lr"], r["seed"])] = curve
    out: dict = {"optimizers": {}}
    for opt in OPTIMIZERS:
        best = best_lr(results, opt)
        if best is None:
            continue
        spec = registry.find(opt)  # None for the AdamW baseline
        tried = sorted({r["lr"] for r in results if r["optimizer"] == opt and _attempted(r)})
        finals = [r for r in results if r["optimizer"] == opt and r["lr"] == best and r.get("status") == "ok"]
        losses = [r["final_val_loss"] for r in finals]
        sweep = {}
        for lr in tried:
            rs = [r for r in results if r["optimizer"] == opt and r["lr"] == lr and _attempted(r)]
            sweep[f"{lr:.3g}"] = {"final_val_loss": [_loss(r) if math.isfinite(_loss(r)) else None for r in rs],
                                  "status": [r["status"][:80] for r in rs], "seeds": [r["seed"] for r in rs]}
        out["optimizers"][opt] = {
            "best_lr": best,
            "fallback_lr": best * spec.config().fallback_lr_ratio if spec and spec.splits_rules else None,
            "lrs_tried": tried,
            "best_strictly_inside_grid": tried[0] < best < tried[-1],
            "seeds_at_best": [r["seed"] for r in finals],
            "final_val_loss_mean": sum(losses) / len(losses) if losses else None,
            "final_val_loss_min": min(losses) if losses else None,
            "final_val_loss_max": max(losses) if losses else None,
            "wall_s_mean": sum(r["wall_s"] for r in finals) / len(finals) if finals else None,
            "train_wall_s_mean": (sum(r.get("wall_time_train_s") or 0 for r in finals) / len(finals)) if finals else None,
            "peak_gpu_gib": max((r.get("peak_gpu_bytes") or 0) for r in finals) / 2**30 if finals else None,
            "optimizer_state_mib": (finals[0].get("optimizer_state_bytes") or 0) / 2**20 if finals else None,
            "sweep": sweep,
            "runs_at_best": [run_name(opt, best, r["seed"]) for r in finals],
        }
    adam = out["optimizers"].get("adamw")
    if adam and adam["final_val_loss_mean"] is not None:
        # AdamW attains its (mean) final loss with its whole budget, by definition of the target: the
        # ratio is tokens-to-target over that budget (AdamW's own per-seed crossings are listed too).
        target = adam["final_val_loss_mean"]
        out["target_val_loss"] = target
        ref = max((c[-1][1] for n, c in curves.items() if n in adam["runs_at_best"] and c), default=None)
        out["adamw_tokens"] = ref
        for opt, info in out["optimizers"].items():
            per_seed = [tokens_to_reach(curves[n], target) for n in info["runs_at_best"]]
            info["tokens_to_target"] = per_seed
            reached = [t for t in per_seed if t is not None]
            info["tokens_to_target_mean"] = sum(reached) / len(reached) if len(reached) == len(per_seed) and reached else None
            info["ratio_to_adamw"] = (info["tokens_to_target_mean"] / ref) if (ref and info["tokens_to_target_mean"]) else None
            if opt == "adamw":
                info["ratio_to_adamw"] = 1.0
            info["final_val_loss_vs_adamw"] = (info["final_val_loss_mean"] / target - 1) if info["final_val_loss_mean"] else None
    out["ablations"] = {}
    for name in sorted({r["optimizer"] for r in results if "+" in r["optimizer"]}):
        base = name.partition("+")[0]
        best = best_lr(results, name)
        runs = [r for r in results if r["optimizer"] == name and _attempted(r)]
        main = out["optimizers"].get(base, {})
        main_seed0 = next((r for r in results if r["optimizer"] == base and r["lr"] == main.get("best_lr")
                           and r["seed"] == 0), None)
        at_best = next((r for r in runs if r["lr"] == best), None)
        out["ablations"][name] = {
            "overrides": ABLATIONS.get(name, ([], {}))[0],
            "lrs_tried": sorted(r["lr"] for r in runs),
            "best_lr": best,
            "final_val_loss": _loss(at_best) if at_best and math.isfinite(_loss(at_best)) else None,
            "default_final_val_loss_seed0": _loss(main_seed0) if main_seed0 else None,
            "status": {f"{r['lr']:.3g}": r["status"][:80] for r in runs},
        }
    out["curves"] = {n: c for n, c in curves.items()}
    return out


def markdown(summary: dict) -> str:
    meta = summary.get("setup", {})
    lines = [
        f"Convergence on {meta.get('device', '?')}: {meta.get('model', '')}; {meta.get('tokens', '')}",
        "",
        "| optimizer | best peak LR (grid) | inside grid | final val loss (mean; min-max; seeds) | vs AdamW | "
        "tokens to AdamW's final loss | ratio to AdamW | train wall s | peak GPU GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for opt, i in summary["optimizers"].items():
        grid = ", ".join(f"{x:.2g}" for x in i["lrs_tried"])
        fb = f" (fallback {i['fallback_lr']:.2g})" if i.get("fallback_lr") else ""
        loss = (f"{i['final_val_loss_mean']:.4f}; {i['final_val_loss_min']:.4f}-{i['final_val_loss_max']:.4f}; "
                f"{len(i['seeds_at_best'])}" if i["final_val_loss_mean"] is not None else "-")
        vs = f"{100 * i['final_val_loss_vs_adamw']:+.2f}%" if i.get("final_val_loss_vs_adamw") is not None else "-"
        tok = i.get("tokens_to_target") or []
        tok_txt = ", ".join("not reached" if t is None else f"{t / 1e6:.3f}M" for t in tok) or "-"
        ratio = f"{i['ratio_to_adamw']:.2f}x" if i.get("ratio_to_adamw") else ("not reached" if None in tok else "-")
        mem = f"{i['peak_gpu_gib']:.2f}" if i.get("peak_gpu_gib") else "-"
        wall = f"{i['train_wall_s_mean']:.0f}" if i.get("train_wall_s_mean") else "-"
        lines.append(f"| {LABELS[opt]} | {i['best_lr']:.3g}{fb} ({grid}) | {'yes' if i['best_strictly_inside_grid'] else 'NO'} "
                     f"| {loss} | {vs} | {tok_txt} | {ratio} | {wall} | {mem} |")
    if "target_val_loss" in summary:
        lines.append(f"\nTarget: AdamW's final validation loss {summary['target_val_loss']:.4f} (mean over its seeds), "
                     f"which AdamW attains with its whole budget of {summary['adamw_tokens'] / 1e6:.2f}M tokens (ratio 1 "
                     "by definition; its seeds' own first crossings of the mean are listed).")
    if summary.get("ablations"):
        lines += ["", "Ablations (labelled; seed 0; never the default):", "",
                  "| ablation | overrides | LRs tried | best LR | final val loss | default, seed 0 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, a in summary["ablations"].items():
            fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
            lines.append(f"| {name} | {' '.join(a['overrides'])} | {', '.join(f'{x:.2g}' for x in a['lrs_tried'])} | "
                         f"{a['best_lr']:.3g} | {fmt(a['final_val_loss'])} | {fmt(a['default_final_val_loss_seed0'])} |")
    missing = summary.get("not_run") or []
    if missing:
        lines.append(f"Not run (time budget): {', '.join(missing)}")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"adamw": "k", "swan": "tab:blue", "sinkgd": "tab:green", "sgdsai": "tab:red"}
    for opt, i in summary["optimizers"].items():
        for k, name in enumerate(i["runs_at_best"]):
            c = summary["curves"].get(name) or []
            if c:
                ax.plot([t / 1e6 for _, t, _ in c], [v for _, _, v in c], color=colors[opt], alpha=0.9 if k == 0 else 0.5,
                        ls="-" if k == 0 else "--", label=f"{LABELS[opt]} lr {i['best_lr']:.2g}" if k == 0 else None)
        xs = [float(lr) for lr in i["sweep"]]
        ys = [min([v for v in s["final_val_loss"] if v is not None] or [math.nan]) for s in i["sweep"].values()]
        ax2.plot(xs, ys, "o-", color=colors[opt], label=LABELS[opt])
    if "target_val_loss" in summary:
        ax.axhline(summary["target_val_loss"], color="grey", lw=0.8, ls=":", label="AdamW final")
    finals = [i["final_val_loss_mean"] for i in summary["optimizers"].values() if i["final_val_loss_mean"]]
    if finals:
        ax.set_ylim(min(finals) - 0.15, min(finals) + 1.6)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss at each optimizer's best LR (dashed: seed 1)")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_xlabel("peak LR (SWAN/SinkGD: matrix LR)")
    ax2.set_ylabel("final validation loss (best seed)")
    ax2.set_title("LR sweep")
    if finals:
        ax2.set_ylim(min(finals) - 0.1, min(finals) + 1.5)
    ax2.legend(fontsize=8)
    fig.suptitle(summary.get("setup", {}).get("title", ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------ main
def base_config_and_data(extra: list[str]):
    """The study's resolved base config and its token files (built once here, before any worker starts,
    so the workers only read the cache)."""
    from launch import train
    from launch.data import prepare

    cfg, _ = train.parse_args(["-c", str(BASE_CONFIG), *extra])
    return cfg, prepare(cfg.data.corpus, cfg.data.vocab_size, cfg.data.val_fraction, cfg.data.cache_dir, verbose=False)


def setup_info(results: list[dict], extra: list[str], cfg, data) -> dict:
    import torch

    from launch.model import PRESETS

    t = cfg.training
    seen = t.steps * t.batch_size * cfg.data.seq_len
    unique = int(data.meta["tokens"]["train"])
    params = next((r.get("params") for r in results if r.get("params")), None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = f"LLaMA {params / 1e6:.1f}M params" if params else "LLaMA"
    shape = PRESETS[cfg.model.preset] | {k: v for k, v in cfg.model.model_dump().items() if k in PRESETS["tiny"] and v}
    model += (f" (width {shape['hidden_size']}, {shape['num_layers']} blocks, MLP {shape['intermediate_size']}, "
              f"vocab {data.vocab_size}), seq {cfg.data.seq_len}")
    tokens = (f"{seen:,} tokens seen ({t.steps} steps x {t.batch_size} x {cfg.data.seq_len}) = {seen / unique:.2f} passes "
              f"over {unique:,} unique training tokens; {data.meta['tokens']['val']:,} validation tokens")
    return {"device": device, "model": model, "tokens": tokens, "steps": t.steps, "warmup_steps": t.warmup_steps,
            "min_lr_ratio": t.min_lr_ratio, "eval_every": t.eval_every, "grad_clip": t.grad_clip,
            "autocast": t.autocast, "tokens_seen": seen, "unique_train_tokens": unique,
            "title": f"{model}; {device}; {seen / 1e6:.2f}M tokens ({seen / unique:.1f} epochs)", "overrides": extra}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4, help="training processes at once (they share the GPU)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per worker")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds after which no run is started (0: none)")
    ap.add_argument("--runs-dir", default="runs/convergence")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default=None, help="results file suffix (default: the device)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, 12 steps, 3-point grids")
    ap.add_argument("--report-only", action="store_true", help="re-analyse --runs-dir without training")
    ap.add_argument("--resume-from", metavar="JSON", default=None,
                    help="a results file of an earlier study (its runs count as done; metrics from <stem>_runs/)")
    ap.add_argument("--ablations", default="", help=f"comma list of labelled ablations to run after the study, or "
                    f"'all': {', '.join(ABLATIONS)}")
    ap.add_argument("--set", action="append", default=[], help="extra launch/train.py override, e.g. --set=--data.seq_len=512")
    args = ap.parse_args(argv)
    ablations = list(ABLATIONS) if args.ablations == "all" else [a for a in args.ablations.split(",") if a]
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:  # before any training: a typo must not cost the study
        ap.error(f"--ablations: unknown {unknown}; choose from {list(ABLATIONS)}")

    runs_dir = Path(args.runs_dir)
    opts = [o for o in args.optimizers.split(",") if o]
    grids = {o: (GRIDS[o][1:4] if args.quick else GRIDS[o]) for o in opts}
    extra = (QUICK if args.quick else []) + args.set
    index = runs_dir / "index.json"
    done: dict[str, dict] = json.loads(index.read_text()) if index.exists() else {}
    if args.resume_from:  # e.g. run only the ablations of a committed study
        earlier = Path(args.resume_from)
        for r in json.loads(earlier.read_text())["runs"]:
            name = run_name(r["optimizer"], r["lr"], r["seed"])
            done.setdefault(name, {**r, "run_dir": str(earlier.with_name(f"{earlier.stem}_runs") / f"{name}.jsonl")})
    t_start = time.time()
    cfg, data = base_config_and_data(extra)
    if not args.report_only:
        runs_dir.mkdir(parents=True, exist_ok=True)
        deadline = t_start + args.time_budget if args.time_budget else math.inf
        with mp.get_context("spawn").Pool(args.workers, initializer=_worker_init, initargs=(args.threads,),
                                          maxtasksperchild=None) as pool:
            specs = [(o, lr, 0) for o in opts for lr in grids[o]]
            for k in range(3):
                print(f"[round {k + 1}] {len([s for s in specs if run_name(*s) not in done])} runs, "
                      f"{time.time() - t_start:.0f}s elapsed", flush=True)
                run_round(pool, specs, runs_dir, extra, deadline, args.threads, done)
                specs = [s for s in next_specs(list(done.values()), grids) if run_name(*s) not in done]
                if not specs:
                    break
            names = [a for a in ablations if a.partition("+")[0] in opts]
            if names:
                specs = ablation_specs(list(done.values()), names)
                print(f"[ablations] {len(specs)} runs, {time.time() - t_start:.0f}s elapsed", flush=True)
                run_round(pool, specs, runs_dir, extra, deadline, args.threads, done)
    results = [r for r in done.values() if r["optimizer"].partition("+")[0] in opts]
    summary = analyse(results, runs_dir)
    summary["setup"] = setup_info(results, extra, cfg, data)
    summary["not_run"] = sorted(run_name(r["optimizer"], r["lr"], r["seed"]) for r in results
                                if not _attempted(r))
    summary["runs"] = results
    summary["elapsed_s"] = round(time.time() - t_start, 1)
    tag = args.tag or summary["setup"]["device"].replace("NVIDIA ", "").split()[0].lower()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"convergence_{tag}"
    table = markdown(summary)
    print(table)
    stem.with_suffix(".md").write_text(table + "\n")
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    png = plot(summary, stem.with_suffix(".png"))
    metrics_out = out / f"convergence_{tag}_runs"
    metrics_out.mkdir(exist_ok=True)
    for r in results:  # keep every run's metrics file next to the table
        src = metrics_file(r.get("run_dir", ""))
        dst = metrics_out / f"{run_name(r['optimizer'], r['lr'], r['seed'])}.jsonl"
        if src.exists() and src.resolve() != dst.resolve():
            shutil.copy(src, dst)
    print(f"[written] {stem}.json, {stem}.md{', ' + png if png else ''}, {metrics_out}/")
    return summary


if __name__ == "__main__":
    main()
