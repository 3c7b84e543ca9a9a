"""Checkpoints across backends, world sizes and ZeRO stages: the portable checkpoint, DCP (FSDP2), and
DeepSpeed's universal checkpoint through our converter.

One chain per optimizer (SWAN and SinkGD with the AdamW fallback, SGD-SaI), two steps per hop, each hop
resuming from the checkpoint an earlier one wrote, in a tmp dir the spawns share. Three spawns, one per
world size (tests/dist_harness.py; every backend of a world size in the same spawn), plus this process:

    2 ranks   ZeRO-2 from scratch: steps 0-1 -> portable P_A, and DeepSpeed's own checkpoint of it
              FSDP2 <- P_A: steps 2-3 -> P_C, and DCP checkpoints of that state (default StateDictOptions
              D_C; torchtitan's flattened ones D_Cf) and its full tensors gathered by the test (T_C)
    here      our ds_to_universal: DeepSpeed's checkpoint -> U_A
              1 process <- P_C: steps 4-5 -> P_D;   <- D_C, D_Cf, T_C: steps 4-5
    3 ranks   ZeRO-3 <- P_D: steps 6-7 -> P_B;   ZeRO-3 <- P_A and <- U_A ("load_universal"): steps 2-3
              FSDP2 <- D_C, D_Cf, T_C, P_C: steps 4-5;   DDP <- P_B: steps 8-9 -> P_E
    1 rank    ZeRO-1 <- P_E: steps 10-11;   ZeRO-2 <- U_A ("load_universal"): steps 2-3

What is asserted, and why it is the user's guarantee:
* load then save is the identity across layouts: right after each load the hop saves again ("echo"),
  and the echo holds exactly (bitwise) the saved weights, state tensors, counters and hyper-parameters;
* a resumed run continues as the uninterrupted one: every hop's weights after each step match the
  single-process run of all the steps without any checkpoint (fp32, same global batch each step) to
  1e-5 (SWAN's unconverged iterative whitening: 1e-4), test_deepspeed.py's tolerances: the fp32
  reduction order differs between layouts (measured here: <= 3.6e-7 after 12 steps); dropping the
  fallback's moments or SGD-SaI's momentum or scales moves the weights by ~1e-3 and more;
* where two checkpoints hold the same state (DCP, the portable checkpoint, the truth injected by hand;
  universal vs portable), the continuations at one layout are bitwise equal: DCP with default options
  and with torchtitan's ``flatten_optimizer_state_dict`` resumes exactly as the uninterrupted run from
  that state would, at 3 ranks and in 1 process.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import optim_db
from dist_harness import Registry

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DCP's notice when it loads in one process (what the 1-process resume does on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

KINDS = ("swan", "sinkgd", "sgdsai")  # catalogue rows: SWAN/SinkGD with the AdamW fallback, SGD-SaI
GLOBAL = 12  # samples per step, split evenly over 1, 2 or 3 ranks
STEPS_PER_HOP = 2
TOTAL = 12
# The parent's tmp dir (created when the first hop runs), handed to the spawns as an argument.
ROOT = Path(tempfile.gettempdir()) / f"stateless_opt_ckpt_{os.getpid()}"


def tol(kind: str) -> float:
    return 1e-4 if optim_db.info(kind).amplifies_rounding else 1e-5


# ============================================================================================ common
def hyper(kind):
    import test_deepspeed as D

    return D.hyper(kind)


def fresh_model(seed=0):
    import test_deepspeed as D

    return D._model(seed)


def batch(step: int, world: int, rank: int):
    g = torch.Generator().manual_seed(7919 * step + 11)
    ids = torch.randint(0, 13, (GLOBAL, 3), generator=g)
    y = torch.randn(GLOBAL, 5, generator=g)
    per = GLOBAL // world
    return ids[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def make_opt(kind, groups):
    return optim_db.info(kind).make(groups, **hyper(kind))


def full_weights(model, zero3_engine=None) -> dict[str, torch.Tensor]:
    """Full fp64 copies by name (gathered: DTensors, ZeRO-3); every rank takes part."""
    from torch.distributed.tensor import DTensor

    if zero3_engine is not None:
        import deepspeed

        params = dict(zero3_engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().double().clone() for n, p in params.items()}
    inner = getattr(model, "module", model)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().double().clone()
            for n, p in inner.named_parameters()}


class Run:
    """One model + optimizer at one layout: step(t) trains on this rank's slice of step t's batch."""

    def __init__(self, backend, model, opt, rank, world, engine=None, stage=0):
        self.backend, self.model, self.opt, self.rank, self.world = backend, model, opt, rank, world
        self.engine, self.stage = engine, stage

    def step(self, t):
        ids, y = batch(t, self.world, self.rank)
        if self.engine is not None:
            loss = F.mse_loss(self.engine(ids).float(), y)
            self.engine.backward(loss)
            self.engine.step()
        else:
            F.mse_loss(self.model(ids).float(), y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def train(self, start, steps=STEPS_PER_HOP):
        traj = []
        for t in range(start, start + steps):
            self.step(t)
            traj.append(self.weights())
        return traj if self.rank == 0 else None

    def weights(self):
        return full_weights(self.model, self.engine if self.stage == 3 else None)

    @property
    def target(self):
        """What save_portable / load_portable take: the engine, or the module."""
        return self.engine if self.engine is not None else self.model

    def close(self):
        if self.engine is not None:
            import test_deepspeed as D

            D._finish(self.engine)


def build(ctx, backend: str, kind: str, *, seed=1, universal=False, bf16=False):
    """A fresh run (other init than the chain's, so a load that does nothing shows). ``bf16``: DeepSpeed
    with bf16 weights and fp32 masters (ZeRO-1: DeepSpeed's BF16_Optimizer, fp32 gradient accumulation)."""
    model = fresh_model(seed)
    from stateless_opt import param_groups

    if backend == "single":
        return Run(backend, model, make_opt(kind, param_groups(model)), 0, 1)
    if backend == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return Run(backend, ddp, make_opt(kind, param_groups(ddp)), ctx.rank, ctx.world)
    if backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return Run(backend, model, make_opt(kind, param_groups(model)), ctx.rank, ctx.world)
    import test_deepspeed as D

    deepspeed, _ = D._ds(ctx)
    stage = int(backend[-1])
    cfg = D._cfg(stage, mb=GLOBAL // ctx.world, gas=1, clip=0.0, bf16=bf16)
    if bf16 and stage == 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_opt(kind, param_groups(model)), config=cfg)
    return Run(backend, engine.module, engine.basic_optimizer, ctx.rank, ctx.world, engine=engine, stage=stage)


def where(root, kind, name) -> Path:
    return Path(root) / kind / name


def hop(ctx, root, kind, backend, source, start, save_as=None, after=None, bf16=False):
    """A fresh run (other init) loads ``source``, saves an echo, trains two steps from global step
    ``start``, saves ``save_as`` (and calls ``after(run)``)."""
    from stateless_opt.checkpoint import load_portable, save_portable

    run = build(ctx, backend, kind, bf16=bf16)
    before = run.weights()
    load_portable(run.target, run.opt, where(root, kind, source))
    save_portable(run.target, run.opt, where(root, kind, f"{source}_echo_{backend}_{ctx.world}"))
    loaded = run.weights()
    out = {"load_moved": max(float((before[n] - loaded[n]).abs().max()) for n in before), "traj": run.train(start)}
    if save_as:
        save_portable(run.target, run.opt, where(root, kind, save_as))
    if after is not None:
        after(run)
    run.close()
    return out


# ============================================================================================ the hops
def elastic_refused(ctx, kind):
    """``elastic_checkpoint`` is refused (every optimizer), naming the portable checkpoint."""
    import test_deepspeed as D

    deepspeed, _ = D._ds(ctx)
    from stateless_opt import param_groups

    model = fresh_model(0)
    cfg = D._cfg(2, mb=GLOBAL // ctx.world, gas=1, clip=0.0, zero={"elastic_checkpoint": True})
    try:
        deepspeed.initialize(model=model, optimizer=make_opt(kind, param_groups(model)), config=cfg)
    except ValueError as err:
        return str(err)
    return None


def truth(run) -> dict:
    """The full weights, state tensors and group counters, gathered by the test (DTensor.full_tensor)."""
    from torch.distributed.tensor import DTensor

    names = {p: n for n, p in run.model.named_parameters()}

    def f(v):
        return (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()

    return {"weights": {n: f(p) for p, n in names.items()},
            "state": {names[p]: {k: f(v) for k, v in st.items()} for p, st in run.opt.state.items()},
            "groups": [{"step": g["step"], "skipped_steps": g["skipped_steps"]} for g in run.opt.param_groups]}


def dcp_save(run, root, kind):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    for name, flatten in (("D_C", False), ("D_Cf", True)):
        msd, osd = get_state_dict(run.model, run.opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(where(root, kind, name)))


def dcp_load(run, path, flatten: bool):
    """DCP's documented resume: the live state dict as template, filled in place, then set."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    msd, osd = get_state_dict(run.model, run.opt, options=options)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(path), no_dist=not torch.distributed.is_initialized())
    set_state_dict(run.model, run.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)


def inject(run, t: dict) -> None:
    """Put the truth into a fresh run by hand (weights, state tensors, counters), with no checkpoint code."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(getattr(run.model, "module", run.model).named_parameters())

    def place(p, v):
        if isinstance(p, DTensor) and v.shape == p.shape and v.dim():
            return distribute_tensor(v, p.device_mesh, p.placements)
        return v.clone()

    with torch.no_grad():
        for n, p in params.items():
            dst = p.to_local() if isinstance(p, DTensor) else p
            dst.copy_(place(p, t["weights"][n]).to_local() if isinstance(p, DTensor) else t["weights"][n])
    run.opt.state.clear()
    for n, st in t["state"].items():
        run.opt.state[params[n]] = {k: place(params[n], v) for k, v in st.items()}
    for g, saved in zip(run.opt.param_groups, t["groups"]):
        g.update(saved)


def from_dcp_and_truth(ctx, root, kind, backend):
    """At this layout: continue steps 4-5 from D_C, D_Cf, the truth T_C and the portable P_C."""
    from stateless_opt.checkpoint import load_portable

    out = {}
    for name in ("D_C", "D_Cf", "T_C", "P_C"):
        run = build(ctx, backend, kind)
        if name == "T_C":
            inject(run, torch.load(where(root, kind, "T_C.pt"), weights_only=True))
        elif name == "P_C":
            load_portable(run.model, run.opt, where(root, kind, name))
        else:
            dcp_load(run, where(root, kind, name), flatten=name == "D_Cf")
        out[name] = run.train(4)
        run.close()
    return out


def universal_hop(ctx, root, kind, backend, bf16=False):
    """A DeepSpeed engine with "load_universal": true resumes U_A (the tag from latest_universal)."""
    from stateless_opt.checkpoint import save_portable

    run = build(ctx, backend, kind, universal=True, bf16=bf16)
    ds, tag = ("ds_bf16", "U_bf16") if bf16 else ("ds", None)
    run.engine.load_checkpoint(str(where(root, kind, ds)), tag=tag)
    save_portable(run.engine, None, where(root, kind, f"{'U_bf16' if bf16 else 'U_A'}_echo_{backend}_{ctx.world}"))
    steps = run.engine.global_steps  # DeepSpeed's own counter, from the copied model states
    out = {"traj": run.train(2), "global_steps": steps}
    run.close()
    return out


def two_ranks(ctx, root, kind):
    """ZeRO-2 from scratch -> P_A and DeepSpeed's checkpoint; FSDP2 <- P_A -> P_C, DCP, truth; the same
    with bf16 weights and fp32 masters (BF16_Optimizer) -> P_bf16 and DeepSpeed's checkpoint."""
    from stateless_opt.checkpoint import save_portable

    run = build(ctx, "zero2", kind, seed=0)
    out = {"a": {"traj": run.train(0)}}
    save_portable(run.engine, None, where(root, kind, "P_A"))
    run.engine.save_checkpoint(str(where(root, kind, "ds")), tag="A")
    run.close()
    out["c"] = hop(ctx, root, kind, "fsdp2", "P_A", 2, save_as="P_C", after=lambda run: _save_c(run, root, kind))
    run = build(ctx, "zero1", kind, seed=0, bf16=True)  # bf16 weights, fp32 masters: BF16_Optimizer
    run.train(0)
    save_portable(run.engine, None, where(root, kind, "P_bf16"))
    run.engine.save_checkpoint(str(where(root, kind, "ds_bf16")), tag="B")
    run.close()
    return out


def _save_c(run, root, kind):
    dcp_save(run, root, kind)
    t = truth(run)
    if run.rank == 0:
        torch.save(t, where(root, kind, "T_C.pt"))


def three_ranks(ctx, root, kind):
    return {
        "bf16": hop(ctx, root, kind, "zero3", "P_bf16", 2, bf16=True),
        "bf16_universal": universal_hop(ctx, root, kind, "zero3", bf16=True),
        "zero3": hop(ctx, root, kind, "zero3", "P_D", 6, save_as="P_B"),
        "zero3_from_a": hop(ctx, root, kind, "zero3", "P_A", 2),
        "universal": universal_hop(ctx, root, kind, "zero3"),
        "fsdp2": from_dcp_and_truth(ctx, root, kind, "fsdp2"),
        "ddp": hop(ctx, root, kind, "ddp", "P_B", 8, save_as="P_E"),
    }


def one_rank(ctx, root, kind):
    return {"zero1": hop(ctx, root, kind, "zero1", "P_E", 10), "universal": universal_hop(ctx, root, kind, "zero2")}


def hsdp_round_trip(ctx, opt):
    """HSDP (2 replicas x 2 shards) saves mid-run; HSDP and plain FSDP2 over 4 ranks resume from it.
    Rides in test_fsdp2's 4-rank spawn (self-contained: its own tmp dir)."""
    import torch.distributed as dist

    import test_fsdp2 as T
    from stateless_opt.checkpoint import load_portable, save_portable

    box = [tempfile.mkdtemp(prefix="hsdp_ckpt_") if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    path = Path(box[0])

    def run_(mesh):
        model = T.shard(T.make_model(ctx.device), T.get_mesh(ctx, mesh))
        return model, T.make_opt(opt, model)

    def steps(model, optimizer, start):
        traj = []
        for t in range(start, start + 2):
            x, y = T.global_batch(t, ctx.device)
            T.loss_fn(model(x.chunk(ctx.world)[ctx.rank]), y.chunk(ctx.world)[ctx.rank]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            traj.append({n: v.double() for n, v in T.snapshot(model).items()})
        return traj

    model, optimizer = run_("hsdp")
    steps(model, optimizer, 0)
    save_portable(model, optimizer, path / "P")
    at_save = {n: v.double() for n, v in T.snapshot(model).items()}
    out = {"uninterrupted": steps(model, optimizer, 2)}
    for mesh in ("hsdp", "1d"):
        model, optimizer = run_(mesh)
        load_portable(model, optimizer, path / "P")
        save_portable(model, optimizer, path / f"echo_{mesh}")
        out[mesh] = steps(model, optimizer, 2)
    dist.barrier()
    if ctx.rank == 0:
        from stateless_opt.checkpoint import read_portable

        same = []
        for mesh in ("hsdp", "1d"):
            try:
                assert_same_checkpoint(path / "P", path / f"echo_{mesh}")
                same.append(True)
            except AssertionError:
                same.append(False)
        out["echo_same"] = same
        out["rel_1d"] = max(float((a[n] - b[n]).abs().max() / (a[n] - at_save[n]).abs().max())
                            for a, b in zip(out["uninterrupted"], out["1d"]) for n in a)
        out["pieces"] = {n: len(t["pieces"]) for n, t in read_portable(path / "P")["index"]["tensors"].items()}
        shutil.rmtree(path, ignore_errors=True)
    return out


def box_run(grid, row, ctx_rank=None):
    """test_box_layouts' weights as a named module, with its box layout over ``grid`` (None: one
    process, no layout) and catalogue row ``row``'s optimizer, as test_box_layouts builds them."""
    import test_box_layouts as B

    shapes = {**B.MATRICES, **B.FALLBACK}
    full = B._weights()
    tensors: dict = {}
    layout = B.BoxLayout(grid, tensors, shapes) if grid else None
    module = torch.nn.ParameterDict(
        {n: torch.nn.Parameter(layout.local(n, w) if layout else w.clone()) for n, w in full.items()})
    for n, p in module.items():
        tensors[id(p)] = n
    info = optim_db.info(row)
    if info.splits_rules:
        groups = [{"params": [module[n] for n in B.MATRICES], "rule": "matrix"},
                  {"params": [module[n] for n in B.FALLBACK], "rule": "fallback"}]
        opt = info.make(groups, lr=B.LR, weight_decay=B.WD, fallback_lr_ratio=1.0)
    else:
        opt = info.make(list(module.values()), lr=B.LR, weight_decay=B.WD)
    if layout:
        opt.add_layout(layout)

    def step(t):
        grads = B._grads(t)
        for n, p in module.items():
            p.grad = layout.local(n, grads[n]) if layout else grads[n].clone()
        opt.step()

    return module, opt, layout, step


def box_save_and_regrid(ctx, row, grid, other, root):
    """Tensor-parallel-like boxes: 2 steps on ``grid``, save, then a fresh run on the ``other`` grid
    loads it and takes step 2 (returns its pieces); the parent resumes the checkpoint in one process."""
    from stateless_opt.checkpoint import load_portable, save_portable

    module, opt, layout, step = box_run(grid, row)
    step(0)
    step(1)
    path = Path(root) / f"box_{row}_{grid[0]}x{grid[1]}"
    save_portable(module, opt, path)
    module, opt, layout, step = box_run(other, row)
    with torch.no_grad():
        for p in module.values():
            p.zero_()
    load_portable(module, opt, path)
    step(2)
    return {n: (layout.extents[n][ctx.rank], p.detach().clone()) for n, p in module.items()}


def _ride_fsdp2_spawn():
    import test_fsdp2

    for k in ("swan", "sgdsai"):
        test_fsdp2.CASES.add(f"hsdp_portable_{k}", hsdp_round_trip, (4,), opt=k)
        test_fsdp2.CASES.add(f"box_portable_cols_{k}", box_save_and_regrid, (2,), row=k, grid=(1, 2), other=(2, 1),
                             root=str(ROOT))
        test_fsdp2.CASES.add(f"box_portable_2x2_{k}", box_save_and_regrid, (4,), row=k, grid=(2, 2), other=(1, 4),
                             root=str(ROOT))


_ride_fsdp2_spawn()

SPAWNS = {world: Registry(__name__) for world in (2, 3, 1)}
for _k in KINDS:
    SPAWNS[2].add(f"two_{_k}", two_ranks, (2,), root=str(ROOT), kind=_k)
    SPAWNS[2].add(f"elastic_{_k}", elastic_refused, (2,), kind=_k)
    SPAWNS[3].add(f"three_{_k}", three_ranks, (3,), root=str(ROOT), kind=_k)
    SPAWNS[1].add(f"one_{_k}", one_rank, (1,), root=str(ROOT), kind=_k)
TIMEOUT = float(os.environ.get("DIST_TEST_TIMEOUT", "480"))


# ============================================================================================ parent side
_DONE: dict = {}


def reference(kind):
    """The uninterrupted single-process run of all TOTAL steps: weights after each step."""
    if kind not in _DONE:
        from stateless_opt import param_groups

        model = fresh_model(0)
        opt = make_opt(kind, param_groups(model))
        run = Run("single", model, opt, 0, 1)
        _DONE[kind] = run.train(0, TOTAL)
    return _DONE[kind]


def assert_follows(traj, kind, start):
    ref = reference(kind)
    assert traj is not None and len(traj) == STEPS_PER_HOP
    err = max(float((w[n] - ref[start + i][n]).abs().max()) for i, w in enumerate(traj) for n in w)
    assert err <= tol(kind), (kind, start, err)
    return err


def assert_same_checkpoint(a: Path, b: Path):
    """Two portable checkpoints hold the same weights, state and hyper-parameters, bitwise."""
    from stateless_opt.checkpoint import read_portable

    x, y = read_portable(a), read_portable(b)
    assert x["groups"] == y["groups"]
    assert x["weights"].keys() == y["weights"].keys() and x["state"].keys() == y["state"].keys()
    for n in x["weights"]:
        assert torch.equal(x["weights"][n], y["weights"][n]), n
        assert x["state"][n].keys() == y["state"][n].keys(), n
        for k in x["state"][n]:
            assert torch.equal(x["state"][n][k], y["state"][n][k]) or (
                x["state"][n][k].isnan().all() and y["state"][n][k].isnan().all()), (n, k)
    return x


def read_index(path: Path) -> dict:
    import json

    return json.loads((Path(path) / "portable.json").read_text())


def assert_bitwise(a: list, b: list):
    assert a is not None and b is not None and len(a) == len(b)
    for x, y in zip(a, b):
        assert [n for n in x if not torch.equal(x[n], y[n])] == []


# A spawn runs its cases for every optimizer at once, so each stage first makes sure the earlier ones
# ran for every optimizer.
def stage_two(kind):
    ROOT.mkdir(exist_ok=True)
    return SPAWNS[2].result(f"two_{kind}", 2, timeout=TIMEOUT)[0]


def stage_here(kind):
    """In this process: our ds_to_universal (as a user runs it), then 1 process <- P_C, D_C, D_Cf, T_C."""
    for k in KINDS:
        stage_two(k)
    if ("here", kind) not in _DONE:
        from dist_harness import Ctx

        from stateless_opt.integrations.ds_to_universal import main as ds_to_universal

        ds = where(ROOT, kind, "ds")
        ds_to_universal(["--input_folder", str(ds / "A"), "--output_folder", str(ds / "U_A")])
        ds = where(ROOT, kind, "ds_bf16")
        ds_to_universal(["--input_folder", str(ds / "B"), "--output_folder", str(ds / "U_bf16")])
        ctx = Ctx(0, 1, "gloo", "cpu")
        out = hop(ctx, str(ROOT), kind, "single", "P_C", 4, save_as="P_D")
        out["dcp"] = from_dcp_and_truth(ctx, str(ROOT), kind, "single")
        _DONE[("here", kind)] = out
    return _DONE[("here", kind)]


def stage_three(kind):
    for k in KINDS:
        stage_here(k)
    return SPAWNS[3].result(f"three_{kind}", 3, timeout=TIMEOUT)[0]


def stage_one(kind):
    for k in KINDS:
        stage_three(k)
    return SPAWNS[1].result(f"one_{kind}", 1, timeout=TIMEOUT)[0]


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(ROOT, ignore_errors=True)


atexit.register(shutil.rmtree, ROOT, True)  # also when only the cases riding test_fsdp2's spawns ran


# ============================================================================================ tests
def check_hop(r: dict, kind: str, source: str, echo: str, start: int):
    assert r["load_moved"] > 1e-3  # the fresh run started elsewhere: the load did something
    assert_same_checkpoint(where(ROOT, kind, source), where(ROOT, kind, echo))
    assert_follows(r["traj"], kind, start)


@pytest.mark.parametrize("kind", KINDS)
def test_portable_zero2_2_ranks_to_fsdp2_2_ranks(kind):
    r = stage_two(kind)
    assert_follows(r["a"]["traj"], kind, 0)
    check_hop(r["c"], kind, "P_A", "P_A_echo_fsdp2_2", 2)


@pytest.mark.parametrize("kind", KINDS)
def test_portable_fsdp2_2_ranks_to_one_process(kind):
    check_hop(stage_here(kind), kind, "P_C", "P_C_echo_single_1", 4)


@pytest.mark.parametrize("kind", KINDS)
def test_portable_one_process_to_zero3_3_ranks(kind):
    check_hop(stage_three(kind)["zero3"], kind, "P_D", "P_D_echo_zero3_3", 6)


@pytest.mark.parametrize("kind", KINDS)
def test_portable_zero2_2_ranks_to_zero3_3_ranks(kind):
    check_hop(stage_three(kind)["zero3_from_a"], kind, "P_A", "P_A_echo_zero3_3", 2)


@pytest.mark.parametrize("kind", KINDS)
def test_portable_zero3_3_ranks_to_ddp_3_ranks(kind):
    check_hop(stage_three(kind)["ddp"], kind, "P_B", "P_B_echo_ddp_3", 8)


@pytest.mark.parametrize("kind", KINDS)
def test_portable_ddp_3_ranks_to_zero1_1_rank(kind):
    check_hop(stage_one(kind)["zero1"], kind, "P_E", "P_E_echo_zero1_1", 10)


@pytest.mark.parametrize("kind", KINDS)
def test_universal_zero2_2_ranks_to_zero3_3_ranks(kind):
    """ds_to_universal (ours) + "load_universal": world 2 -> 3 and stage 2 -> 3. The engine holds the
    state the portable checkpoint of the same moment holds (bitwise), and continues bitwise as the
    engine that loaded that portable checkpoint (same layout, same state)."""
    r = stage_three(kind)
    assert_same_checkpoint(where(ROOT, kind, "P_A"), where(ROOT, kind, "U_A_echo_zero3_3"))
    assert r["universal"]["global_steps"] == 2
    assert_follows(r["universal"]["traj"], kind, 2)
    assert_bitwise(r["universal"]["traj"], r["zero3_from_a"]["traj"])


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_masters_zero1_2_ranks_to_zero3_3_ranks(kind):
    """bf16 weights with fp32 masters (DeepSpeed's BF16_Optimizer at 2 ranks -> ZeRO-3 bf16 at 3): the
    fp32 masters and the state move exactly, through the portable and the universal checkpoint, and
    the two continue bitwise alike."""
    r = stage_three(kind)
    assert_same_checkpoint(where(ROOT, kind, "P_bf16"), where(ROOT, kind, "P_bf16_echo_zero3_3"))
    assert_same_checkpoint(where(ROOT, kind, "P_bf16"), where(ROOT, kind, "U_bf16_echo_zero3_3"))
    assert read_index(where(ROOT, kind, "P_bf16"))["tensors"]["weight/l1.weight"]["dtype"] == "float32"
    assert r["bf16"]["load_moved"] > 1e-3
    assert_bitwise(r["bf16"]["traj"], r["bf16_universal"]["traj"])


@pytest.mark.parametrize("kind", KINDS)
def test_universal_zero2_2_ranks_to_zero2_1_rank(kind):
    r = stage_one(kind)["universal"]
    assert_same_checkpoint(where(ROOT, kind, "P_A"), where(ROOT, kind, "U_A_echo_zero2_1"))
    assert r["global_steps"] == 2
    assert_follows(r["traj"], kind, 2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where_", ("one_process", "fsdp2_3_ranks"))
def test_dcp_from_fsdp2_2_ranks_resumes_exactly_as_uninterrupted(kind, where_):
    """FSDP2 at 2 ranks saved with DCP (default StateDictOptions, and torchtitan's flattened ones):
    loading at 3 ranks / in 1 process continues bitwise as the truth injected by hand does, and as
    the portable checkpoint of the same state."""
    r = stage_here(kind)["dcp"] if where_ == "one_process" else stage_three(kind)["fsdp2"]
    for name in ("D_C", "D_Cf", "P_C"):
        assert_bitwise(r["T_C"], r[name])
    assert_follows(r["T_C"], kind, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_elastic_checkpoint_refused_naming_the_portable_checkpoint(kind):
    stage_two(kind)
    msg = SPAWNS[2].result(f"elastic_{kind}", 2, timeout=TIMEOUT)[0]
    assert msg and "elastic_checkpoint" in msg and "save_portable" in msg and "ds_to_universal" in msg, msg


# ============================================================================================ no code runs
def _touch(path):
    Path(path).write_text("this ran")


class Evil:
    """A pickled object that runs code when unpickled (what a hostile checkpoint carries)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_converter_refuses_a_deepspeed_checkpoint_carrying_a_pickled_object(tmp_path):
    from stateless_opt.checkpoint import CheckpointError
    from stateless_opt.integrations.ds_to_universal import convert

    stage_two("swan")
    src = tmp_path / "A"
    shutil.copytree(where(ROOT, "swan", "ds") / "A", src)
    optim = next(src.glob("*optim_states.pt"))
    sd = torch.load(optim, weights_only=False)  # our own test file: trusted
    marker = tmp_path / "ran"
    sd["optimizer_state_dict"]["extra"] = Evil(str(marker))
    torch.save(sd, optim)
    with pytest.raises(CheckpointError, match="_touch"):
        convert(src, tmp_path / "U")
    assert not marker.exists()


def test_portable_checkpoint_carrying_a_pickle_is_refused(tmp_path):
    from stateless_opt import param_groups
    from stateless_opt.checkpoint import load_portable

    stage_two("swan")
    src = tmp_path / "P"
    shutil.copytree(where(ROOT, "swan", "P_A"), src)
    marker = tmp_path / "ran"
    for f in src.glob("rank*.safetensors"):  # a pickle where a safetensors file should be
        torch.save({"weights": Evil(str(marker))}, f)
    model = fresh_model(1)
    with pytest.raises(Exception) as err:
        load_portable(model, make_opt("swan", param_groups(model)), src)
    assert "safetensors" in type(err.value).__module__.lower() or "header" in str(err.value).lower(), err.value
    assert not marker.exists()


@pytest.mark.parametrize("kind", ("swan", "sgdsai"))
def test_portable_hsdp_2x2_to_hsdp_and_fsdp2_4_ranks(kind):
    """Replicas write their pieces once (each weight's shard pieces tile it exactly, checked when the
    index is written); HSDP resumes bitwise as the uninterrupted HSDP run, 1-D FSDP2 over the same 4
    ranks within test_fsdp2.py's tolerance relative to how far the weights moved (the same reasons:
    only the order of fp32 sums differs)."""
    import test_fsdp2

    r = test_fsdp2.CASES.result(f"hsdp_portable_{kind}", 4)[0]
    assert r["echo_same"] == [True, True]
    assert r["pieces"]["weight/l1.weight"] == 2  # 13 rows over 2 shards, written by one replica only
    assert_bitwise(r["uninterrupted"], r["hsdp"])
    assert r["rel_1d"] <= test_fsdp2.REL_TOL[kind], r["rel_1d"]


# ============================================================================================ one process
def _single(kind, seed=0):
    from stateless_opt import param_groups

    model = fresh_model(seed)
    return model, make_opt(kind, param_groups(model))


@pytest.mark.parametrize("row", [r.id for r in optim_db.OPTIM_DB])
def test_every_catalogue_row_resumes_bitwise_in_one_process(row, tmp_path):
    """Every optimizer variant's state (stateless, AdamW, row-clip, SGD-SaI's and its AdamW-fallback
    hybrid's) goes through the portable checkpoint: a fresh optimizer that loads it after 2 steps
    continues bitwise as the uninterrupted run, and saves back the same checkpoint."""
    from stateless_opt.checkpoint import load_portable, save_portable

    model, opt = _single(row)
    run = Run("single", model, opt, 0, 1)
    run.train(0)
    save_portable(model, opt, tmp_path / "a")
    uninterrupted = run.train(2)
    model2, opt2 = _single(row, seed=1)
    load_portable(model2, opt2, tmp_path / "a")
    save_portable(model2, opt2, tmp_path / "echo")
    assert_same_checkpoint(tmp_path / "a", tmp_path / "echo")
    assert_bitwise(uninterrupted, Run("single", model2, opt2, 0, 1).train(2))


def test_param_names_stay_this_runs(tmp_path):
    """A group's ``param_names`` name this run's tensors (e.g. with a DDP wrapper's ``module.`` prefix):
    a portable checkpoint, which finds weights by the model's names, does not write the saved run's
    names over them."""
    from stateless_opt import param_groups
    from stateless_opt.checkpoint import load_portable, save_portable

    def named(prefix, seed):
        model = fresh_model(seed)
        groups = [{**g, "param_names": [prefix + n for n in g["param_names"]]} for g in param_groups(model)]
        return model, make_opt("swan", groups)

    model, opt = named("saved.", 0)
    Run("single", model, opt, 0, 1).train(0)
    save_portable(model, opt, tmp_path / "a")
    model2, opt2 = named("module.", 1)
    before = [list(g["param_names"]) for g in opt2.param_groups]
    load_portable(model2, opt2, tmp_path / "a")
    assert [g["param_names"] for g in opt2.param_groups] == before


def test_consolidated_checkpoint_holds_the_same_and_loads(tmp_path):
    """``consolidate`` (one piece per tensor) of a 2-rank ZeRO-2 checkpoint: same content, same resume."""
    from stateless_opt.checkpoint import consolidate, load_portable, read_portable

    stage_two("sgdsai")
    out = consolidate(where(ROOT, "sgdsai", "P_A"), tmp_path / "one")
    assert_same_checkpoint(where(ROOT, "sgdsai", "P_A"), out)
    assert all(len(t["pieces"]) == 1 for t in read_portable(out)["index"]["tensors"].values())
    runs = []
    for src in (where(ROOT, "sgdsai", "P_A"), out):
        model, opt = _single("sgdsai", seed=1)
        load_portable(model, opt, src)
        runs.append(Run("single", model, opt, 0, 1).train(2))
    assert_bitwise(*runs)


def test_load_refuses_what_does_not_fit(tmp_path):
    """Clear errors, before anything is written: another optimizer, another split, other shapes,
    weights missing (strict), unknown state; ``strict=False`` loads the weights both have."""
    from torch import nn

    from stateless_opt import SWAN
    from stateless_opt.checkpoint import CheckpointError, load_portable, save_portable

    model, opt = _single("swan")
    Run("single", model, opt, 0, 1).train(0, 1)
    save_portable(model, opt, tmp_path / "swan")

    other, sgd = _single("sgdsai", seed=1)
    with pytest.raises(CheckpointError, match="holds a 'swan' optimizer"):
        load_portable(other, sgd, tmp_path / "swan")

    m2 = fresh_model(1)
    by_shape = SWAN(m2.parameters(), lr=0.01)  # the embedding (2-D) goes to the matrix rule here
    before = [p.detach().clone() for p in m2.parameters()]
    with pytest.raises(CheckpointError, match="rule"):
        load_portable(m2, by_shape, tmp_path / "swan")
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters()))  # refused before any write

    m3, o3 = _single("swan", seed=1)
    m3.l1 = nn.Linear(6, 8)  # another shape under the same name
    from stateless_opt import param_groups

    o3 = SWAN(param_groups(m3), lr=0.01)
    with pytest.raises(CheckpointError, match=r"l1.weight has shape \(7, 6\)"):
        load_portable(m3, o3, tmp_path / "swan")

    m4, o4 = _single("swan", seed=1)
    m4.extra = nn.Linear(9, 9)
    from stateless_opt import param_groups as pg

    o4 = SWAN(pg(m4), lr=0.01)
    with pytest.raises(CheckpointError, match="extra.weight"):
        load_portable(m4, o4, tmp_path / "swan")
    info = load_portable(m4, o4, tmp_path / "swan", strict=False)
    assert info["missing"] == ["extra.bias", "extra.weight"] and info["unexpected"] == []
    assert torch.equal(m4.l1.weight, model.l1.weight)


def test_state_of_unknown_shape_is_refused_by_name(tmp_path):
    from stateless_opt.checkpoint import CheckpointError, save_portable

    model, opt = _single("sgdsai")
    Run("single", model, opt, 0, 1).train(0, 1)
    opt.state[model.l1.weight]["odd"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="'odd'.*weight_state"):
        save_portable(model, opt, tmp_path / "x")


@pytest.mark.parametrize("kind", ("swan", "sgdsai"))
@pytest.mark.parametrize("grid,world", [("cols", 2), ("2x2", 4)])
def test_portable_box_layouts_to_another_grid_and_one_process(kind, grid, world):
    """Weights cut in boxes (a column split over 2 ranks as tensor parallelism does, a 2 x 2 grid over 4)
    with test_box_layouts' hand-made layout: the checkpoint loads on another grid of the same ranks (rows
    instead of columns) and in one process with no layout (TP 2 -> 1), and the next step equals the
    float64 reference of test_box_layouts (FP32_TOL of the path travelled)."""
    import test_box_layouts as B
    import test_fsdp2
    from test_reference import FP32_TOL

    from stateless_opt.checkpoint import load_portable

    ROOT.mkdir(exist_ok=True)
    per_rank = test_fsdp2.CASES.result(f"box_portable_{grid}_{kind}", world)
    module, opt, _, step = box_run(None, kind)
    with torch.no_grad():
        for p in module.values():
            p.zero_()
    load_portable(module, opt, ROOT / f"box_{kind}_{'1x2' if grid == 'cols' else '2x2'}")
    step(2)
    ref = B._reference(kind)
    start = {n: v.double() for n, v in B._weights().items()}
    regrid = B._assemble([{"pieces": [r]} for r in per_rank], 0)
    for n, want in ref[2].items():
        path = sum((ref[t][n] - (ref[t - 1][n] if t else start[n])).abs().max().item() for t in range(3))
        for got in (regrid[n], module[n].detach().double()):
            assert not got.isnan().any()
            assert (got - want).abs().max().item() / path < FP32_TOL, n



def test_groups_built_another_way_load_when_every_weight_keeps_its_rule(tmp_path):
    """The rule is checked per weight, not per group: a checkpoint saved from ``param_groups(model)``
    loads into the same weights grouped another way (no ``rule`` key where the shape decides, 1-D
    tensors in a group of their own) and continues as the uninterrupted run (bitwise: every weight is
    stepped by the same rule with the same values); a weight whose rule differs (the embedding, whitened
    when built from ``model.parameters()``) is refused by name before anything is loaded."""
    from stateless_opt import param_groups
    from stateless_opt.checkpoint import CheckpointError, load_portable, save_portable

    model, opt = _single("swan")
    run = Run("single", model, opt, 0, 1)
    run.train(0)
    save_portable(model, opt, tmp_path / "a")
    uninterrupted = run.train(2)

    model2 = fresh_model(1)
    named = dict(model2.named_parameters())
    matrices = [p for n, p in named.items() if p.ndim == 2 and n != "emb.weight"]
    vectors = [p for p in named.values() if p.ndim == 1]
    opt2 = make_opt("swan", [{"params": matrices}, {"params": [named["emb.weight"]], "rule": "fallback"},
                             {"params": vectors}])
    load_portable(model2, opt2, tmp_path / "a")
    assert_bitwise(uninterrupted, Run("single", model2, opt2, 0, 1).train(2))

    model3 = fresh_model(2)
    before = {n: p.detach().clone() for n, p in model3.named_parameters()}
    opt3 = make_opt("swan", list(model3.parameters()))
    with pytest.raises(CheckpointError, match=r"emb\.weight: saved stepped by the 'fallback' rule, here by 'matrix'"):
        load_portable(model3, opt3, tmp_path / "a")
    assert all(torch.equal(before[n], p) for n, p in model3.named_parameters())
