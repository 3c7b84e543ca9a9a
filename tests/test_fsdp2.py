"""FSDP2 (``fully_shard``) and HSDP: the sharded step equals the single-process step.

Every case runs on every rank of one spawn per world size (see ``dist_harness``) and returns numbers;
the tests assert on them here, in the parent. The model's matrices have 13, 11, 5 and 1 rows, so no
world size of 2, 3 or 4 divides them all: ``torch.chunk`` rows give uneven shards, the 5-row weight
leaves rank 3 empty at world 4, and the 1-row head is held by rank 0 alone (every other rank holds
nothing of it, yet takes part in every collective).

The reference is the same optimizer stepped in one process on the whole global batch (each rank
trains on its slice of that batch; FSDP2 averages the gradients). Errors are reported per parameter
after every step as ``max |W_sharded - W_ref|`` and relative to how far the reference moved
(``max |W_ref,t - W_0|``): the relative figure is what a wrong update would blow up (to O(1)).

Tolerances and why (fp32, 4 steps):
* the only difference between the runs is the order of fp32 sums (the gradient mean is a sum of
  per-rank partial means, the column statistics are sums of per-rank partial sums), ~1e-7 relative;
* SinkGD, SGD-SaI, the AdamW fallback and SWAN with ``whitening="eigh"`` are well conditioned in the
  gradient: relative error 1e-4 (measured, worst over world sizes and variants: SinkGD 1.9e-5,
  SGD-SaI 1.0e-5, SWAN-eigh 1.6e-5; absolute <= 7.3e-7);
* SWAN with Newton-Schulz: the fixed 12-iteration polynomial amplifies a perturbation along the
  smallest singular directions of the normalised gradient (each iteration multiplies the derivative
  there by up to 1.5), so rounding differences grow ~100x: relative 1e-3 (measured 1.7e-4,
  absolute <= 9.4e-6).
A single wrong row scale, a whitening of a slice, or a missed reduction gives a relative error of
1e-2 .. 1 (checked by breaking the library on purpose).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import optim_db
import stateless_opt as so
from dist_harness import Registry

CASES = Registry(__name__)

WORLDS = (2, 3, 4)
BATCH = 24  # global batch, divisible by every world size
IN = 16
STEPS = 4
OPTIMIZERS = tuple(r.id for r in optim_db.rows("fsdp2"))  # catalogue rows (tests/optim_db.py)

# Relative tolerances (see the module docstring for the reasons): 1e-4, tenfold for the rows whose
# unconverged iterative whitening amplifies rounding differences.
REL_TOL = {r.id: 1e-3 if r.amplifies_rounding else 1e-4 for r in optim_db.OPTIM_DB}
# bf16 mixed precision: the reference replays the same bf16 forward/backward per rank slice and
# averages the bf16 gradients in fp32 like FSDP2's reduce_dtype=fp32, so only the fp32 reduction
# order can differ (measured: bitwise equal for SWAN and SGD-SaI): the fp32 tolerances apply. The
# test also checks that bf16 really changed the trajectory (vs the fp32 reference) by far more.
REL_TOL_BF16 = dict(REL_TOL)


# ----------------------------------------------------------------------------------- model and data
class Net(nn.Module):
    """Matrices 13x16, 11x13, 5x11, 1x5 (none square: the exact ``eigh`` whitening stays full rank);
    LayerNorm and biases go to the fallback rule."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(IN, 13)
        self.norm = nn.LayerNorm(13)
        self.l2 = nn.Linear(13, 11)
        self.l3 = nn.Linear(11, 5, bias=False)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        h = self.norm(torch.tanh(self.l1(x)))
        h = torch.tanh(self.l2(h))
        h = torch.tanh(self.l3(h))
        return self.head(h)


MATRICES = {"l1.weight": (13, 16), "l2.weight": (11, 13), "l3.weight": (5, 11), "head.weight": (1, 5)}


def make_model(device) -> Net:
    torch.manual_seed(0)
    return Net().to(device)


