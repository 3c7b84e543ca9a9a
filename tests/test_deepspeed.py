"""DeepSpeed ZeRO-1/2/3 integration: registration, layouts, equality with the single-process run.

CPU recipe: ``DS_ACCELERATOR=cpu``, gloo, the JIT shm op skipped; one spawn per (stage, world size)
runs every case of that stage (``tests/dist_harness.py``), and the tests below assert on what the
ranks returned. The model has an embedding (fallback), three Linear weights of odd shapes (7x6, 9x7,
5x9: every ZeRO cut falls mid-row, ZeRO-3 pads them) and 1-D weights some ranks hold nothing of.

Two equality checks, both against our own optimizer run in one process (``LocalLayout``):
* trajectory: DeepSpeed on W ranks vs the single-process run on the same global batch (same clipping),
  several optimizer steps, full weights compared after each. fp32 only.
* feed: at every DeepSpeed optimizer step, the gradient and fp32 master each rank holds are gathered
  (from DeepSpeed's tensors, through the ranges the layout reports, which must tile each weight) and a
  single-process copy of the optimizer is stepped on exactly those; its result must equal the masters
  DeepSpeed holds after the step. This isolates the layout from reduction-order noise and is what we
  check under bf16 (the bf16 forward/backward has no fp32 twin).

Tolerances (max abs error over all weights, largest weight ~3, after 4 steps; measured values in
brackets, CPU, DeepSpeed 0.19.8): 1e-5 for SWAN with ``whitening="eigh"`` [<= 4.5e-7] (exact fp64
polar factor on both sides), SinkGD [<= 2.4e-7] and SGD-SaI [<= 3e-8]: the only difference is the
order of fp32 gradient sums over ranks and micro-batches (~1e-7 relative). SWAN's default iterative
whitening (catalogue rows with ``amplifies_rounding``) gets 1e-4 [<= 4.4e-6 measured with Newton-Schulz]:
its fp32 iterations are not converged on the small singular values of a centred gradient, and that
unconverged part amplifies the ~1e-7 gradient differences ~10x. The feed check (identical inputs on
both sides) is held to 1e-6 [<= 6e-8], 1e-5 for those rows. bf16 runs vs the fp32 single-process run:
2% of the largest weight [<= 0.8%].

The optimizers are rows of the catalogue (``tests/optim_db.py``); the fp32 equality suite runs every
row tagged "zero", with this file's hyper-parameters (``hyper``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time

import pytest

import optim_db
from dist_harness import Registry, default_device_type

os.environ.setdefault("DS_ACCELERATOR", "cpu" if default_device_type() == "cpu" else default_device_type())

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
STAGES = (1, 2, 3)
WORLDS = (2, 3)
TIMEOUT = 480.0
STEPS = 4
PER_RANK = 8  # samples per rank per optimizer step (micro-batch x GAS)

REG = {stage: Registry(__name__) for stage in STAGES}

# A kind is a catalogue row (tests/optim_db.py) with this file's hyper-parameters (fitted to TinyNet);
# rows without an entry take DEFAULT_HYPER.
HYPER = {
    "sinkgd": dict(lr=0.01, fallback_lr_ratio=5.0),
    "sgdsai": dict(lr=0.05, weight_decay=0.01),
}
DEFAULT_HYPER = dict(lr=0.01, weight_decay=0.01, fallback_lr_ratio=5.0)
ZERO_KINDS = tuple(r.id for r in optim_db.rows("zero"))  # the fp32 equality suite


def hyper(kind: str) -> dict:
    """This file's hyper-parameters for a catalogue row (no fallback ratio for elementwise ones)."""
    if kind in HYPER:
        return dict(HYPER[kind])
    hp = dict(DEFAULT_HYPER)
    if not optim_db.info(kind).splits_rules:
        hp.pop("fallback_lr_ratio")
    return hp


def tol(kind: str) -> float:
    """Trajectory tolerance (module docstring): 1e-5, tenfold for an unconverged iterative whitening."""
    return 1e-4 if optim_db.info(kind).amplifies_rounding else 1e-5


def feed_tol(kind: str) -> float:
    """Feed tolerance (identical inputs on both sides): 1e-6, tenfold as ``tol``."""
    return 1e-5 if optim_db.info(kind).amplifies_rounding else 1e-6

BF16_TOL = 0.02  # bf16 model vs the fp32 single-process run, relative to the largest weight
MATRICES = [(7, 6), (9, 7), (5, 9)]  # l1, l2, head
FALLBACK_ROWS = [13, 1, 1, 1, 1]  # emb (13 x 6) and the four 1-D weights, as rows of the stateless rule
N_WEIGHTS = 8


# =========================================================================================== child side
_CACHE: dict = {}


def _ds(ctx):
    """deepspeed on this rank: shm op skipped, init_distributed on the harness's process group."""
    if "ds" not in _CACHE:
        import importlib
        import logging

        import deepspeed

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.utils.logger.setLevel(logging.ERROR)
        deepspeed.init_distributed(dist_backend=ctx.backend)
        import stateless_opt.integrations.deepspeed as sds

        _CACHE["ds"] = (deepspeed, sds)
    return _CACHE["ds"]


def _layout(optimizer):
    """The ZeRO layout the integration attached to our optimizer."""
    from stateless_opt.integrations.deepspeed import layout_of

    return layout_of(optimizer)


def _net_cls():
    from models import TinyNet

    return TinyNet


def _model(seed=0, zero_init_cfg=None):
    import torch

    Net = _net_cls()
    torch.manual_seed(seed)
    if zero_init_cfg is not None:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=zero_init_cfg):
            return Net()
    m = Net()
    with torch.no_grad():  # make the LayerNorm affine non-trivial so its gradients are generic
        m.norm.weight.add_(0.1 * torch.randn(9))
        m.norm.bias.add_(0.1 * torch.randn(9))
    return m


def _batch(step, world, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + step * 17 + 5)
    ids = torch.randint(0, 13, (PER_RANK * world, 3), generator=g)
    y = torch.randn(PER_RANK * world, 5, generator=g)
    return ids, y


