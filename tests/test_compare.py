"""launch/compare.py and metrics.jsonl: several runs in one picture and one table; the records of a run
that was killed and resumed read back as the run that counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import compare as C
from launch import data as D
from launch import runs as R
from launch import train as T
from launch.config import UserError

QUICK = ["-c", "configs/quickstart.yaml", "--training.steps=3", "--training.batch_size=2", "--data.seq_len=32",
         "--training.eval_every=3", "--training.eval_batches=1", "--training.progress=off",
         "--data.max_train_tokens=20000", "--training.threads=1", "--run.plot=false"]


def test_metrics_read_back_without_lost_work(tmp_path):
    """Attempt 1 ran steps 1-4 (checkpoint at 2) and died mid-line; attempt 2 resumed from step 2 and
    is at step 3: attempt 1's steps 3 and 4 are lost work."""
    lines = [
        {"event": "start", "step": 0}, {"step": 0, "val_loss": 9.0},
        {"step": 1, "train_loss": 8.0}, {"step": 2, "train_loss": 7.0}, {"step": 2, "val_loss": 7.5},
        {"step": 3, "train_loss": 6.66}, {"step": 4, "train_loss": 6.4}, {"step": 4, "val_loss": 6.8},
    ]
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "train_lo'  # cut by the kill
    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    R.start(tmp_path, T.load_config("configs/quickstart.yaml"), {"step": 2})  # ends the cut line first
    R.append(path, {"step": 3, "train_loss": 6.5})
    R.append(path, {"step": 3, "val_loss": 6.9})
    got = [(r["step"], r.get("train_loss", r.get("val_loss"))) for r in R.read_metrics(path)]
    assert got == [(0, 9.0), (1, 8.0), (2, 7.0), (2, 7.5), (3, 6.5), (3, 6.9)]
    assert path.read_text().startswith(text)  # appended, never rewritten


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    D.prepare("kjv", 4096, 0.05, verbose=False)
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for opt in ("swan", "adamw"):
        out[opt] = T.main([*QUICK, "--optimizer", opt, f"--run.dir={root / opt}"])
    return root, out


def test_compare_table_and_picture(two_runs, capsys):
    root, summaries = two_runs
    table = C.main([str(root / "swan"), str(root / "adamw"), "--out", str(root / "both.png")])
    assert [r["run"] for r in table] == ["swan", "adamw"]
    for row, opt in zip(table, ("swan", "adamw")):
        s = summaries[opt]
        assert row["optimizer"] == opt and row["backend"] == "single x1" and row["steps"] == "3/3"
        assert row["val loss"] == s["final_val_loss"] and row["tokens"] == 3 * 2 * 32
        assert row["train loss"] == pytest.approx(sum(s["train_losses"]) / 3, rel=1e-12)
        assert 0 < row["time"] <= s["train_time_s"] + 0.01
    out = capsys.readouterr().out
    assert "val loss" in out.splitlines()[0] and f"{summaries['adamw']['final_val_loss']:.4f}" in out
    assert (root / "both.png").stat().st_size > 10_000
    assert C.main([str(root), "--no-plot", "--markdown"])[0]["run"] == "adamw"  # a folder of runs: sorted
    assert capsys.readouterr().out.startswith("| run | optimizer |")
    with pytest.raises(UserError, match="not a run folder"):
        C.main([str(root / "nothing")])