def global_batch(step: int, device):
    g = torch.Generator().manual_seed(1234 + step)
    x = torch.randn(BATCH, IN, generator=g)
    y = torch.randn(BATCH, 1, generator=g)
    return x.to(device), y.to(device)


def loss_fn(out, y):
    return F.mse_loss(out.float(), y)


def make_opt(name: str, params, **extra):
    """The catalogue row ``name`` with this file's hyper-parameters; params: a model (->
    ``param_groups(model)``) or anything an optimizer accepts."""
    if isinstance(params, nn.Module):
        params = so.param_groups(params)
    row = optim_db.info(name)
    common = dict(lr=0.02, weight_decay=0.1, **({"fallback_lr_ratio": 2.0} if row.splits_rules else {}))
    return row.make(params, **common, **extra)


# ---------------------------------------------------------------------------------- run and compare
def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().cpu()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: full(p).float() for n, p in model.named_parameters()}


def local_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def reference_run(name: str, device, steps: int, *, dp_world: int, bf16: bool = False, extra=None):
    """The single-process run: same init, same global batch, same optimizer (one process, no layout).

    ``bf16``: replay FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): per rank
    slice, forward/backward of a bf16 copy of the fp32 weights, then the fp32 mean of the bf16
    gradients is the fp32 master's gradient."""
    model = make_model(device)
    opt = make_opt(name, model, **(extra or {}))
    states = [snapshot(model)]
    for step in range(steps):
        x, y = global_batch(step, device)
        if bf16:
            low = copy.deepcopy(model).to(torch.bfloat16)
            total = None
            for xs, ys in zip(x.chunk(dp_world), y.chunk(dp_world)):
                low.zero_grad(set_to_none=True)
                loss_fn(low(xs.to(torch.bfloat16)), ys).backward()
                grads = [p.grad.float() for p in low.parameters()]
                total = grads if total is None else [a + b for a, b in zip(total, grads)]
            for p, g in zip(model.parameters(), total):
                p.grad = g / dp_world
        else:
            loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        states.append(snapshot(model))
    return states


