"""The convergence benchmark's bookkeeping (benchmarks/convergence.py): LR choice, grid extension,
tokens-to-target interpolation. Training itself is covered by test_train.py."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("convergence", Path(__file__).parents[1] / "benchmarks" / "convergence.py")
conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv)


def r(opt, lr, seed, loss, status="ok"):
    return {"optimizer": opt, "lr": lr, "seed": seed, "final_val_loss": loss, "status": status, "wall_s": 1.0}


def test_tokens_to_reach_interpolates_first_crossing():
    curve = [(0, 0, 8.0), (10, 100, 5.0), (20, 200, 4.0), (30, 300, 3.5)]
    assert conv.tokens_to_reach(curve, 4.5) == pytest.approx(150.0)  # halfway between 5.0 and 4.0
    assert conv.tokens_to_reach(curve, 4.0) == pytest.approx(200.0)
    assert conv.tokens_to_reach(curve, 3.0) is None  # never reached: reported as such
    assert conv.tokens_to_reach([(0, 0, 8.0), (10, 100, 3.0), (20, 200, 5.0)], 4.0) == pytest.approx(80.0)


def test_best_lr_averages_seeds_and_counts_divergence_as_worst():
    rs = [r("swan", 1e-3, 0, 3.0), r("swan", 1e-3, 1, 3.4), r("swan", 3e-3, 0, 3.1),
          r("swan", 1e-2, 0, None, "diverged: loss is nan at step 5")]
    assert conv.best_lr(rs, "swan") == 3e-3  # 3.1 < mean(3.0, 3.4)
    assert conv.best_lr(rs, "adamw") is None


def test_next_round_extends_an_edge_best_and_adds_a_seed():
    grid = {"adamw": [1e-3, 3e-3, 1e-2]}
    edge = [r("adamw", 1e-3, 0, 3.0), r("adamw", 3e-3, 0, 3.2), r("adamw", 1e-2, 0, 3.5)]
    specs = conv.next_specs(edge, grid)
    assert ("adamw", 1e-3, 1) in specs
    assert any(o == "adamw" and math.isclose(lr, 1e-3 / math.sqrt(10)) and s == 0 for o, lr, s in specs)
    inside = [r("adamw", 1e-3, 0, 3.3), r("adamw", 3e-3, 0, 3.0), r("adamw", 1e-2, 0, 3.5)]
    assert conv.next_specs(inside, grid) == [("adamw", 3e-3, 1)]


def test_analyse_ratio_and_inside_grid(tmp_path):
    def write(name, vals):
        d = tmp_path / name
        d.mkdir()
        rows = [{"step": s, "train_loss": 1.0, "tokens": s * 10} for s in range(1, 5)]
        rows += [{"step": s, "val_loss": v} for s, v in zip(range(0, 5), vals)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        return str(d)

    rs = [r("adamw", 1e-3, 0, 4.0), r("adamw", 3e-3, 0, 3.0), r("adamw", 1e-2, 0, 3.5),
          r("swan", 1e-3, 0, 2.5)]
    rs[1]["run_dir"] = write("adamw_lr0.003_s0", [8, 5, 4, 3.5, 3.0])
    rs[3]["run_dir"] = write("swan_lr0.001_s0", [8, 4, 3.0, 2.7, 2.5])
    for x in (rs[0], rs[2]):
        x["run_dir"] = str(tmp_path / "missing")
    out = conv.analyse(rs, tmp_path)
    a, s = out["optimizers"]["adamw"], out["optimizers"]["swan"]
    assert out["target_val_loss"] == 3.0 and a["best_strictly_inside_grid"] and a["ratio_to_adamw"] == 1.0
    assert s["tokens_to_target"] == [pytest.approx(20.0)] and s["ratio_to_adamw"] == pytest.approx(0.5)
    assert not s["best_strictly_inside_grid"]  # a single point is not a sweep
    assert "SWAN" in conv.markdown(out)


def test_ablations_are_labelled_runs_around_the_best_lr(tmp_path):
    rs = [r("sgdsai", 1e-3, 0, 4.9), r("sgdsai", 3e-3, 0, 5.1), r("swan", 1e-3, 0, 3.6)]
    specs = conv.ablation_specs(rs, ["sgdsai+noclip", "swan+stored_rows", "sinkgd+fallback10"])
    assert [s for s in specs if s[0] == "swan+stored_rows"] == [("swan+stored_rows", 1e-3, 0)]
    assert sorted(lr for o, lr, _ in specs if o == "sgdsai+noclip") == pytest.approx([1e-3 / math.sqrt(10), 1e-3, 1e-3 * math.sqrt(10)])
    assert not any(o.startswith("sinkgd") for o, _, _ in specs)  # no SinkGD study: nothing to ablate around
    argv = conv.run_argv("sgdsai+noclip", 1e-3, 0, tmp_path, [])
    assert argv[argv.index("--optimizer") + 1] == "sgdsai" and argv[-1] == "--training.grad_clip=0"
    # an ablation never counts as its optimizer's result
    assert conv.best_lr(rs + [r("sgdsai+noclip", 1e-2, 0, 1.0)], "sgdsai") == 1e-3
