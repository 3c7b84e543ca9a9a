"""A small multi-process harness for distributed tests: N ranks, many cases per spawn.

Why: starting a rank costs seconds (importing torch, torch.distributed, FSDP), a case costs
milliseconds. So every test module registers its *cases* (plain functions ``fn(ctx, **kwargs)`` that
run on every rank and return picklable data), and the first test that needs the results of a world
size runs **all** of that module's cases for that world size in **one** spawn of N processes. Tests
then assert on the returned data in the parent, so a failing assertion never desynchronises the
ranks' collectives.

    CASES = Registry(__name__)

    @CASES.case(world_sizes=(2, 3))
    def my_case(ctx, lr=0.1):
        ...                      # ctx.rank, ctx.world, ctx.device, ctx.device_type, ctx.backend
        return {"err": 1e-7}     # anything picklable

    def test_my_case():
        per_rank = CASES.result("my_case", world=2)     # [rank 0's return, rank 1's return]

Backend and device are parameters (``Registry.results(world, backend=..., device_type=...)``) and
default to ``$DIST_TEST_BACKEND`` / ``$DIST_TEST_DEVICE`` (gloo / cpu), so the same tests run on
NCCL/CUDA unchanged (``DIST_TEST_BACKEND=nccl DIST_TEST_DEVICE=cuda pytest tests/...``).

Failure handling: a case that raises on any rank stops that spawn (its peers are waiting in a
collective it will never join); the rank writes its traceback, exits, and gloo/NCCL errors out the
peers (ranks that desynchronise without crashing error out after ``$DIST_TEST_COLLECTIVE_TIMEOUT``,
60 s). The parent raises, for the failed case and every case that did not run, an error carrying
every rank's traceback. A hang fails instead of blocking: the parent kills the ranks it started after
``timeout`` seconds, and each rank dumps its Python stacks shortly before (``faulthandler``), which
the error message includes. Cases that finished on every rank before the failure keep their results.
"""

from __future__ import annotations

import dataclasses
import datetime
import faulthandler
import importlib
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

DEFAULT_TIMEOUT = float(os.environ.get("DIST_TEST_TIMEOUT", "240"))  # one spawn, all its cases
# One collective: ranks that disagree (one skips a step, another enters a collective) error out
# after this instead of waiting for the whole spawn's timeout.
COLLECTIVE_TIMEOUT = float(os.environ.get("DIST_TEST_COLLECTIVE_TIMEOUT", "60"))


def default_backend() -> str:
    return os.environ.get("DIST_TEST_BACKEND", "gloo")


def default_device_type() -> str:
    return os.environ.get("DIST_TEST_DEVICE", "cpu")


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Ctx:
    """What a case sees: its rank, the world, the backend and the device to put tensors on."""

    rank: int
    world: int
    backend: str
    device_type: str

    @property
    def device(self):
        import torch

        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, torch.accelerator.current_device_index())


@dataclasses.dataclass
class Case:
    name: str
    module: str
    function: str
    kwargs: dict
    world_sizes: tuple[int, ...]


class DistributedCaseError(AssertionError):
    """A case failed, hung, or did not run because an earlier case of its spawn failed."""


# ---------------------------------------------------------------------------------------- child side
def _worker(rank, world, backend, device_type, port, cases, outdir, timeout):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    hang = open(os.path.join(outdir, f"stacks_{rank}.txt"), "w")
    # A native crash (SIGSEGV/SIGABRT in a C++ library) leaves its Python stack in the same file.
    faulthandler.enable(file=hang, all_threads=True)
    # Dump every thread's stack shortly before the parent gives up on us, then exit.
    faulthandler.dump_traceback_later(max(timeout - 10.0, 5.0), exit=True, file=hang)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    error = None
    current = None

    def save() -> None:  # after every case, so a native crash loses only the case it hit
        tmp = os.path.join(outdir, f"rank_{rank}.pkl.tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"results": results, "timings": timings, "error": error}, f)
        os.replace(tmp, os.path.join(outdir, f"rank_{rank}.pkl"))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if device_type != "cpu":
            torch.accelerator.set_device_index(rank % torch.accelerator.device_count())
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=max(min(timeout - 20.0, COLLECTIVE_TIMEOUT), 5.0)),
        )
        ctx = Ctx(rank, world, backend, device_type)
        for case in cases:
            current = case.name
            fn = getattr(importlib.import_module(case.module), case.function)
            t0 = time.perf_counter()
            results[case.name] = fn(ctx, **case.kwargs)
            timings[case.name] = time.perf_counter() - t0
            save()
        current = None
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt in a rank
        error = (current, traceback.format_exc())
    faulthandler.cancel_dump_traceback_later()
    save()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (process-group destructors can block after a peer died).
    os._exit(1 if error else 0)


