"""Two nodes emulated on one machine: launch/multinode.sh started twice with NNODES=2, NODE_RANK=0 and 1,
one process per node, static rendezvous on 127.0.0.1, training launch/train.py with DDP on gloo.

tests/test_train.py checks the script's commands (DRY_RUN) and a one-node run through it. This file runs
the two-node path: two torchrun agents that must find each other, per-node LOCAL_RANK 0 (each "node"
prepares its data cache and passes the barrier), and global ranks 0 and 1 spread over the two agents.
The run must equal the single-node run with two ranks (NNODES=1, NPROC_PER_NODE=2) on the same global
batch. Tolerance: 1e-6 absolute on every per-step train loss, on the validation loss and on every final
weight. Measured: 0, bit-identical. The ranks, their data and their all-reduce partners are the same;
only the rendezvous differs. A node training alone (world 1), or ranks with the wrong data, would be off
by more than 1e-3.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import data as D

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "-c", "configs/quickstart.yaml", "--backend=ddp",
    "--training.steps=6", "--training.warmup_steps=2", "--training.batch_size=2", "--data.seq_len=64",
    "--training.eval_every=0", "--training.eval_batches=2", "--training.progress=off", "--training.log_every=3",
    "--data.max_train_tokens=50000", "--run.plot=false", "--checkpoint.every=0", "--checkpoint.final=true",
    "--training.threads=1",
]
TIMEOUT = 180
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, *, nnodes: int, node_rank: int, nproc: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "NNODES": str(nnodes), "NODE_RANK": str(node_rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "NPROC_PER_NODE": str(nproc), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(run_dir.parent / f"{run_dir.name}.node{node_rank}.log", "w")
    return subprocess.Popen(["bash", "launch/multinode.sh", *ARGS, f"--run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait(procs: list[subprocess.Popen], run_dir: Path) -> dict:
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:  # only the process groups started above (start_new_session), if still running
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    logs = "\n".join(f"--- node {i}\n" + (run_dir.parent / f"{run_dir.name}.node{i}.log").read_text()[-4000:]
                     for i in range(len(procs)))
    assert codes == [0] * len(procs), f"exit codes {codes}\n{logs}"
    return json.loads((run_dir / "summary.json").read_text())


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "step_00000006" / "state.pt", weights_only=False)["model"]


@pytest.fixture(scope="module", autouse=True)
def corpus():
    return D.prepare("kjv", 4096, 0.05, verbose=False)  # before the nodes start: no race on the cache


def test_two_nodes_equal_one_node_with_two_ranks(tmp_path):
    one = tmp_path / "one_node"
    ref = _wait([_launch(one, nnodes=1, node_rank=0, nproc=2, port=_free_port())], one)

    two = tmp_path / "two_nodes"
    port = _free_port()
    got = _wait([_launch(two, nnodes=2, node_rank=r, nproc=1, port=port) for r in (0, 1)], two)

    for s in (ref, got):
        assert s["backend"] == "ddp" and s["world_size"] == 2 and len(s["memory"]) == 2
        assert s["steps_this_run"] == 6 and len(s["train_losses"]) == 6
    worst = max(abs(a - b) for a, b in zip(got["train_losses"], ref["train_losses"]))
    assert worst <= TOL, (worst, got["train_losses"], ref["train_losses"])
    assert abs(got["final_val_loss"] - ref["final_val_loss"]) <= TOL
    assert got["train_losses"][-1] < got["train_losses"][0] - 0.5  # it trained: ~8.3 -> < 7.8

    a, b = _final_weights(two), _final_weights(one)
    assert a.keys() == b.keys() and len(a) > 0
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) <= TOL, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