def _make_opt(kind, groups, hp=None):
    """Our optimizer for a catalogue row (``hyper(kind)``), or for a JSON ``"type"`` with its params."""
    if kind in optim_db.BY_ID:
        return optim_db.info(kind).make(groups, **(hp if hp is not None else hyper(kind)))
    from stateless_opt import registry

    return registry.lookup(kind).cls(groups, **hp)


def _cfg(stage, mb=4, gas=2, clip=0.05, bf16=False, **extra):
    zero = {"stage": stage, **extra.pop("zero", {})}
    cfg = {
        "train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
        "zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    cfg.update(extra)
    return cfg


def _full_weights(engine, stage):
    """Full fp64 copies of the model's weights (gathered under ZeRO-3); every rank takes part."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().double().cpu().clone() for n, p in params.items()}
    return {n: p.detach().double().cpu().clone() for n, p in params.items()}


class Feed:
    """Record, at every base-optimizer call, each weight piece's gradient and fp32 master before and
    after the call, through the attached layout (see the module docstring)."""

    def __init__(self, engine):
        import torch

        self.base = engine.basic_optimizer
        self.names = {id(p): n for n, p in engine.module.named_parameters()}
        self.records: list = []
        self.calls = 0
        # ZeRO-3: fill the padding of each flat partition with garbage (NaN gradient, huge weight) right
        # before the optimizer runs, as uninitialised memory may hold; it must never matter, and the
        # layout must leave it zeroed.
        self.poisoned, self.pad_clean = 0, True
        orig = self.base.step

        def step(closure=None):
            self.calls += 1
            layout = _layout(self.base)
            recs, flats = [], []
            for gi, g in enumerate(self.base.param_groups):
                for pos, t in enumerate(g["params"]):
                    if t.grad is None:
                        continue
                    flats.append(t)
                    for s, lp in zip(layout.shards(t, g, (gi, pos)), layout.params_of(t)):
                        recs.append([self.names[id(lp)], s.shape, s.local, s.grad.double().cpu().clone(),
                                     s.param.double().cpu().clone(), s.param])
            pads = [(t, w.pad) for t in flats for w in layout.unit(t).weights if w.pad is not None]
            with torch.no_grad():
                for t, (a, b) in pads:
                    t.grad.view(-1)[a:b] = float("nan")
                    t.data.view(-1)[a:b] = 3e38
            self.poisoned += len(pads)
            out = orig(closure)
            with torch.no_grad():
                for r in recs:
                    r[5] = r[5].double().cpu().clone()
                for t, (a, b) in pads:
                    self.pad_clean = self.pad_clean and bool((t.data.view(-1)[a:b] == 0).all())
            self.records.extend(recs)
            return out

        self.base.step = step

    def gather(self):
        """All ranks' pieces of this optimizer step -> {name: (grad, before, after, coverage ok)} on
        rank 0 (None elsewhere)."""
        import torch
        import torch.distributed as dist

        mine = [(n, shape, rng, g, b, a) for n, shape, rng, g, b, a in self.records]
        self.records = []
        allr = [None] * dist.get_world_size()
        dist.all_gather_object(allr, mine)
        if dist.get_rank() != 0:
            return None
        out = {}
        for recs in allr:
            for n, shape, (s, e), g, b, a in recs:
                numel = math.prod(shape)
                if n not in out:
                    out[n] = [torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.float64),
                              torch.zeros(numel, dtype=torch.float64), torch.zeros(numel, dtype=torch.int64), shape]
                fg, fb, fa, cov, _ = out[n]
                fg[s:e], fb[s:e], fa[s:e] = g, b, a
                cov[s:e] += 1
        return {n: (fg, fb, fa, bool((cov == 1).all()), shape) for n, (fg, fb, fa, cov, shape) in out.items()}


class FeedReference:
    """A single-process copy of the optimizer, stepped on exactly the gathered gradients and masters."""

    def __init__(self, kind, hp=None):
        import torch
        from stateless_opt import param_groups

        self.model = _model(0)
        # stepped on rank 0 only: a rank-local optimizer (no vote over the default group on skipping)
        self.opt = _make_opt(kind, param_groups(self.model),
                             {**(hp if hp is not None else hyper(kind)), "replicate_group": False})
        self.params = dict(self.model.named_parameters())
        self.torch = torch

    def check(self, fed) -> tuple[float, bool]:
        torch = self.torch
        with torch.no_grad():
            for n, (g, b, _, _, shape) in fed.items():
                p = self.params[n]
                p.copy_(b.view(shape).float())
                p.grad = g.view(shape).float().clone()
        self.opt.step()
        err, cover = 0.0, True
        for n, (_, _, a, ok, shape) in fed.items():
            err = max(err, float((self.params[n].detach().double().view(-1) - a).abs().max()))
            cover = cover and ok
        cover = cover and set(fed) == set(self.params)
        return err, cover


def _train(engine, ctx, stage, steps, mb, gas, *, bf16=False, start=0, seed=0, feed=None, feed_ref=None, init=None):
    """``steps`` optimizer steps of ``gas`` micro-batches each; returns per-step full weights (rank 0),
    bytes sent by our optimizer per step, feed errors, whether the feed pieces tiled every weight, and
    ``map_err``: the masters the layout located for each weight vs the model's own weights before the
    step (DeepSpeed keeps those from its own bookkeeping; bf16: the master rounded to bf16)."""
    import torch
    import torch.nn.functional as F

    base = engine.basic_optimizer
    dev = next(engine.module.parameters()).device
    traj, sent, feed_err, feed_cover, map_err = [], [], 0.0, True, 0.0
    prev = init
    for t in range(start, start + steps):
        ids, y = _batch(t, ctx.world, seed)
        lo = ctx.rank * PER_RANK
        ids, y = ids[lo : lo + PER_RANK], y[lo : lo + PER_RANK]
        base.reset_comm_counters()
        for m in range(gas):
            out = engine(ids[m * mb : (m + 1) * mb].to(dev))
            loss = F.mse_loss(out.float(), y[m * mb : (m + 1) * mb].to(dev))
            engine.backward(loss)
            engine.step()
        sent.append(base.bytes_sent())
        if feed is not None:
            fed = feed.gather()
            if fed is not None:
                e, c = feed_ref.check(fed)
                feed_err, feed_cover = max(feed_err, e), feed_cover and c
                if prev is not None:
                    cast = (lambda x: x.to(torch.bfloat16).double()) if bf16 else (lambda x: x)
                    map_err = max([map_err] + [float((cast(b) - prev[n].view(-1)).abs().max())
                                               for n, (_, b, _, _, _) in fed.items()])
        traj.append(_full_weights(engine, stage))
        prev = traj[-1]
    return {"traj": traj if ctx.rank == 0 else None, "bytes": sent, "feed_err": feed_err, "feed_cover": feed_cover,
            "map_err": map_err}


def _reference(kind, init, steps, world, clip, seed=0, hp=None):
    """Our optimizer in one process on the global batch: per-step full weights."""
    import torch
    import torch.nn.functional as F
    from stateless_opt import param_groups

    model = _model(0)
    model.load_state_dict({n: v.float() for n, v in init.items()})
    # stepped on rank 0 only: a rank-local optimizer (no vote over the default group on skipping)
    opt = _make_opt(kind, param_groups(model), {**(hp if hp is not None else hyper(kind)), "replicate_group": False})
    traj = []
    for t in range(steps):
        ids, y = _batch(t, world, seed)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(ids), y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        traj.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
    return traj


def _traj_err(a, b):
    return max(float((x[n] - y[n]).abs().max()) for x, y in zip(a, b) for n in x)


def _state_tensors(engine):
    """Number of state tensors (numel > 1) the base optimizer holds, per rule; and SGD-SaI scales."""
    import torch

    base = engine.basic_optimizer
    layout = _layout(base)
    out = {}
    for u in layout.units():
        rule = base.param_groups[u.group_index].get("rule", "matrix") if base.uses_rules else "elementwise"
        st = base.state.get(u.tensor, {})
        out[rule] = out.get(rule, 0) + sum(1 for v in st.values() if torch.is_tensor(v) and v.numel() > 1)
    return out


def _finish(engine):
    try:
        engine.destroy()
    except Exception:  # noqa: BLE001 - best effort
        pass


def _engine(ctx, cfg, door, kind, model=None, seed=0):
    """Build an engine through one door: 'instance', 'callable' or 'json' (the row's class name as the
    JSON type, or the one after 'json:', with the row's variant and ``hyper(kind)`` as params)."""
    deepspeed, _ = _ds(ctx)
    from stateless_opt import param_groups

    model = model if model is not None else _model(seed)
    row = optim_db.info(kind)
    if door == "instance":
        engine, *_ = deepspeed.initialize(model=model, optimizer=_make_opt(kind, param_groups(model)), config=cfg)
    elif door == "callable":
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model), optimizer=lambda ps: _make_opt(kind, ps), config=cfg
        )
    else:
        typ = door.split(":", 1)[1] if ":" in door else row.cls.__name__
        cfg = dict(cfg, optimizer={"type": typ, "params": row.kwargs(**hyper(kind))})
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _run_equal(ctx, stage, kind, *, door="instance", mb=4, gas=2, clip=0.05, bf16=False, steps=STEPS, zero=None,
               extra=None, cfg=None, zero_init=False, hp=None, keep_traj=False):
    """Train through DeepSpeed, compare with the single-process trajectory (fp32) and the feed check."""
    cfg = cfg or _cfg(stage, mb=mb, gas=gas, clip=clip, bf16=bf16, zero=zero or {}, **(extra or {}))
    mb, gas = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    clip = cfg.get("gradient_clipping", 0.0)
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    model = _model(0, zero_init_cfg=cfg if zero_init else None)
    if door == "json_cfg":
        deepspeed, _ = _ds(ctx)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        engine = _engine(ctx, cfg, door, kind, model=model)
    base = engine.basic_optimizer
    init = _full_weights(engine, stage)
    feed = Feed(engine)
    ref_kind = kind
    res = _train(engine, ctx, stage, steps, mb, gas, bf16=bf16, feed=feed, feed_ref=FeedReference(ref_kind, hp)
                 if ctx.rank == 0 else None, init=init)
    out = {
        "wrapper": type(engine.optimizer).__name__, "base": type(base).__name__,
        "rule_counts": base.rule_counts(), "state_tensors": _state_tensors(engine),
        "bytes": res["bytes"], "feed_err": res["feed_err"], "feed_cover": res["feed_cover"], "map_err": res["map_err"],
        "calls_per_step": feed.calls / steps, "global_steps": engine.global_steps,
        "skipped": engine.skipped_steps, "our_skipped": base.skipped_steps,
        "n_units": len(_layout(base).units()),
        "finite": all(bool(v.isfinite().all()) for v in (res["traj"] or [{}])[-1].values()) if ctx.rank == 0 else True,
    }
    import torch.distributed as dist

    pads = [None] * ctx.world  # padding pieces poisoned / left clean, over all ranks (ZeRO-3 pads the last ones)
    dist.all_gather_object(pads, (feed.poisoned, feed.pad_clean))
    out["poisoned"], out["pad_clean"] = sum(p for p, _ in pads), all(c for _, c in pads)
    if ctx.rank == 0:
        ref = _reference(kind, init, steps, ctx.world, clip, hp=hp)
        out["traj_err"] = _traj_err(res["traj"], ref)
        out["scale"] = max(float(v.abs().max()) for v in ref[-1].values())
        out["moved"] = max(float((ref[-1][n] - init[n]).abs().max()) for n in init)
        if keep_traj:
            out["traj"] = res["traj"]
    _finish(engine)
    return out


