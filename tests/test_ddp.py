"""DDP: every rank holds the whole, already averaged gradient. The step must equal the
single-process step; with the replicate group known (``param_groups(ddp_model)`` or
``replicate_group=``) SWAN splits its whitening over the replicas (each whitens ~1/p of the
matrices, owners send the results) instead of every rank whitening everything.

Same model, data, reference and tolerances as ``test_fsdp2`` (see its docstring): the only difference
to the single-process run is the fp32 order of DDP's gradient all-reduce.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import stateless_opt as so
from dist_harness import Registry
from test_fsdp2 import (
    MATRICES, OPTIMIZERS, REL_TOL, comm_spy, compare, global_batch, local_snapshot, loss_fn, make_model, make_opt,
    reference_run, train,
)

CASES = Registry(__name__)
WORLDS = (2, 3)
STEPS = 4


def wrap(ctx, model):
    from torch.nn.parallel import DistributedDataParallel as DDP

    if ctx.device_type == "cpu":
        return DDP(model)
    return DDP(model, device_ids=[ctx.device.index])


def ddp_sync(model, last: bool):
    return contextlib.nullcontext() if last else model.no_sync()


def build(ctx, opt: str, how: str):
    """how: "param_groups" -> ``param_groups(ddp_model)`` (registers the DDP group);
    "replicate_group" -> plain groups + ``replicate_group=ddp.process_group``;
    "local" -> the optimizer is not told about DDP (every rank computes the whole update);
    "plain" -> ``Opt(ddp.parameters())``, the form torch.optim users write."""
    ddp = wrap(ctx, make_model(ctx.device))
    if how == "param_groups":
        optimizer = make_opt(opt, so.param_groups(ddp))
    elif how == "replicate_group":
        optimizer = make_opt(opt, so.param_groups(ddp.module), replicate_group=ddp.process_group)
    elif how == "local":
        optimizer = make_opt(opt, so.param_groups(ddp.module))
    elif how == "plain":
        optimizer = make_opt(opt, ddp.parameters())
    else:
        raise ValueError(how)
    return ddp, optimizer


@contextlib.contextmanager
def count_whitened():
    """Count the matrices this rank whitens, and their shapes (SWAN's direction is looked up at every
    step)."""
    import stateless_opt.swan as swan_mod

    counted = {"matrices": 0, "shapes": []}
    orig = swan_mod.swan_direction

    def counting(g, **kw):
        n = len(g)  # a batch (B, m, n) or a list of B matrices
        counted["matrices"] += n
        counted["shapes"] += [tuple(g[0].shape[-2:])] * n
        return orig(g, **kw)

    swan_mod.swan_direction = counting
    try:
        yield counted
    finally:
        swan_mod.swan_direction = orig


def equivalence(ctx, opt: str, how: str = "param_groups", accum: int = 1):
    ref = reference_run(opt, ctx.device, STEPS, dp_world=ctx.world)
    ddp, optimizer = build(ctx, opt, how)
    with count_whitened() as counted:
        got = train(ddp, optimizer, ctx.device, STEPS, rank=ctx.rank, world=ctx.world,
                    accum=accum, sync=ddp_sync if accum > 1 else None)
    got = [{k.removeprefix("module."): v for k, v in s.items()} for s in got]
    return {"err": compare(got, ref), "final": got[-1], "whitened": counted["matrices"]}


for _opt in OPTIMIZERS:
    CASES.add(f"ddp_{_opt}", equivalence, WORLDS, opt=_opt)
    CASES.add(f"ddp_accum_{_opt}", equivalence, WORLDS, opt=_opt, accum=2)
CASES.add("ddp_swan_replicate_group", equivalence, WORLDS, opt="swan", how="replicate_group")
CASES.add("ddp_swan_local", equivalence, WORLDS, opt="swan", how="local")


def payload(ctx, opt: str, steps: int = 3):
    ddp, optimizer = build(ctx, opt, "param_groups")
    per_step = []
    for step in range(steps):
        x, y = global_batch(step, ctx.device)
        loss_fn(ddp(x.chunk(ctx.world)[ctx.rank]), y.chunk(ctx.world)[ctx.rank]).backward()
        optimizer.reset_comm_counters()
        with comm_spy() as log, count_whitened() as counted:
            optimizer.step()
        per_step.append({"bytes_sent": optimizer.bytes_sent(), "calls": log, "whitened": counted["matrices"]})
        optimizer.zero_grad(set_to_none=True)
    return per_step


for _opt in ("swan", "sinkgd", "sgdsai"):
    CASES.add(f"ddp_payload_{_opt}", payload, WORLDS, opt=_opt)


def nan_one_rank(ctx, opt: str, how: str = "param_groups"):
    """NaN in the last rank's gradient AFTER DDP's all-reduce (a faulty rank): every rank skips, however
    the optimizer was built (the skip vote runs over the default group under an initialised job)."""
    ddp, optimizer = build(ctx, opt, how)
    out = {}
    for step in range(3):
        x, y = global_batch(step, ctx.device)
        loss_fn(ddp(x.chunk(ctx.world)[ctx.rank]), y.chunk(ctx.world)[ctx.rank]).backward()
        if step == 1 and ctx.rank == ctx.world - 1:
            ddp.module.l1.weight.grad[0, 0] = float("nan")
        before = local_snapshot(ddp)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = local_snapshot(ddp)
        out[step] = {
            "unchanged": all(torch.equal(before[n], after[n]) for n in before),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "skipped": optimizer.skipped_steps,
        }
    return out


for _opt in ("swan", "sinkgd", "sgdsai"):
    for _how in ("param_groups", "plain", "local"):
        CASES.add(f"ddp_nan_{_opt}_{_how}", nan_one_rank, WORLDS, opt=_opt, how=_how)


# -------------------------------------------------------------------------------------------- tests
def _check_equal(per_rank, opt):
    for r, res in enumerate(per_rank):
        assert res["err"]["init_equal"]
        assert res["err"]["rel"] < REL_TOL[opt], (r, res["err"]["per_param"])
    # Replicas stay bitwise identical (the owners' results are shipped, not recomputed).
    for res in per_rank[1:]:
        assert all(torch.equal(res["final"][n], per_rank[0]["final"][n]) for n in res["final"])


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_ddp_equals_single_process(opt, world):
    per_rank = CASES.result(f"ddp_{opt}", world)
    _check_equal(per_rank, opt)
    if opt.startswith("swan"):
        # Whitening is split over the replicas: 4 matrices per step in total, not 4 per rank.
        assert sum(res["whitened"] for res in per_rank) == len(MATRICES) * STEPS
        assert max(res["whitened"] for res in per_rank) < len(MATRICES) * STEPS


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("how", ("replicate_group", "local"))
def test_ddp_swan_replicate_group_argument_and_unaware(how, world):
    per_rank = CASES.result(f"ddp_swan_{how}", world)
    _check_equal(per_rank, "swan")
    whitened = [res["whitened"] for res in per_rank]
    if how == "replicate_group":  # split, as with param_groups(ddp_model)
        assert sum(whitened) == len(MATRICES) * STEPS and max(whitened) < len(MATRICES) * STEPS
    else:  # not told: every rank whitens everything, redundantly (still correct)
        assert whitened == [len(MATRICES) * STEPS] * world


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_ddp_gradient_accumulation_no_sync_equals_one_big_batch(opt, world):
    _check_equal(CASES.result(f"ddp_accum_{opt}", world), opt)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("opt", ("sinkgd", "sgdsai"))
def test_ddp_payload_elementwise_and_sinkgd_only_the_skip_flag(opt, world):
    # Gradients are already whole on every rank: no statistic travels, only the 1-float NaN flag.
    for per_step in CASES.result(f"ddp_payload_{opt}", world):
        for st in per_step:
            assert [(c["op"], c["bytes"]) for c in st["calls"]] == [("all_reduce", 4)]
            assert st["bytes_sent"] == 4


@pytest.mark.parametrize("world", WORLDS)
def test_ddp_payload_swan_results_only(world):
    per_rank = CASES.result("ddp_payload_swan", world)
    total = sum(m * n * 4 for m, n in MATRICES.values())
    for step in range(len(per_rank[0])):
        sent = 0
        for per_step in per_rank:
            st = per_step[step]
            calls = st["calls"]
            assert calls[0] == {"op": "all_reduce", "bytes": 4, "dtype": "torch.float32", "reduce": "max"}
            assert st["bytes_sent"] == sum(c["bytes"] for c in calls)
            assert len(calls) > 1 and all(c["op"] == "all_to_all" for c in calls[1:])
            sent += sum(c["bytes"] for c in calls[1:])
        # Each whitened matrix goes from its owner to the p - 1 other replicas, once, and nothing
        # else travels (no gradient: the owner already holds it; the empty gather is elided).
        assert sent == (world - 1) * total
        assert sum(ps[step]["whitened"] for ps in per_rank) == len(MATRICES)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("how", ("param_groups", "plain", "local"))
@pytest.mark.parametrize("opt", ("swan", "sinkgd", "sgdsai"))
def test_ddp_nan_on_one_rank_skips_everywhere(opt, how, world):
    for r, res in enumerate(CASES.result(f"ddp_nan_{opt}_{how}", world)):
        assert not res[0]["unchanged"] and res[0]["skipped"] == 0, (r, res)
        assert res[1]["unchanged"] and res[1]["finite"] and res[1]["skipped"] == 1, (r, res)
        assert not res[2]["unchanged"] and res[2]["finite"] and res[2]["skipped"] == 1, (r, res)