# --------------------------------------------------------------------------------------- parent side
@dataclasses.dataclass
class SpawnResult:
    results: dict[str, list]  # case name -> one entry per rank (only cases that finished on every rank)
    timings: dict[str, float]  # case name -> max seconds over ranks
    errors: dict[str, str]  # case name -> message (failed or not run)
    wall: float
    crashed: bool = False  # a rank died of a signal (segfault/abort in native code)
    report: str = ""  # every failed rank's traceback and crash stacks


def run_cases(
    cases: Sequence[Case], world: int, *, backend: str | None = None, device_type: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> SpawnResult:
    """Run ``cases`` in order on ``world`` fresh ranks (one spawn); never raises for a case failure."""
    import torch.multiprocessing as mp

    backend = backend or default_backend()
    device_type = device_type or default_device_type()
    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    os.environ["MKL_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="dist_harness_") as outdir:
        port = free_port()
        procs = []
        try:
            for rank in range(world):
                p = ctx.Process(
                    target=_worker, args=(rank, world, backend, device_type, port, list(cases), outdir, timeout),
                    name=f"dist-rank-{rank}", daemon=True,
                )
                p.start()
                procs.append(p)
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout
        first_failure = None
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            for p in procs:
                p.join(timeout=0.05)
            if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
                first_failure = time.monotonic()
            # Peers of a failed rank normally error out at once; do not wait for their full timeout.
            if first_failure is not None and time.monotonic() - first_failure > 30:
                break
        hung = [p for p in procs if p.is_alive()]
        for p in hung:  # only the processes this harness started, by handle
            p.kill()
        for p in procs:
            p.join(timeout=10)

        per_rank, notes, crashed = [], [], False
        for rank, p in enumerate(procs):
            path = os.path.join(outdir, f"rank_{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    per_rank.append(pickle.load(f))
            else:
                per_rank.append({"results": {}, "timings": {}, "error": (None, f"rank {rank} wrote no result")})
            if p.exitcode is not None and p.exitcode < 0 and p not in hung:
                crashed = True  # killed by a signal: a native crash, not a Python exception
                if not per_rank[-1]["error"]:
                    per_rank[-1]["error"] = (None, f"rank {rank} was killed by signal {-p.exitcode} "
                                                   "after its last completed case")
            stacks = os.path.join(outdir, f"stacks_{rank}.txt")
            if p in hung or (os.path.exists(stacks) and os.path.getsize(stacks)):
                text = ""
                if os.path.exists(stacks):
                    with open(stacks) as f:
                        text = f.read()
                notes.append(f"--- rank {rank} {'HUNG (killed after %.0fs)' % timeout if p in hung else ''} "
                             f"exitcode={p.exitcode}; stacks:\n{text}")
    wall = time.perf_counter() - t0

    results, timings, errors = {}, {}, {}
    failed = [(r, d["error"]) for r, d in enumerate(per_rank) if d["error"]]
    report = ""
    if failed or notes:
        lines = [f"{len(failed)} of {world} ranks failed ({backend}/{device_type}):"]
        for r, (case, tb) in failed:
            lines.append(f"--- rank {r}, case {case!r}:\n{tb}")
        report = "\n".join(lines + notes)
    for case in cases:
        if all(case.name in d["results"] for d in per_rank):
            results[case.name] = [d["results"][case.name] for d in per_rank]
            timings[case.name] = max(d["timings"][case.name] for d in per_rank)
        else:
            errors[case.name] = f"case {case.name!r} (world {world}) failed or did not run.\n{report}"
    return SpawnResult(results, timings, errors, wall, crashed, report)


class Registry:
    """The cases of one test module; results are computed once per (world, backend, device)."""

    def __init__(self, module: str):
        self.module = module
        self.cases: dict[str, Case] = {}
        self._runs: dict[tuple, SpawnResult] = {}

    def case(self, world_sizes: Sequence[int], /, **kwargs) -> Callable:
        """Decorator: register ``fn(ctx, **kwargs)`` under its own name, to run on every rank for each
        world size in ``world_sizes``."""

        def deco(fn):
            key = fn.__name__
            if key in self.cases:
                raise ValueError(f"duplicate case name {key!r}")
            self.cases[key] = Case(key, fn.__module__, fn.__name__, dict(kwargs), tuple(world_sizes))
            return fn

        return deco

    def add(self, case_name: str, fn: Callable, world_sizes: Sequence[int], /, **kwargs) -> None:
        """Register a parametrised variant ``fn(ctx, **kwargs)`` of a module-level function. ``fn`` may live
        in another test module: its cases then ride in this registry's spawns (no spawn of their own);
        register them when that module is imported, before any test asks for results."""
        if case_name in self.cases:
            raise ValueError(f"duplicate case name {case_name!r}")
        self.cases[case_name] = Case(case_name, fn.__module__, fn.__name__, dict(kwargs), tuple(world_sizes))

    def results(self, world: int, *, backend: str | None = None, device_type: str | None = None,
                timeout: float = DEFAULT_TIMEOUT) -> SpawnResult:
        key = (world, backend or default_backend(), device_type or default_device_type())
        done = self._runs.get(key)
        todo = [c for c in self.cases.values() if world in c.world_sizes
                and (done is None or (c.name not in done.results and c.name not in done.errors))]
        if done is None or todo:  # first call, or cases registered since (another module imported late)
            run = run_cases(todo, world, backend=key[1], device_type=key[2], timeout=timeout)
            if run.crashed:
                run = self._retry_after_crash(run, todo, world, key, timeout)
            if done is not None:
                run = SpawnResult({**done.results, **run.results}, {**done.timings, **run.timings},
                                  {**done.errors, **run.errors}, done.wall + run.wall, run.crashed, run.report)
            self._runs[key] = run
        return self._runs[key]

    @staticmethod
    def _retry_after_crash(run: SpawnResult, todo: list, world: int, key: tuple, timeout: float) -> SpawnResult:
        """A rank killed by a signal (a native crash inside gloo under FSDP2's all-gather, about one
        spawn in 36 under stress; docs/design.md) takes every later case of its spawn down with it. Run the cases it left unfinished once
        more in a fresh spawn, and say so loudly: the crash report becomes a pytest warning. A case that
        fails again, or fails with a Python exception, fails its test as before."""
        import warnings

        warnings.warn(f"distributed spawn (world {world}, {key[1]}/{key[2]}) crashed natively; re-running its "
                      f"{len(run.errors)} unfinished cases once.\n{run.report}", RuntimeWarning, stacklevel=3)
        again = run_cases([c for c in todo if c.name in run.errors], world, backend=key[1], device_type=key[2],
                          timeout=timeout)
        return SpawnResult({**run.results, **again.results}, {**run.timings, **again.timings}, again.errors,
                           run.wall + again.wall, again.crashed, again.report)

    def ran(self, world: int, *, backend: str | None = None, device_type: str | None = None) -> bool:
        """Whether this registry already spawned ``world`` ranks: a module whose cases ride another's
        spawn (``add`` from another module) asks, to run alone when that module's tests did not run."""
        return (world, backend or default_backend(), device_type or default_device_type()) in self._runs

    def result(self, name: str, world: int, **kw) -> list:
        """Every rank's return value of case ``name``; raises the ranks' tracebacks if it failed."""
        if name not in self.cases or world not in self.cases[name].world_sizes:
            raise KeyError(f"no case {name!r} registered for world size {world}")
        run = self.results(world, **kw)
        if name in run.errors:
            raise DistributedCaseError(run.errors[name])
        return run.results[name]