def train(model, opt, device, steps: int, *, rank: int, world: int, accum: int = 1, sync=None):
    """Each rank trains on its slice of the global batch; ``accum`` micro-batches per step with the
    gradient reduction only on the last (``sync(model, last)`` returns the context to backward in)."""
    states = [snapshot(model)]
    for step in range(steps):
        x, y = global_batch(step, device)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        micro = list(zip(xs.chunk(accum), ys.chunk(accum)))
        for i, (xm, ym) in enumerate(micro):
            with sync(model, i == len(micro) - 1) if sync else contextlib.nullcontext():
                (loss_fn(model(xm), ym) / len(micro)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        states.append(snapshot(model))
    return states


def compare(got: list[dict], ref: list[dict]) -> dict:
    """Per parameter: max abs error over steps, and the same relative to the reference's movement."""
    out = {}
    for n in ref[0]:
        abs_err = rel_err = 0.0
        for t in range(1, len(ref)):
            diff = (got[t][n] - ref[t][n]).abs().max().item()
            moved = (ref[t][n] - ref[0][n]).abs().max().item()
            abs_err = max(abs_err, diff)
            rel_err = max(rel_err, diff / max(moved, 1e-12))
        out[n] = {"abs": abs_err, "rel": rel_err}
    return {
        "per_param": out,
        "abs": max(v["abs"] for v in out.values()),
        "rel": max(v["rel"] for v in out.values()),
        "init_equal": all(torch.equal(got[0][n], ref[0][n]) for n in ref[0]),
    }


# --------------------------------------------------------------------------------------- FSDP2 glue
_MESHES: dict = {}


def get_mesh(ctx, kind: str):
    """One mesh per kind per process (creating groups is the slow part)."""
    from torch.distributed.device_mesh import init_device_mesh

    if kind not in _MESHES:
        if kind == "1d":
            _MESHES[kind] = init_device_mesh(ctx.device_type, (ctx.world,))
        elif kind == "hsdp":
            _MESHES[kind] = init_device_mesh(
                ctx.device_type, (2, ctx.world // 2), mesh_dim_names=("replicate", "shard")
            )
        else:
            raise ValueError(kind)
    return _MESHES[kind]


def shard(model: Net, mesh, *, bf16: bool = False) -> Net:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {"mesh": mesh}
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for sub in (model.l1, model.l2, model.l3, model.head):
        fully_shard(sub, **kw)
    fully_shard(model, **kw)
    return model


def fsdp_sync(model, last: bool):
    model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def local_rows(model) -> dict[str, int]:
    return {n: p.to_local().shape[0] for n, p in model.named_parameters() if p.dim() >= 1}


# -------------------------------------------------------------------------------------------- cases
def equivalence(ctx, opt: str, mesh: str = "1d", bf16: bool = False, accum: int = 1, swap: bool = False,
                extra=None, steps: int = STEPS):
    ref = reference_run(opt, ctx.device, steps, dp_world=ctx.world, bf16=bf16, extra=extra)
    model = make_model(ctx.device)
    info = {}
    if swap:
        # accelerate's order: the optimizer is built on the plain parameters, the model is sharded,
        # then each param_group["params"] list is rebound to the sharded DTensor parameters.
        optimizer = make_opt(opt, model, **(extra or {}))
        names = {id(p): n for n, p in model.named_parameters()}
        shard(model, get_mesh(ctx, mesh), bf16=bf16)
        sharded = dict(model.named_parameters())
        old_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for g in optimizer.param_groups:
            g["params"] = [sharded[names[id(p)]] for p in g["params"]]
        info["swapped_all_new"] = all(id(p) not in old_ids for p in sharded.values())
    else:
        shard(model, get_mesh(ctx, mesh), bf16=bf16)
        optimizer = make_opt(opt, model, **(extra or {}))
    info["placements"] = sorted({str(p.placements) for p in model.parameters()})
    from torch.distributed.tensor import DTensor

    info["dtensor_params"] = all(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"])
    got = train(model, optimizer, ctx.device, steps, rank=ctx.rank, world=ctx.world, accum=accum,
                sync=fsdp_sync if accum > 1 else None)
    if bf16:  # how far bf16 compute moves the run from the fp32 one: must dwarf the tolerance
        info["bf16_vs_fp32"] = compare(ref, reference_run(opt, ctx.device, steps, dp_world=ctx.world, extra=extra))["rel"]
    return {"err": compare(got, ref), "rows": local_rows(model), "skipped": optimizer.skipped_steps, **info}


for _opt in OPTIMIZERS:
    CASES.add(f"fsdp_{_opt}", equivalence, WORLDS, opt=_opt)
    CASES.add(f"hsdp_{_opt}", equivalence, (4,), opt=_opt, mesh="hsdp")
    CASES.add(f"bf16_{_opt}", equivalence, (2, 3), opt=_opt, bf16=True)
    CASES.add(f"accum_{_opt}", equivalence, (2, 3), opt=_opt, accum=2)
    CASES.add(f"swap_{_opt}", equivalence, (2, 3), opt=_opt, swap=True)
CASES.add("fsdp_swan_stateless_fallback", equivalence, (3,), opt="swan", extra={"fallback": "stateless"})
CASES.add("fsdp_sinkgd_stateless_fallback", equivalence, (3,), opt="sinkgd", extra={"fallback": "stateless"})


@contextlib.contextmanager
def comm_spy(redistribute: bool = False):
    """Inside: log every all_reduce / all_to_all_single (payload bytes as ``Collectives`` counts them)
    and make every gathering collective raise. ``redistribute``: allow ``DTensor.redistribute`` (tensor
    parallelism without FSDP2 hands some gradients over in other placements: a local slice, or the
    backend's own reduction of a sequence-parallel norm's partial gradient)."""
    from torch.distributed.tensor import DTensor

    log: list[dict] = []
    orig_ar, orig_a2a = dist.all_reduce, dist.all_to_all_single

    def all_reduce(tensor, op=dist.ReduceOp.SUM, *a, **k):
        log.append({"op": "all_reduce", "bytes": tensor.numel() * tensor.element_size(), "dtype": str(tensor.dtype),
                    "reduce": "max" if op == dist.ReduceOp.MAX else "sum" if op == dist.ReduceOp.SUM else str(op)})
        return orig_ar(tensor, op, *a, **k)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **k):
        me = dist.get_rank(group)
        send = list(input_split_sizes)
        log.append({"op": "all_to_all", "send": send, "recv": list(output_split_sizes),
                    "bytes": (sum(send) - send[me]) * input.element_size(), "dtype": str(input.dtype)})
        return orig_a2a(output, input, output_split_sizes, input_split_sizes, group=group, **k)

    def forbidden(what):
        def fail(*a, **k):
            raise AssertionError(f"{what} called inside optimizer.step(): a full gather")
        return fail

    patches = [(dist, "all_reduce", all_reduce), (dist, "all_to_all_single", all_to_all_single)]
    for name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_object", "all_to_all",
                 "broadcast", "gather"):
        patches.append((dist, name, forbidden(f"torch.distributed.{name}")))
    for name in ("full_tensor",) if redistribute else ("full_tensor", "redistribute"):
        patches.append((DTensor, name, forbidden(f"DTensor.{name}")))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        yield log
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def payload(ctx, opt: str, steps: int = 3):
    model = shard(make_model(ctx.device), get_mesh(ctx, "1d"))
    optimizer = make_opt(opt, model)
    n_tensors = sum(len(g["params"]) for g in optimizer.param_groups)
    params = dict(model.named_parameters())
    own_matrix_bytes = sum(params[n].to_local().numel() * 4 for n in MATRICES)
    per_step = []
    for step in range(steps):
        x, y = global_batch(step, ctx.device)
        loss_fn(model(x.chunk(ctx.world)[ctx.rank]), y.chunk(ctx.world)[ctx.rank]).backward()
        optimizer.reset_comm_counters()
        with comm_spy() as log:
            optimizer.step()
        per_step.append({"bytes_sent": optimizer.bytes_sent(), "calls": log})
        optimizer.zero_grad(set_to_none=True)
    return {"per_step": per_step, "n_tensors": n_tensors, "own_matrix_bytes": own_matrix_bytes}


for _opt in ("swan", "sinkgd", "sgdsai"):
    CASES.add(f"payload_{_opt}", payload, WORLDS, opt=_opt)


def nan_one_rank(ctx, opt: str, mesh: str = "1d", extra=None):
    """Step 0 clean; step 1: NaN in the last rank's local gradient of l1 only (after FSDP's
    reduction, as a faulty rank would produce); step 2 clean."""
    model = shard(make_model(ctx.device), get_mesh(ctx, mesh))
    optimizer = make_opt(opt, model, **(extra or {}))
    out = {}
    for step in range(3):
        x, y = global_batch(step, ctx.device)
        loss_fn(model(x.chunk(ctx.world)[ctx.rank]), y.chunk(ctx.world)[ctx.rank]).backward()
        if step == 1 and ctx.rank == ctx.world - 1:
            model.l1.weight.grad.to_local()[0, 0] = float("nan")
        before = local_snapshot(model)
        state_before = {k: [v.to_local().clone() if hasattr(v, "to_local") else v.clone()
                            for v in st.values() if torch.is_tensor(v)] for k, st in
                        ((id(p), optimizer.state[p]) for p in model.parameters())}
        group_steps = [g["step"] for g in optimizer.param_groups]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = local_snapshot(model)
        state_after = {k: [v.to_local() if hasattr(v, "to_local") else v for v in st.values() if torch.is_tensor(v)]
                       for k, st in ((id(p), optimizer.state[p]) for p in model.parameters())}
        out[step] = {
            "unchanged": all(torch.equal(before[n], after[n]) for n in before),
            "state_unchanged": all(len(state_before[k]) == len(state_after[k]) and
                                   all(torch.equal(a, b) for a, b in zip(state_before[k], state_after[k]))
                                   for k in state_before),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "skipped": optimizer.skipped_steps,
            "group_steps_before": group_steps,
            "group_steps_after": [g["step"] for g in optimizer.param_groups],
        }
    return out


for _opt in ("swan", "sinkgd", "sgdsai"):
    CASES.add(f"nan_{_opt}", nan_one_rank, WORLDS, opt=_opt)
    CASES.add(f"nan_hsdp_{_opt}", nan_one_rank, (4,), opt=_opt, mesh="hsdp")
    # the same decisions taken on the device (capturable=True: masks, no host read; CUDA's default)
    CASES.add(f"nan_device_{_opt}", nan_one_rank, (3,), opt=_opt, extra={"capturable": True})
    CASES.add(f"nan_hsdp_device_{_opt}", nan_one_rank, (4,), opt=_opt, mesh="hsdp", extra={"capturable": True})
for _opt in OPTIMIZERS:
    CASES.add(f"fsdp_device_{_opt}", equivalence, (3,), opt=_opt, extra={"capturable": True})


def local_whitening(ctx):
    """One SWAN (eigh) step without weight decay: the update of l1 (13 x 16, rows cut over ranks) must
    be the whitening of the WHOLE matrix, not of the rank's rows."""
    from stateless_opt.swan import swan_direction

    lr = 0.02
    ref = make_model(ctx.device)
    x, y = global_batch(0, ctx.device)
    loss_fn(ref(x), y).backward()
    g = ref.l1.weight.grad.detach().float().cpu()
    model = shard(make_model(ctx.device), get_mesh(ctx, "1d"))
    optimizer = so.SWAN(so.param_groups(model), lr=lr, weight_decay=0.0, whitening="eigh")
    w0 = full(model.l1.weight)
    loss_fn(model(x.chunk(ctx.world)[ctx.rank]), y.chunk(ctx.world)[ctx.rank]).backward()
    optimizer.step()
    ours = (w0 - full(model.l1.weight)) / lr
    direction = lambda m: swan_direction(m[None], eps=1e-8, steps=12, method="eigh")[0]  # noqa: E731
    whole = direction(g)
    chunks = torch.arange(13).chunk(ctx.world)  # FSDP2's Shard(0) rows
    rows = chunks[ctx.rank].tolist() if ctx.rank < len(chunks) else []
    sl = slice(rows[0], rows[-1] + 1) if rows else slice(0, 0)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {
        "rows": (sl.start, sl.stop),
        "ours_vs_whole": rel(ours, whole),
        "ours_rows_vs_whole_rows": rel(ours[sl], whole[sl]) if rows else 0.0,
        "slice_whitening_vs_whole_rows": rel(direction(g[sl]), whole[sl]) if len(rows) > 1 else None,
    }


CASES.add("local_whitening", local_whitening, WORLDS)


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_fsdp2_equals_single_process(opt, world):
    per_rank = CASES.result(f"fsdp_{opt}", world)
    for r, res in enumerate(per_rank):
        assert res["err"]["init_equal"]
        assert res["placements"] == ["(Shard(dim=0),)"]
        assert res["skipped"] == 0
        assert res["err"]["rel"] < REL_TOL[opt], (r, res["err"]["per_param"])
    # The layout really is uneven: the 1-row head lives on rank 0 only, and every other rank holds
    # nothing of it; l1 (13 rows) is cut unevenly.
    rows = [res["rows"] for res in per_rank]
    assert [r["head.weight"] for r in rows] == [1] + [0] * (world - 1)
    assert [r["l1.weight"] for r in rows] == [len(c) for c in torch.arange(13).chunk(world)] + [0] * (
        world - len(torch.arange(13).chunk(world)))
    if world == 4:
        assert rows[3]["l3.weight"] == 0  # 5 rows over 4 ranks: 2, 2, 1, 0


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_fsdp2_device_decided_equals_single_process(opt):
    # capturable=True on both sides (the reference too): the masked, device-decided step on uneven
    # FSDP2 shards, with the same tolerances as the host-decided one
    for r, res in enumerate(CASES.result(f"fsdp_device_{opt}", 3)):
        assert res["err"]["init_equal"] and res["skipped"] == 0
        assert res["err"]["rel"] < REL_TOL[opt], (r, res["err"]["per_param"])


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_hsdp_2x2_equals_single_process(opt):
    per_rank = CASES.result(f"hsdp_{opt}", 4)
    for r, res in enumerate(per_rank):
        assert res["placements"] == ["(Replicate(), Shard(dim=0))"]
        assert res["err"]["rel"] < REL_TOL[opt], (r, res["err"]["per_param"])


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_bf16_mixed_precision_equals_same_bf16_forward(opt, world):
    for r, res in enumerate(CASES.result(f"bf16_{opt}", world)):
        assert res["err"]["rel"] < REL_TOL_BF16[opt], (r, res["err"]["per_param"])
        assert res["bf16_vs_fp32"] > 10 * REL_TOL_BF16[opt], res["bf16_vs_fp32"]


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_gradient_accumulation_equals_one_big_batch(opt, world):
    for r, res in enumerate(CASES.result(f"accum_{opt}", world)):
        assert res["err"]["rel"] < REL_TOL[opt], (r, res["err"]["per_param"])


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_optimizer_built_before_fully_shard_then_params_swapped(opt, world):
    for r, res in enumerate(CASES.result(f"swap_{opt}", world)):
        assert res["swapped_all_new"] and res["dtensor_params"]
        assert res["err"]["rel"] < REL_TOL[opt], (r, res["err"]["per_param"])


@pytest.mark.parametrize("opt", ("swan", "sinkgd"))
def test_stateless_fallback_sharded(opt):
    # 1-D tensors (biases, LayerNorm) are cut across ranks: the fallback's row statistic is reduced.
    for r, res in enumerate(CASES.result(f"fsdp_{opt}_stateless_fallback", 3)):
        assert res["err"]["rel"] < REL_TOL[opt], (r, res["err"]["per_param"])


@pytest.mark.parametrize("world", WORLDS)
def test_swan_whitens_whole_matrix_not_local_rows(world):
    per_rank = CASES.result("local_whitening", world)
    for r, res in enumerate(per_rank):
        # Ours is the whitening of the whole 13 x 16 gradient ...
        assert res["ours_vs_whole"] < 1e-4, res
        assert res["ours_rows_vs_whole_rows"] < 1e-4, res
        # ... and whitening only the rank's rows is materially different (so the check has teeth).
        if res["slice_whitening_vs_whole_rows"] is not None:
            assert res["slice_whitening_vs_whole_rows"] > 0.1, res


def _split_screen(calls: list[dict], n_tensors: int):
    """The first collective of a step is the screening all-reduce: one fp32 sum of squares per tensor
    plus one fp32 non-finite counter (bounded, and returned separately from the rule's payload)."""
    screen, rest = calls[0], calls[1:]
    assert screen["op"] == "all_reduce" and screen["dtype"] == "torch.float32"
    assert screen["bytes"] <= 4 * (n_tensors + 1)
    return screen["bytes"], rest


@pytest.mark.parametrize("world", WORLDS)
def test_payload_sinkgd_vectors_only(world):
    iterations = so.SinkGDConfig().iterations
    bound = sum(2 * iterations * (m + n) * 4 for m, n in MATRICES.values())
    vector = sum(m + n for m, n in MATRICES.values()) * 4
    for res in CASES.result("payload_sinkgd", world):
        for step in res["per_step"]:
            calls = step["calls"]
            assert step["bytes_sent"] == sum(c["bytes"] for c in calls)  # the counter is honest
            screen, rest = _split_screen(calls, res["n_tensors"])
            assert all(c["op"] == "all_reduce" and c["bytes"] <= vector for c in rest)  # vectors, not matrices
            assert len(rest) <= 2 * iterations
            assert sum(c["bytes"] for c in rest) <= bound
            # Under Shard(0) rows are whole: only the L column-statistics vectors travel.
            assert sum(c["bytes"] for c in rest) == iterations * sum(n for _, n in MATRICES.values()) * 4


@pytest.mark.parametrize("world", WORLDS)
def test_payload_sgdsai_scalars_only(world):
    for res in CASES.result("payload_sgdsai", world):
        for i, step in enumerate(res["per_step"]):
            calls = step["calls"]
            assert step["bytes_sent"] == sum(c["bytes"] for c in calls)
            screen, rest = _split_screen(calls, res["n_tensors"])
            if i == 0:  # the g-SNR: (sum, sum of squares) in float64 per tensor, once (one call per group)
                assert all(c["op"] == "all_reduce" and c["dtype"] == "torch.float64" for c in rest), rest
                assert sum(c["bytes"] for c in rest) == 2 * 8 * res["n_tensors"]
            else:
                assert rest == []


@pytest.mark.parametrize("world", WORLDS)
def test_payload_swan_fragments_to_owner_and_back(world):
    per_rank = CASES.result("payload_swan", world)
    total_matrix_bytes = sum(m * n * 4 for m, n in MATRICES.values())
    assert sum(res["own_matrix_bytes"] for res in per_rank) == total_matrix_bytes
    for step in range(len(per_rank[0]["per_step"])):
        sent = []
        for res in per_rank:
            st = res["per_step"][step]
            assert st["bytes_sent"] == sum(c["bytes"] for c in st["calls"])
            screen, rest = _split_screen(st["calls"], res["n_tensors"])
            assert rest and all(c["op"] == "all_to_all" and c["dtype"] == "torch.float32" for c in rest)
            gathers = rest[0::2]  # each chunk: gather to owners, then scatter back
            # A rank ships at most its own fragments to the owners.
            assert sum(c["bytes"] for c in gathers) <= res["own_matrix_bytes"]
            sent.append(sum(c["bytes"] for c in rest))
            # Per rank <= 2 x its own fp32 fragments: holds here because owners are FLOP-balanced
            # (an owner sends back what others sent it); the exact invariant is the sum below.
            assert sent[-1] <= 2 * res["own_matrix_bytes"]
        # Over all ranks every non-owner piece travels exactly twice: <= 2 x all ranks' own fp32 fragments.
        assert sum(sent) <= 2 * total_matrix_bytes
        assert sum(sent) > 0


@pytest.mark.parametrize("opt", ("swan", "sinkgd", "sgdsai"))
@pytest.mark.parametrize("world,mesh,decided", [(2, "1d", ""), (3, "1d", ""), (4, "1d", ""), (4, "hsdp", ""),
                                                (3, "1d", "device_"), (4, "hsdp", "device_")])
def test_nan_on_one_rank_skips_everywhere(opt, world, mesh, decided):
    # HSDP: the NaN is on rank 3 (replica 1); ranks 0 and 1 (replica 0) must skip too. "device_": the
    # skip decided on the device (capturable=True), from the same all-reduced flags, without a host read.
    per_rank = CASES.result(f"nan_{decided}{opt}" if mesh == "1d" else f"nan_hsdp_{decided}{opt}", world)
    for r, res in enumerate(per_rank):
        assert not res[0]["unchanged"] and res[0]["skipped"] == 0, (r, res[0])
        bad = res[1]
        assert bad["unchanged"] and bad["state_unchanged"] and bad["finite"], (r, bad)
        assert bad["skipped"] == 1, (r, bad)
        assert bad["group_steps_after"] == bad["group_steps_before"], (r, bad)
        assert not res[2]["unchanged"] and res[2]["finite"] and res[2]["skipped"] == 1, (r, res[2])