# ----------------------------------------------------------------------------------------- the cases
def case_fp32(ctx, stage, kind):
    return _run_equal(ctx, stage, kind)


def case_bf16(ctx, stage, kind, zero=None, extra=None):
    return _run_equal(ctx, stage, kind, bf16=True, zero=zero, extra=extra)


def case_config_file(ctx, stage, path):
    """A concrete shipped config, used as it is (JSON door)."""
    _, sds = _ds(ctx)
    cfg = json.loads((CONFIGS / path).read_text())
    opt = cfg["optimizer"]
    return _run_equal(ctx, stage, opt["type"], door="json_cfg", cfg=cfg, hp=dict(opt["params"]))


def case_shipped_auto(ctx, stage, name):
    """An HF-ready shipped config: fill its "auto" values, build through the JSON door, compare."""
    _, sds = _ds(ctx)
    raw = json.loads((CONFIGS / f"ds_zero{stage}_{name}.json").read_text())
    fill = {
        "train_batch_size": PER_RANK * ctx.world, "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2, "gradient_clipping": 0.05, "bf16.enabled": False,
        "optimizer.params.lr": 0.01 if name != "sgdsai" else 0.05, "optimizer.params.weight_decay": 0.01,
        "optimizer.params.betas": [0.9, 0.999],
    }
    cfg = sds.fill_auto(raw, fill)
    opt = cfg["optimizer"]
    hp = dict(opt["params"])
    if "betas" in hp:
        hp["betas"] = tuple(hp["betas"])
    out = _run_equal(ctx, stage, opt["type"], door="json_cfg", cfg=cfg, hp=hp, steps=2)
    out["autos"] = sorted(k for k, v in _walk(raw) if v == "auto")
    return out


