"""The spawn harness itself: a native crash loses only the case it hit, is retried once and reported;
a Python exception is never retried."""

import os
import tempfile
import time

import pytest
from dist_harness import DistributedCaseError, Registry

CASES = Registry(__name__)
# Chosen in the parent at import; the children get it through the pickled case kwargs.
_MARKER = os.path.join(tempfile.gettempdir(), f"harness_crash_{os.getpid()}_{time.time_ns()}")


@CASES.case((2,))
def before_crash(ctx):
    return ctx.rank * 10


@CASES.case((2,), marker=_MARKER)
def aborts_once_on_rank1(ctx, marker):
    """Rank 1 dies of SIGABRT the first time (like glibc's "free(): invalid pointer"), then works."""
    import torch.distributed as dist

    if ctx.rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()
    dist.barrier()
    return "ok"


@CASES.case((2,))
def after_crash(ctx):
    import torch
    import torch.distributed as dist

    t = torch.tensor([ctx.rank + 1.0])
    dist.all_reduce(t)
    return t.item()


@CASES.case((3,))
def raises_on_rank0(ctx):
    if ctx.rank == 0:
        raise ValueError("a plain Python failure")
    return "never reached by the peers' results"


def test_native_crash_retried_once_and_reported():
    try:
        with pytest.warns(RuntimeWarning, match="crashed natively") as record:
            run = CASES.results(2)
    finally:
        if os.path.exists(_MARKER):
            os.remove(_MARKER)
    message = next(str(w.message) for w in record if "crashed natively" in str(w.message))
    assert "killed by signal 6" in message  # the crash is named ...
    assert "aborts_once_on_rank1" in message  # ... with the Python stack faulthandler wrote at the abort
    assert CASES.result("before_crash", 2) == [0, 10]  # kept from the first spawn
    assert CASES.result("aborts_once_on_rank1", 2) == ["ok", "ok"]
    assert CASES.result("after_crash", 2) == [3.0, 3.0]
    assert not run.crashed


def test_python_exception_is_not_retried():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a retry would warn
        with pytest.raises(DistributedCaseError, match="a plain Python failure"):
            CASES.result("raises_on_rank0", 3)


def late_case(ctx):
    return ctx.world


def test_case_registered_after_a_spawn_runs_in_a_new_one():
    # A module imported after a registry's spawn ran (cases folded into another module's spawns,
    # tests/test_box_layouts.py) must still get its cases run, without losing the earlier results.
    reg = Registry(__name__)
    reg.add("first", before_crash, (2,))
    assert reg.result("first", 2) == [0, 10]
    reg.add("late", late_case, (2,))
    assert reg.result("late", 2) == [2, 2]
    assert reg.result("first", 2) == [0, 10]
