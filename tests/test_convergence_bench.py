"""The convergence benchmark (benchmarks/convergence.py): how each sweep picks its points, extends an
edge best, chooses its best on seed 0 and seeds it, waits for the sweep it depends on; the report's
target, tokens-to-target and time columns; and one --quick study end to end on the CPU (training itself
is covered by test_train.py)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("convergence", Path(__file__).parents[1] / "benchmarks" / "convergence.py")
conv = importlib.util.module_from_spec(_spec)
sys.modules["convergence"] = conv  # dataclasses look their module up
_spec.loader.exec_module(conv)
Q = conv.Q


def res(sweep, lr, ratio, seed, loss, status="ok", **kw):
    return {"sweep": sweep, "lr": lr, "ratio": ratio, "seed": seed, "final_val_loss": loss, "status": status,
            "name": conv.run_name(sweep, lr, ratio, seed), "wall_s": 1.0, **kw}


def as_results(*rs):
    return {r["name"]: r for r in rs}


S2 = conv.Sweep("pg", "adamw", "per-group", 1e-3, 10.0)  # 3 x 3 grid
S1 = conv.Sweep("one", "adamw", "one LR", 1e-3, axes=("lr",), seeds=3)


def test_tokens_to_reach_interpolates_first_crossing():
    curve = [(0, 0, 8.0), (10, 100, 5.0), (20, 200, 4.0), (30, 300, 3.5)]
    assert conv.tokens_to_reach(curve, 4.5) == pytest.approx(150.0)  # halfway between 5.0 and 4.0
    assert conv.tokens_to_reach(curve, 4.0) == pytest.approx(200.0)
    assert conv.tokens_to_reach(curve, 3.0) is None  # never reached: reported as such
    assert conv.tokens_to_reach([(0, 0, 8.0), (10, 100, 3.0), (20, 200, 5.0)], 4.0) == pytest.approx(80.0)


def test_shapes_are_lattices_around_the_centre():
    grid = conv.initial_points(S2, 1e-3, 10.0)
    assert len(grid) == 9 and (1e-3 / Q, 10.0 * Q) in grid
    plus = conv.initial_points(conv.Sweep("p", "swan", "", 1e-3, 10.0, shape="plus"), 1e-3, 10.0)
    assert sorted(plus) == sorted([(1e-3, 10.0), (1e-3 / Q, 10.0), (1e-3 * Q, 10.0), (1e-3, 10 / Q), (1e-3, 10 * Q)])
    assert conv.initial_points(S1, 1e-3, None) == [(1e-3 / Q, None), (1e-3, None), (1e-3 * Q, None)]
    ratio_only = conv.Sweep("r", "sgdsai", "", 2e-3, 10.0, axes=("ratio",))
    assert conv.initial_points(ratio_only, 2e-3, 10.0) == [(2e-3, 10 / Q), (2e-3, 10.0), (2e-3, 10 * Q)]


def _grid_results(sweep, centre, loss_of):
    return as_results(*[res(sweep.name, lr, r, 0, loss_of(lr, r)) for lr, r in conv.initial_points(sweep, *centre)])


def test_edge_best_is_extended_along_its_own_line_then_seeded():
    # best at the smallest LR, middle ratio: one more point at lr/Q on that ratio; the ratio axis is fine
    done = _grid_results(S2, (1e-3, 10.0), lambda lr, r: math.log10(lr) + abs(math.log10(r) - 1))
    st = conv.sweep_state(S2, done, {"pg": S2}, {})
    assert st["stage"] == "extend" and len(st["want"]) == 1
    assert (st["want"][0]["lr"], st["want"][0]["ratio"], st["want"][0]["seed"]) == pytest.approx((1e-3 / Q**2, 10.0, 0))
    assert conv.inside(S2, conv.seed0_points(S2, done), st["best"]) == {"lr": False, "ratio": True}
    # in flight: nothing more is wanted from this sweep until it is back
    assert conv.sweep_state(S2, done, {"pg": S2}, {}, frozenset({st["want"][0]["name"]}))["want"] == []
    w = st["want"][0]
    done.update(as_results(res("pg", w["lr"], w["ratio"], 0, 9.0)))  # worse: the best is now inside
    st = conv.sweep_state(S2, done, {"pg": S2}, {})
    assert st["stage"] == "seeds" and st["best"] == pytest.approx((1e-3 / Q, 10.0))
    assert sorted(w["seed"] for w in st["want"]) == [1, 2]
    assert conv.inside(S2, conv.seed0_points(S2, done), st["best"]) == {"lr": True, "ratio": True}
    done.update(as_results(*[res("pg", x["lr"], x["ratio"], x["seed"], 1.0) for x in st["want"]]))
    assert conv.sweep_state(S2, done, {"pg": S2}, {})["stage"] == "done"


def test_extensions_are_capped():
    # a loss that keeps falling with the LR: at most MAX_EXTENSIONS extra points, then seeds anyway
    done = {}
    for _ in range(10):
        st = conv.sweep_state(S1, done, {"one": S1}, {})
        if st["stage"] != "grid" and st["stage"] != "extend":
            break
        done.update(as_results(*[res("one", w["lr"], None, w["seed"], math.log10(w["lr"])) for w in st["want"]]))
    assert st["stage"] == "seeds"
    assert len(conv.seed0_points(S1, done)) == 3 + conv.MAX_EXTENSIONS


def test_best_is_chosen_on_seed_0_and_divergence_is_worst():
    done = as_results(res("one", 1e-3, None, 0, 3.0), res("one", 1e-3, None, 1, 3.9), res("one", 1e-3, None, 2, 3.9),
                      res("one", 1e-3 / Q, None, 0, 3.1), res("one", 1e-3 * Q, None, 0, None, "diverged: nan"))
    assert conv.best_point(conv.seed0_points(S1, done)) == (1e-3, None)  # not the lower seed mean elsewhere
    assert conv.best_point([(1e-3, None, math.inf), (1e-2, None, math.inf)]) == (1e-3, None)


def test_dependent_sweep_waits_then_centres_on_the_fallback_lr():
    pg = conv.Sweep("pg", "adamw", "", 1e-3, 10.0, shape="plus", seeds=1)
    hyb = conv.Sweep("hyb", "sgdsai", "", 3e-4, 10.0, shape="plus", after_fallback_lr="pg")
    sweeps = {"pg": pg, "hyb": hyb}
    assert conv.sweep_state(hyb, {}, sweeps, {})["stage"] == "blocked"

    def loss(lr, r):  # minimum at (1e-3, 31.6): on the plus's ratio arm, so its lr line needs 2 more points
        return abs(math.log10(lr) + 3) + abs(math.log10(r) - 1.5)

    done, stages = {}, []
    while (st := conv.sweep_state(pg, done, sweeps, {}))["stage"] != "done":
        stages.append(st["stage"])
        assert conv.sweep_state(hyb, done, sweeps, {})["stage"] == "blocked"
        done.update(as_results(*[res("pg", w["lr"], w["ratio"], w["seed"], loss(w["lr"], w["ratio"])) for w in st["want"]]))
    assert stages == ["grid", "extend"] and len(done) == 5 + 3  # (1e-3, 100), (3.16e-4, 31.6), (3.16e-3, 31.6)
    st = conv.sweep_state(hyb, done, sweeps, {})
    assert st["stage"] == "grid" and len(st["want"]) == 5
    centre_ratio = 1e-3 * 10 * Q / 3e-4  # pg's best fallback LR (1e-3 x 31.6) reached from lr 3e-4
    assert any(w["lr"] == pytest.approx(3e-4) and w["ratio"] == pytest.approx(centre_ratio) for w in st["want"])


def test_analyse_target_tokens_and_time(tmp_path):
    def write(name, vals, step_ms=None):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s, "train_loss": 1.0, "tokens": s * 10, "step_time_s": (step_ms or 1) / 1e3} for s in range(1, 5)]
        rows += [{"step": s, "val_loss": v} for s, v in zip(range(0, 5), vals)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        return str(d)

    pg = conv.Sweep("adamw_pg", "adamw", "fair", 1e-3, 10.0, shape="point", seeds=2)
    one = conv.Sweep("adamw", "adamw", "one", 1e-3, axes=("lr",), shape="point", seeds=1)
    sw = conv.Sweep("swan", "swan", "SWAN", 1e-3, 20.0, shape="point", seeds=2)
    done = as_results(
        res("adamw_pg", 1e-3, 10.0, 0, 3.0, run_dir=write("a0", [8, 5, 4, 3.5, 3.0])),
        res("adamw_pg", 1e-3, 10.0, 1, 3.2, run_dir=write("a1", [8, 5, 4, 3.5, 3.2])),
        res("adamw", 1e-3, None, 0, 3.6, run_dir=write("o0", [8, 6, 5, 4, 3.6])),
        res("swan", 1e-3, 20.0, 0, 2.5, run_dir=write("s0", [8, 4, 3.0, 2.7, 2.5])),
        res("swan", 1e-3, 20.0, 1, 2.9, run_dir=write("s1", [8, 4.2, 3.4, 3.2, 2.9])),
    )
    timings = {"swan": {"step_ms": 20.0, "tokens_per_step": 10}}
    out = conv.analyse({}, [pg, one, sw], done, {}, timings)
    assert out["target_val_loss"] == pytest.approx(3.1)  # the per-group AdamW's seed mean
    s = out["sweeps"]["swan"]
    # seed 0 crosses 3.1 between steps 1 and 2 (4.0 -> 3.0): 10 + 0.9 / 1.0 * 10 = 19 tokens; seed 1 between
    # steps 3 and 4 (3.2 -> 2.9): 30 + 0.1 / 0.3 * 10 = 33.3; the budget is 40 tokens; 20 ms per 10-token step
    assert s["tokens_to_target"] == [pytest.approx(19.0), pytest.approx(100 / 3)]
    mean = (19 + 100 / 3) / 2
    assert s["tokens_to_target_mean"] == pytest.approx(mean) and s["tokens_to_target_ratio"] == pytest.approx(mean / 40)
    assert s["time_to_target_s"] == pytest.approx(mean / 10 * 0.020)
    assert s["final_val_loss"]["mean"] == pytest.approx(2.7) and s["final_val_loss"]["n"] == 2
    assert s["vs_target"] == pytest.approx(2.7 / 3.1 - 1)
    a = out["sweeps"]["adamw"]
    assert a["tokens_to_target"] == [None] and a["tokens_to_target_mean"] is None  # never reaches it
    assert out["sweeps"]["adamw_pg"]["tokens_to_target_ratio"] == 1.0  # its own mean: the whole budget
    md = conv.markdown({**out, "setup": {}})
    assert "0/1 seeds reach it" in md and "SWAN" in md and "+0.00%" in md


def test_unknown_sweep_is_rejected_before_any_training(tmp_path):
    with pytest.raises(SystemExit):
        conv.main(["--quick", "--sweeps", "swan,nope", "--runs-dir", str(tmp_path)])
    assert not (tmp_path / "index.json").exists()


def test_quick_study_end_to_end(tmp_path):
    # The CPU smoke path: a 2-D plus search, a 1-D grid and a ratio-only sweep that waits for it, in this
    # process; every result file, diagnostics (SGD-SaI's g-SNR included), exclusive timing, seeds at bests.
    out = conv.main(["--quick", "--workers", "0", "--threads", "1", "--sweeps", "adamw_pg,sgdsai_ratio",
                     "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "res"), "--tag", "t"])
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / "res" / f"convergence_t{suffix}").exists()
    sw = out["sweeps"]
    assert set(sw) == {"adamw_pg", "sgdsai", "sgdsai_ratio"}  # sgdsai came along as the dependency
    assert sw["adamw_pg"]["seeds_at_best"] == [0, 1] and sw["sgdsai"]["seeds_at_best"] == [0, 1]
    assert all(sw[n]["stage"] == "done" for n in sw)
    assert sw["sgdsai_ratio"]["best_lr"] == pytest.approx(sw["sgdsai"]["best_lr"])
    assert len(sw["adamw_pg"]["grid"]) >= 5 and all(sw[n]["inside"] for n in sw)
    t = sw["adamw_pg"]["timing"]
    assert t["step_ms"] > 0 and t["steps_timed"] == 4  # 6 timing steps, the first 2 left out
    # the target reaches its own seed mean with its whole budget (6 steps), by definition
    assert sw["adamw_pg"]["time_to_target_s"] == pytest.approx(6 * t["step_ms"] / 1e3)
    diag = sw["sgdsai"]["diag"]
    assert diag["steps"][:3] == [1, 2, 5] and diag["classes"]["embedding"]["update_rms"][0] > 0
    # g-SNR >= sqrt(n - 1) for any gradient (up to the eps added to std: 1e-8 on stds ~1e-4 here)
    assert diag["classes"]["mlp"]["gsnr_frozen"][0][0] >= 1.0 - 1e-3
    kept = tmp_path / "res" / "convergence_t_runs"
    # the diagnostics the report reads (seed 0 at each best point) are kept next to every run's metrics
    assert {p.name for p in kept.glob("*.diag.jsonl")} == {f"{sw[n]['runs_at_best'][0]}.diag.jsonl" for n in sw}
    assert len(list(kept.glob("*_s[0-9].jsonl"))) == len([r for r in out["runs"] if r["status"] == "ok"])
    # the committed form (results JSON + <stem>_runs/) re-analyses to the same table
    again = conv.main(["--quick", "--report-only", "--sweeps", "adamw_pg,sgdsai_ratio", "--runs-dir", str(tmp_path / "none"),
                       "--resume-from", str(tmp_path / "res" / "convergence_t.json"), "--out-dir", str(tmp_path / "res2"),
                       "--tag", "t"])
    assert (tmp_path / "res2" / "convergence_t.md").read_text() == (tmp_path / "res" / "convergence_t.md").read_text()
