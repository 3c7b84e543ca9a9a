"""What a launcher sets, for one process started without one (``python -m ...`` with DeepSpeed or a
process group), and DeepSpeed's CPU set-up. Used by train.py and hf_trainer.py."""

from __future__ import annotations

import importlib
import os

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def under_launcher() -> bool:
    """torchrun, the deepspeed launcher and launch/multinode.sh all set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def one_process_env() -> None:
    """The variables torchrun would set for a world of one rank (DeepSpeed reads all five of RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK, and without them tries MPI discovery, which
    needs mpi4py). Port 0: the one rank's store binds a port the system picks (nobody else connects), so
    two such runs on one machine never collide. Values already set are kept."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "0")):
        os.environ.setdefault(key, value)


def deepspeed_on_cpu() -> None:
    """Skip the shared-memory all-reduce op DeepSpeed's CPU accelerator JIT-compiles when its process
    group starts (a C++ build of about a minute on first use); gloo does the same job. Call before
    ``deepspeed.init_distributed`` / ``deepspeed.initialize``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