def _walk(d, prefix=""):
    for k, v in d.items():
        p = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _walk(v, p)
        else:
            yield p, v


def case_doors(ctx, stage):
    """The same SWAN through JSON type (odd cases), instance, callable (and zero.Init for stage 3)."""
    out = {}
    doors = ["json:swan", "json:Swan", "instance", "callable"]
    for door in doors:
        out[door] = _run_equal(ctx, stage, "swan_eigh", door=door, steps=3)
    if stage == 3:
        out["zero.Init+json:SWAN"] = _run_equal(ctx, stage, "swan_eigh", door="json:SWAN", steps=3, zero_init=True)
    return out


def case_gas(ctx, stage, kind):
    """micro-batch 8 x GAS 1 vs micro-batch 2 x GAS 4: same global batch, one step per boundary."""
    a = _run_equal(ctx, stage, kind, mb=8, gas=1, steps=3, keep_traj=True)
    b = _run_equal(ctx, stage, kind, mb=2, gas=4, steps=3, keep_traj=True)
    ta, tb = a.pop("traj", None), b.pop("traj", None)
    return {"gas1": a, "gas4": b, "between": _traj_err(ta, tb) if ctx.rank == 0 else None}


def case_offload(ctx, stage, kind):
    return _run_equal(ctx, stage, kind, extra={"zero_force_ds_cpu_optimizer": False},
                      zero={"offload_optimizer": {"device": "cpu"}})


def case_variant(ctx, stage, kind, zero):
    return _run_equal(ctx, stage, kind, zero=zero)


def _expect_error(fn):
    try:
        fn()
    except Exception as err:  # noqa: BLE001
        return f"{type(err).__name__}: {err}"
    return None


def case_refusals(ctx, stage):
    """Bad JSON params name the field; offload with a client optimizer needs the flag; hpZ refused."""
    deepspeed, sds = _ds(ctx)
    out = {}

    def json_init(typ, params, **extra):
        m = _model(0)
        cfg = dict(_cfg(stage, **extra), optimizer={"type": typ, "params": params})
        deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)

    out["unknown_key"] = _expect_error(lambda: json_init("SWAN", {"lr": 1e-3, "ns_step": 5}))
    out["bad_type"] = _expect_error(lambda: json_init("SinkGD", {"iterations": "five"}))
    out["auto_left"] = _expect_error(lambda: json_init("SGDSaI", {"lr": "auto"}))
    out["bad_literal"] = _expect_error(lambda: json_init("sWaN", {"whitening": "svd"}))
    out["good_upper"] = _expect_error(lambda: json_init("SINKGD", {"lr": 1e-3}))
    off = {"zero": {"offload_optimizer": {"device": "cpu"}}}
    out["offload_instance"] = _expect_error(
        lambda: deepspeed.initialize(model=(m := _model(0)), optimizer=_make_opt("sinkgd_stateless", m.parameters()),
                                     config=_cfg(stage, **off)))
    out["offload_callable"] = _expect_error(
        lambda: deepspeed.initialize(model=(m := _model(0)), model_parameters=m.parameters(),
                                     optimizer=lambda ps: _make_opt("sgdsai", ps), config=_cfg(stage, **off)))
    if stage == 3:
        out["hpz"] = _expect_error(lambda: deepspeed.initialize(
            model=(m := _model(0)), optimizer=_make_opt("sinkgd_stateless", m.parameters()),
            config=_cfg(3, zero={"zero_hpz_partition_size": ctx.world})))
    return out


def case_no_layout(ctx, stage, kind):
    """Without the layout, stepping on a flat partition raises the error that names the import."""
    engine = _engine(ctx, _cfg(stage), "instance", kind)
    opt = engine.basic_optimizer
    opt.layouts = [lay for lay in opt.layouts if lay is not _layout(opt)]  # detach it
    msg = _expect_error(lambda: _train(engine, ctx, stage, 1, 4, 2))
    return msg


