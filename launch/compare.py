r"""Compare runs of launch/train.py: their loss curves in one picture and a table of where each ended.

    stateless-opt-compare runs/quickstart-swan runs/quickstart-sinkgd runs/quickstart-adamw
    python -m stateless_opt.launch.compare runs/            # every run folder under runs/
    stateless-opt-compare runs/quickstart-* --out swan_vs_adamw.png

The table (also printed as Markdown with ``--markdown``): optimizer, backend and ranks, steps done,
tokens seen, final train loss (mean of the last 10 steps), final validation loss, training time and
throughput. The picture (default ``<common parent>/compare.png``): each run's training loss (running
mean) and its validation points in one colour, with the corpus's unigram entropy as a reference.
``train.py`` draws each run's own ``loss.png`` with the same function.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python launch/compare.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "launch"

import yaml  # noqa: E402

from . import runs as R  # noqa: E402
from .config import UserError, console_script  # noqa: E402


@dataclass
class Run:
    path: Path
    records: list[dict]
    summary: dict = field(default_factory=dict)  # {} while the run has not finished
    config: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def starts(self) -> list[dict]:
        return R.read_starts(self.path / R.METRICS)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.records if key in r]
        return ([s for s, _ in pts], [v for _, v in pts]) if pts else ([], [])


def load_run(path: Path) -> Run:
    path = Path(path)
    metrics = path / R.METRICS
    if not metrics.exists():
        raise UserError(f"{path}: no {R.METRICS} (not a run folder of launch/train.py)")
    config = path / "config.yaml"
    return Run(path, R.read_metrics(metrics), R.summary(path),
               (yaml.safe_load(config.read_text()) or {}) if config.exists() else {})


def find_runs(paths: list[str | Path]) -> list[Run]:
    """Run folders from the arguments; a folder without metrics stands for the run folders inside it."""
    out: list[Run] = []
    for p in map(Path, paths):
        if (p / R.METRICS).exists():
            out.append(load_run(p))
        elif p.is_dir() and (inner := sorted(q.parent for q in p.glob(f"*/{R.METRICS}"))):
            out.extend(load_run(q) for q in inner)
        else:
            raise UserError(f"{p}: not a run folder (no {R.METRICS} in it or in its sub-folders)")
    if not out:
        raise UserError("no runs given")
    return out


# --------------------------------------------------------------------------- table
def rows(runs: list[Run]) -> list[dict]:
    out = []
    for run in runs:
        s, c, train = run.summary, run.config, [r for r in run.records if "train_loss" in r]
        world = s.get("world_size") or next((r.get("world_size") for r in reversed(run.starts)), "?")
        last = train[-1] if train else {}
        tail = [r["train_loss"] for r in train[-10:]]
        val = R.final_record(run.records, "val_loss")
        seconds = last.get("time_s")
        out.append({
            "run": run.label,
            "optimizer": s.get("optimizer") or c.get("optimizer", {}).get("name", "?"),
            "backend": f"{s.get('backend') or c.get('backend', {}).get('name', '?')} x{world}",
            "steps": f"{last.get('step', 0)}/{s.get('steps') or c.get('training', {}).get('steps', '?')}",
            "tokens": last.get("tokens"),
            "train loss": sum(tail) / len(tail) if tail else None,
            "val loss": val["val_loss"] if val else None,
            "time": seconds,
            "tok/s": last.get("tokens") / seconds if seconds and last.get("tokens") else None,
        })
    return out


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("train loss", "val loss"):
        return f"{value:.4f}"
    if key == "tokens":
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value:,}"
    if key == "time":
        return f"{value:.0f} s" if value < 600 else f"{value / 60:.1f} min"
    if key == "tok/s":
        return f"{value:,.0f}"
    return str(value)


def format_table(table: list[dict], markdown: bool = False) -> str:
    keys = list(table[0])
    cells = [[_cell(k, r[k]) for k in keys] for r in table]
    if markdown:
        lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    width = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, width)))  # noqa: E731
    return "\n".join([line(keys)] + [line(c) for c in cells])


# --------------------------------------------------------------------------- picture
def _running_mean(ys: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot(runs: list[Run], out: Path, title: str | None = None, baseline: float | None = None) -> Path:
    """Training loss (raw for one run, running means for several) and validation points of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    single = len(runs) == 1
    for i, run in enumerate(runs):
        color = f"C{i}"
        xs, ys = run.series("train_loss")
        if xs:
            k = max(1, len(ys) // 30)
            if single:
                ax.plot(xs, ys, lw=0.8, alpha=0.45, color=color, label="train (per step)")
            ax.plot(xs, _running_mean(ys, k), lw=1.6, color=color,
                    label=(f"train (running mean of {k})" if single else f"{run.label} train") if k > 1 or not single
                    else None)
        vx, vy = run.series("val_loss")
        if vx:
            ax.plot(vx, vy, "o--" if not single else "o-", ms=4, lw=1.0 if not single else 1.6, color=color,
                    label="validation" if single else f"{run.label} val")
    base = baseline if baseline is not None else next((r.summary.get("unigram_entropy") for r in runs
                                                       if r.summary.get("unigram_entropy")), None)
    if base:
        ax.axhline(base, color="gray", ls=":", lw=1, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or ("Loss" if single else "Loss of " + ", ".join(r.label for r in runs)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="stateless-opt-compare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("runs", nargs="+", help="run folders (or folders of run folders)")
    ap.add_argument("--out", help="picture to write (default: compare.png in the runs' common parent folder)")
    ap.add_argument("--no-plot", action="store_true", help="print the table only")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args(argv)
    runs = find_runs(args.runs)
    table = rows(runs)
    print(format_table(table, markdown=args.markdown))
    if not args.no_plot:
        parents = {r.path.resolve().parent for r in runs}
        out = Path(args.out) if args.out else (parents.pop() if len(parents) == 1 else Path(".")) / "compare.png"
        print(f"picture: {plot(runs, out)}")
    return table


def cli() -> None:
    """Console script ``stateless-opt-compare``."""
    console_script(main)


if __name__ == "__main__":
    cli()