def case_checkpoint(ctx, stage, kind):
    """Save after 2 steps, continue 2 steps; a fresh engine (other init) loads and runs the same 2
    steps: identical weights, and SGD-SaI's scales stay the saved ones (the first gradient after the
    resume differs from the one they were taken from)."""
    import tempfile

    import torch
    import torch.distributed as dist

    path = [tempfile.mkdtemp(prefix="ds_ckpt_") if ctx.rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    path = path[0]
    cfg = _cfg(stage)
    a = _engine(ctx, cfg, "instance", kind, seed=0)
    _train(a, ctx, stage, 2, 4, 2)
    a.save_checkpoint(path, tag="t")

    def scales(engine):
        base = engine.basic_optimizer
        return [base.state[u.tensor]["gsnr"].clone() if "gsnr" in base.state.get(u.tensor, {}) else None
                for u in _layout(base).units()]

    def moments(engine):
        base = engine.basic_optimizer
        return [{k: v.clone() for k, v in base.state.get(u.tensor, {}).items() if torch.is_tensor(v)}
                for u in _layout(base).units()]

    saved_scales, saved_state = scales(a), moments(a)
    ra = _train(a, ctx, stage, 2, 4, 2, start=2)
    b = _engine(ctx, cfg, "instance", kind, seed=1)
    fresh = _full_weights(b, stage)  # collective under ZeRO-3: every rank
    differs_before = _traj_err([fresh], ra["traj"][:1]) if ctx.rank == 0 else None
    b.load_checkpoint(path, tag="t")
    loaded_state = moments(b)
    state_err = max([float((x[k] - y[k]).abs().max()) for x, y in zip(saved_state, loaded_state) for k in x] + [0.0])
    same_keys = [sorted(x) for x in saved_state] == [sorted(y) for y in loaded_state]
    rb = _train(b, ctx, stage, 2, 4, 2, start=2)
    after = scales(b)
    scale_err = max([float((x - y).abs().max()) for x, y in zip(saved_scales, after) if x is not None] + [0.0])
    has_scales = any(x is not None for x in saved_scales)
    # what a recomputation from the first post-resume gradient would have given (must differ)
    out = {
        "resume_err": _traj_err(ra["traj"], rb["traj"]) if ctx.rank == 0 else None,
        "differs_before_load": differs_before, "scale_err": scale_err, "has_scales": has_scales,
        "state_err": state_err, "same_state_keys": same_keys,
        "global_steps": (a.global_steps, b.global_steps),
    }
    _finish(a)
    _finish(b)
    dist.barrier()
    if ctx.rank == 0:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    return out


def case_nan(ctx, stage, bf16, own_norm=True):
    """A NaN gradient. DeepSpeed's own check (invalid global norm; bf16 overflow) skips the step:
    engine.skipped_steps counts it and our optimizer is not even called. With
    ``compute_grad_norm: false`` DeepSpeed lets it through: our screen skips it on every rank,
    counted once per step (not once per group)."""
    import torch
    import torch.nn.functional as F

    cfg = _cfg(stage, bf16=bf16) if own_norm else _cfg(stage, clip=0.0, zero={"compute_grad_norm": False})
    engine = _engine(ctx, cfg, "instance", "sinkgd")
    dev = next(engine.module.parameters()).device
    before = _train(engine, ctx, stage, 1, 4, 2)["traj"]
    ids, y = _batch(7, ctx.world)
    for m in range(2):
        out = engine(ids[:4].to(dev))
        target = y[:4].clone()
        if ctx.rank == 0 and m == 1:
            target[0, 0] = float("nan")
        engine.backward(F.mse_loss(out.float(), target.to(dev)))
        engine.step()
    mid = _full_weights(engine, stage)
    after = _train(engine, ctx, stage, 1, 4, 2, start=2)["traj"]
    out = {"engine_skipped": engine.skipped_steps, "our_skipped": engine.basic_optimizer.skipped_steps}
    if ctx.rank == 0:
        out["unchanged"] = _traj_err(before, [mid])
        out["finite_after"] = all(bool(v.isfinite().all()) for v in after[0].values())
        out["moved_after"] = _traj_err([mid], after)
    _finish(engine)
    return out


def case_stage0(ctx, kind):
    """No ZeRO: whole weights (fp32, or bf16 through FP16_UnfusedOptimizer's fp32 copies) on
    all-reduced gradients: the replicated layout (whitening split over ranks)."""
    out = {}
    for bf16 in (False, True):
        engine = _engine(ctx, _cfg(0, bf16=bf16), "instance", kind)
        init = _full_weights(engine, 0)
        res = _train(engine, ctx, 0, 3, 4, 2)
        r = {"wrapper": type(engine.optimizer).__name__, "replicated": engine.basic_optimizer.replicate_group is not None,
             "rule_counts": engine.basic_optimizer.rule_counts(), "bytes": res["bytes"]}
        if ctx.rank == 0:
            ref = _reference(kind, init, 3, ctx.world, 0.05)
            r["traj_err"] = _traj_err(res["traj"], ref)
            r["scale"] = max(float(v.abs().max()) for v in ref[-1].values())
        _finish(engine)
        out["bf16" if bf16 else "fp32"] = r
    return out


# ----------------------------------------------------------------------------------------- registration
for _stage in STAGES:
    _reg = REG[_stage]
    for _kind in ZERO_KINDS:
        _reg.add(f"fp32_{_kind}", case_fp32, WORLDS, stage=_stage, kind=_kind)
    for _kind in ("swan_eigh", "sinkgd", "sgdsai"):
        _reg.add(f"bf16_{_kind}", case_bf16, WORLDS, stage=_stage, kind=_kind)
    for _name in ("swan", "sinkgd", "sgdsai"):
        _reg.add(f"shipped_{_name}", case_shipped_auto, WORLDS, stage=_stage, name=_name)
    _reg.add("doors", case_doors, WORLDS, stage=_stage)
    _reg.add("gas", case_gas, WORLDS, stage=_stage, kind="sgdsai")
    _reg.add("refusals", case_refusals, WORLDS, stage=_stage)
    _reg.add("ckpt_sgdsai", case_checkpoint, WORLDS, stage=_stage, kind="sgdsai")
    _reg.add("ckpt_swan", case_checkpoint, WORLDS, stage=_stage, kind="swan_eigh")
    _reg.add("no_layout_swan", case_no_layout, WORLDS, stage=_stage, kind="swan_eigh")
    _reg.add("no_layout_sgdsai", case_no_layout, WORLDS, stage=_stage, kind="sgdsai")
REG[1].add("stage0_swan_eigh", case_stage0, WORLDS, kind="swan_eigh")
REG[1].add("bf16opt_swan_eigh", case_bf16, WORLDS, stage=1, kind="swan_eigh", extra={"data_types": {"grad_accum_dtype": "fp32"}})
REG[1].add("bf16opt_sgdsai", case_bf16, WORLDS, stage=1, kind="sgdsai", extra={"data_types": {"grad_accum_dtype": "fp32"}})
REG[1].add("config_zero1_swan_bf16", case_config_file, WORLDS, stage=1, path="ds_zero1_swan_bf16.json")
REG[2].add("config_zero2_sinkgd_offload", case_config_file, WORLDS, stage=2, path="ds_zero2_sinkgd_offload.json")
REG[3].add("config_zero3_sgdsai_bf16", case_config_file, WORLDS, stage=3, path="ds_zero3_sgdsai_bf16.json")
for _stage in (1, 2):
    REG[_stage].add("round_robin", case_variant, WORLDS, stage=_stage, kind="sinkgd_stateless",
                    zero={"round_robin_gradients": True})
    REG[_stage].add("aligned", case_variant, WORLDS, stage=_stage, kind="swan_eigh",
                    zero={"parameter_alignment": True, "round_robin_gradients": True})
REG[3].add("sub_groups", case_variant, WORLDS, stage=3, kind="swan_eigh", zero={"sub_group_size": 10})
REG[3].add("sub_groups_sgdsai", case_variant, WORLDS, stage=3, kind="sgdsai", zero={"sub_group_size": 10})
for _stage in (2, 3):
    REG[_stage].add("offload_sinkgd", case_offload, WORLDS, stage=_stage, kind="sinkgd")
    REG[_stage].add("offload_sgdsai", case_offload, WORLDS, stage=_stage, kind="sgdsai")
REG[2].add("nan_fp32", case_nan, WORLDS, stage=2, bf16=False)
REG[2].add("nan_no_ds_norm", case_nan, WORLDS, stage=2, bf16=False, own_norm=False)
REG[2].add("nan_bf16", case_nan, WORLDS, stage=2, bf16=True)


# =========================================================================================== parent side
def _res(stage, world, name):
    return REG[stage].result(name, world, timeout=TIMEOUT)


def _r0(stage, world, name):
    return _res(stage, world, name)[0]


EXPECTED_RULES = {
    "matrix": {"tensors": 3, "params": sum(m * n for m, n in MATRICES)},
    "fallback": {"tensors": 5, "params": 13 * 6 + 7 + 9 + 9 + 9},
}
EXPECTED_ELEMENTWISE = {"elementwise": {"tensors": 8, "params": sum(m * n for m, n in MATRICES) + 13 * 6 + 34}}
WRAPPER = {1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer", 3: "DeepSpeedZeroOptimizer_Stage3"}


def _expected_rules(kind_or_type):
    from stateless_opt import registry

    spec = optim_db.info(kind_or_type).spec if kind_or_type in optim_db.BY_ID else registry.lookup(kind_or_type)
    return EXPECTED_RULES if spec.splits_rules else EXPECTED_ELEMENTWISE


def _check_equal(r, kind, stage, *, traj=True, tol_=None):
    assert r["feed_cover"], "the layout's ranges must tile every weight exactly once across ranks"
    assert r["feed_err"] <= feed_tol(kind), r["feed_err"]
    assert r["map_err"] == 0.0, "the layout must locate each weight's master where DeepSpeed keeps it"
    assert r["finite"]
    assert r["moved"] > 1e-3, "the weights must move for the comparison to mean anything"
    if traj:
        assert r["traj_err"] <= (tol_ or tol(kind)), (kind, r["traj_err"])
    assert r["rule_counts"] == _expected_rules(kind)
    assert r["global_steps"] > 0 and r["skipped"] == 0 and r["our_skipped"] == 0
    if stage == 3:  # padding garbage never reaches the math (a NaN there would skip the step) and is zeroed
        assert r["poisoned"] > 0 and r["pad_clean"]


def _bytes_bound(kind, world, calls):
    """Upper bound on one rank's (SinkGD, SGD-SaI) or all ranks' (SWAN) payload per optimizer step."""
    row = optim_db.info(kind)
    hp = row.kwargs(**hyper(kind))
    screening = 4 * (N_WEIGHTS + calls)
    if row.name == "sinkgd":
        L = hp.get("iterations", 5)
        fb = 2 * 4 * sum(FALLBACK_ROWS) if hp.get("fallback") == "stateless" else 0
        return sum(2 * L * (m + n) * 4 for m, n in MATRICES) + fb + screening
    if row.name == "swan":
        return 2 * 4 * sum(m * n for m, n in MATRICES) + world * screening
    return 16 * N_WEIGHTS + screening


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ZERO_KINDS)
def test_fp32_equals_single_process(stage, world, kind):
    per_rank = _res(stage, world, f"fp32_{kind}")
    r = per_rank[0]
    _check_equal(r, kind, stage)
    assert r["wrapper"] == WRAPPER[stage] and r["base"] == optim_db.info(kind).cls.__name__
    # one base-optimizer call per param group (ZeRO-1/2) or per sub-group (ZeRO-3), once per boundary
    assert r["calls_per_step"] == r["n_units"] and r["global_steps"] == STEPS
    # stateless: SWAN/SinkGD matrix weights have no state tensors; SinkGD's stateless fallback none at all
    if optim_db.info(kind).splits_rules:
        for rr in per_rank:
            assert rr["state_tensors"].get("matrix", 0) == 0
            if optim_db.info(kind).kwargs(**hyper(kind)).get("fallback") == "stateless":
                assert sum(rr["state_tensors"].values()) == 0
    else:  # SGD-SaI: exactly one momentum buffer per flat partition (+ a small host scale vector)
        for rr in per_rank:
            assert rr["state_tensors"]["elementwise"] <= 2 * rr["n_units"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ZERO_KINDS)
def test_bytes_are_vectors_and_owner_fragments(stage, world, kind):
    """No full-size all-reduce: SinkGD sends <= 2 L (m+n) floats per matrix (+ screening), SWAN's ranks
    together <= 2 x the fp32 fragments of the matrices (+ screening), SGD-SaI scalars only."""
    per_rank = _res(stage, world, f"fp32_{kind}")
    calls = per_rank[0]["n_units"]
    bound = _bytes_bound(kind, world, calls)
    steps = len(per_rank[0]["bytes"])
    for t in range(steps):
        if optim_db.info(kind).name == "swan":
            total = sum(r["bytes"][t] for r in per_rank)
            assert 0 < total <= bound, (t, total, bound)
        else:
            for r in per_rank:
                assert r["bytes"][t] <= bound, (t, r["bytes"][t], bound)
    if optim_db.info(kind).name == "sgdsai":  # scales are taken once: later steps only screen
        for r in per_rank:
            assert all(b <= 4 * (N_WEIGHTS + calls) for b in r["bytes"][1:])
    if optim_db.info(kind).name == "sinkgd":
        assert max(r["bytes"][0] for r in per_rank) > 4 * (N_WEIGHTS + calls), "row/col stats must travel"


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ["swan_eigh", "sinkgd", "sgdsai"])
def test_bf16(stage, world, kind):
    r = _r0(stage, world, f"bf16_{kind}")
    _check_equal(r, kind, stage, traj=False)
    assert r["wrapper"] == WRAPPER[stage]
    # bf16 model vs the fp32 reference: same training, within bf16 noise
    assert r["traj_err"] <= BF16_TOL * max(r["scale"], 1.0), r["traj_err"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("kind", ["swan_eigh", "sgdsai"])
def test_bf16_optimizer_path(world, kind):
    """bf16 + fp32 grad accumulation + stage 1 -> BF16_Optimizer (every rank holds full gradients;
    the partitioned layout over its fp32 master partitions)."""
    r = _r0(1, world, f"bf16opt_{kind}")
    assert r["wrapper"] == "BF16_Optimizer"
    _check_equal(r, kind, 1, traj=False)
    assert r["calls_per_step"] == 1  # one call covering all groups
    assert r["traj_err"] <= BF16_TOL * max(r["scale"], 1.0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage,path,wrapper", [
    (1, "ds_zero1_swan_bf16.json", "BF16_Optimizer"),
    (2, "ds_zero2_sinkgd_offload.json", "DeepSpeedZeroOptimizer"),
    (3, "ds_zero3_sgdsai_bf16.json", "DeepSpeedZeroOptimizer_Stage3"),
])
def test_concrete_configs(stage, world, path, wrapper):
    r = _r0(stage, world, f"config_{path[:-5][3:]}")
    assert r["wrapper"] == wrapper
    typ = json.loads((CONFIGS / path).read_text())["optimizer"]["type"]
    assert r["base"] == typ
    assert r["feed_cover"] and r["feed_err"] <= 1e-5 and r["finite"] and r["map_err"] == 0.0
    assert r["rule_counts"] == _expected_rules(typ)
    if "offload" in path:  # fp32
        assert r["traj_err"] <= tol("sinkgd")
    else:
        assert r["traj_err"] <= BF16_TOL * max(r["scale"], 1.0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("name", ["swan", "sinkgd", "sgdsai"])
def test_shipped_hf_configs(stage, world, name):
    """configs/ds_zero{1,2,3}_{swan,sinkgd,sgdsai}.json: "auto" where the HF Trainer fills, and once
    filled they build our optimizer through the JSON door and match the single-process run."""
    r = _r0(stage, world, f"shipped_{name}")
    assert "optimizer.params.lr" in r["autos"] and "train_micro_batch_size_per_gpu" in r["autos"]
    typ = {"swan": "SWAN", "sinkgd": "SinkGD", "sgdsai": "SGDSaI"}[name]
    assert r["base"] == typ and r["wrapper"] == WRAPPER[stage]
    assert r["rule_counts"] == _expected_rules(typ)
    assert r["feed_cover"] and r["feed_err"] <= 1e-5 and r["map_err"] == 0.0 and r["moved"] > 1e-3
    assert r["traj_err"] <= tol(name)  # shipped SWAN: the default (iterative) whitening


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
def test_doors_agree(stage, world):
    """JSON type (any case), instance, callable (and zero.Init at stage 3) give the same optimizer,
    the same rule split and the same weights."""
    out = _r0(stage, world, "doors")
    for door, r in out.items():
        assert r["base"] == "SWAN", door
        assert r["rule_counts"] == EXPECTED_RULES, (door, r["rule_counts"])
        _check_equal(r, "swan_eigh", stage)
    if stage == 3:
        assert "zero.Init+json:SWAN" in out


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
def test_gradient_accumulation(stage, world):
    out = _r0(stage, world, "gas")
    assert out["between"] <= tol("sgdsai"), out["between"]  # 8 x 1 == 2 x 4 directly, not only via the reference
    for key in ("gas1", "gas4"):
        _check_equal(out[key], "sgdsai", stage)
        assert out[key]["global_steps"] == 3
        assert out[key]["calls_per_step"] == out[key]["n_units"]  # stepped once per boundary


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
def test_refusals_name_the_problem(stage, world):
    out = _r0(stage, world, "refusals")
    assert out["unknown_key"] and "ValueError" in out["unknown_key"] and "ns_step" in out["unknown_key"]
    assert out["bad_type"] and "iterations" in out["bad_type"]
    assert out["auto_left"] and "lr" in out["auto_left"] and '"auto"' in out["auto_left"]
    assert out["bad_literal"] and "whitening" in out["bad_literal"]
    assert out["good_upper"] is None  # "SINKGD" is accepted: case-insensitive
    for key in ("offload_instance", "offload_callable"):
        assert out[key] and "zero_force_ds_cpu_optimizer" in out[key] and "stateless_opt" in out[key], out[key]
    if stage == 3:
        assert out["hpz"] and "zero_hpz_partition_size" in out["hpz"] and "stateless_opt" in out["hpz"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ["swan", "sgdsai"])
def test_flat_partition_without_layout_raises(stage, world, kind):
    msg = _r0(stage, world, f"no_layout_{kind}")
    assert msg and "import stateless_opt.integrations.deepspeed" in msg, msg


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("kind", ["sgdsai", "swan"])
def test_checkpoint_resume(stage, world, kind):
    per_rank = _res(stage, world, f"ckpt_{kind}")
    r = per_rank[0]
    assert r["differs_before_load"] > 1e-3  # the fresh engine really starts elsewhere
    assert r["resume_err"] <= 1e-7, r["resume_err"]
    for rr in per_rank:
        assert rr["same_state_keys"] and rr["state_err"] == 0.0
        if kind == "sgdsai":
            assert rr["has_scales"] and rr["scale_err"] == 0.0
    assert r["global_steps"] == (4, 4)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("stage,name,kind", [
    (1, "round_robin", "sinkgd_stateless"), (2, "round_robin", "sinkgd_stateless"), (1, "aligned", "swan_eigh"),
    (2, "aligned", "swan_eigh"), (3, "sub_groups", "swan_eigh"), (3, "sub_groups_sgdsai", "sgdsai"),
    (2, "offload_sinkgd", "sinkgd"), (3, "offload_sinkgd", "sinkgd"),
    (2, "offload_sgdsai", "sgdsai"), (3, "offload_sgdsai", "sgdsai"),
])
def test_zero_variants(stage, world, name, kind):
    """round_robin_gradients (where DeepSpeed's own _hp_mapping is wrong), parameter alignment, ZeRO-3
    sub-groups (several base-optimizer calls per group and step), CPU optimizer offload."""
    r = _r0(stage, world, name)
    _check_equal(r, kind, stage)
    if name.startswith("sub_groups"):
        assert r["n_units"] > 2 and r["calls_per_step"] == r["n_units"]


@pytest.mark.parametrize("world", WORLDS)
def test_nan_gradient_skips(world):
    for name in ("nan_fp32", "nan_bf16", "nan_no_ds_norm"):
        per_rank = _res(2, world, name)
        r = per_rank[0]
        assert r["unchanged"] == 0.0 and r["finite_after"] and r["moved_after"] > 0, (name, r)
        if name == "nan_no_ds_norm":  # DeepSpeed let it through: we skip, once per step, not per group
            assert all(x["engine_skipped"] == 0 and x["our_skipped"] == 1 for x in per_rank), per_rank
        else:  # DeepSpeed skipped it; we must not count it again
            assert all(x["engine_skipped"] == 1 and x["our_skipped"] == 0 for x in per_rank), per_rank


@pytest.mark.parametrize("world", WORLDS)
def test_no_zero(world):
    per_rank = _res(1, world, "stage0_swan_eigh")
    for prec, wrapper in (("fp32", "SWAN"), ("bf16", "FP16_UnfusedOptimizer")):
        r = per_rank[0][prec]
        assert r["wrapper"] == wrapper and r["replicated"] and r["rule_counts"] == EXPECTED_RULES
        bound = tol("swan_eigh") if prec == "fp32" else BF16_TOL * max(r["scale"], 1.0)
        assert r["traj_err"] <= bound, (prec, r["traj_err"])
        # replicated: only whitening results travel, each rank whitens its share of the matrices
        total = sum(x[prec]["bytes"][0] for x in per_rank)
        assert 0 < total <= world * 4 * sum(m * n for m, n in MATRICES) + world * 4 * (N_WEIGHTS + 2)


# ------------------------------------------------------------------------------------ in-process tests
def _sds():
    pytest.importorskip("deepspeed")
    import stateless_opt.integrations.deepspeed as sds

    return sds


def test_register_is_idempotent_and_version_checked(monkeypatch):
    sds = _sds()
    from deepspeed.runtime.engine import DeepSpeedEngine as E

    sds.register()
    fn = E._configure_optimizer
    sds.register()
    assert E._configure_optimizer is fn and sds.is_registered()
    import importlib

    importlib.reload(sds)  # re-import: still one patch layer
    assert E._configure_optimizer is fn
    assert getattr(E._configure_optimizer, "__wrapped__", None) is not None
    assert getattr(E._configure_optimizer.__wrapped__, "__wrapped__", None) is None
    import deepspeed

    assert sds.check_version() == deepspeed.__version__
    for bad in ("0.16.9", "0.18.9", "0.20.0", "1.0.0", "not-a-version"):
        with pytest.raises(RuntimeError, match="supported range"):
            sds.check_version(bad)
    monkeypatch.setenv(sds.UNVERIFIED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="supported range"):
        sds.check_version("0.20.0")
    assert sds.lookup("sWaN").__name__ == "SWAN" and sds.lookup("SGDSAI").__name__ == "SGDSaI"
    assert sds.lookup("AdamW") is None
    # the engine's check accepts ours in any case and still accepts DeepSpeed's and torch's own
    assert E._is_supported_optimizer(None, "sinkGD") and E._is_supported_optimizer(None, "adamw")
    assert E._is_supported_optimizer(None, "SGD") and not E._is_supported_optimizer(None, "NoSuchOpt")


def test_fill_auto():
    sds = _sds()
    raw = json.loads((CONFIGS / "ds_zero2_swan.json").read_text())
    with pytest.raises(ValueError, match="optimizer.params.lr"):
        sds.fill_auto(raw, {})
    for path in sorted(CONFIGS.glob("ds_zero?_*.json")):
        cfg = json.loads(path.read_text())
        assert cfg["zero_allow_untested_optimizer"] is True
        assert cfg["zero_force_ds_cpu_optimizer"] is False
        typ = cfg["optimizer"]["type"]
        params = {k: v for k, v in cfg["optimizer"]["params"].items() if v != "auto"}
        sds.json_params(sds.lookup(typ), params, typ)  # the concrete part validates


def test_json_groups_classify_by_module():
    sds = _sds()
    import torch
    from torch import nn

    m = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    groups = sds.json_groups(m, None)
    assert [g["rule"] for g in groups] == ["matrix", "fallback"]
    assert groups[0]["param_names"] == ["1.weight"]
    assert groups[1]["param_names"] == ["0.weight", "1.bias", "2.weight", "2.bias"]
    hf_style = [{"params": [m[1].weight, m[0].weight], "weight_decay": 0.1}, {"params": [m[1].bias], "weight_decay": 0.0}]
    groups = sds.json_groups(m, hf_style)
    assert [(g["rule"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("matrix", 0.1, 1), ("fallback", 0.1, 1), ("fallback", 0.0, 1)]
    assert all(g["rule"] for g in groups) and not any(isinstance(g["params"], torch.Tensor) for g in groups)
    assert sds.json_groups(m, None, uses_rules=False)[0].get("rule") is None
