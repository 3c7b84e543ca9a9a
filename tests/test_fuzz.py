"""Property-based fuzz suite (issue 16): optimizer x shape x dtype x gradient scale x backend.

Drawn by hypothesis (``example``): a catalogue row (``tests/optim_db.py``); one or two param groups of
one to three weights of awkward shapes (1x1, 1xN, Nx1, tall, wide, square, empty, 3-D stacks taken as
expert stacks with ``batch_dims=1`` or viewed whole with 0, 1-D, 0-D), each group with its own weight
decay; a weight dtype (fp32, bf16, fp16; fp64 where the row steps it); the step decided on the host or
on the device (``capturable=True``: every weight computed, each write masked); and for each of one to three
steps, every weight's gradient: a pattern (Gaussian with an offset, constant rows, constant columns,
constant, rank one, one-hot, one spike 1e6 above the rest, zero, no gradient) scaled to a peak of 10^k,
k in [-30, 30] (fp16 holds [-7, 4]), and maybe one NaN / +Inf / -Inf in one weight (on one rank).

Properties, after every step (and on every rank):

* P1 finite: the weights are finite whenever the float64 result is (the normalised rules always are;
  SGD-SaI's update grows with the gradient, and a result beyond the dtype's range is not a bug).
* P2 skip: a step with a non-finite gradient anywhere (any weight, any group, any rank) changes no
  weight and no optimizer state, bitwise, on any rank; ``skipped_steps`` grows by exactly 1, so does
  every group's counter (with a gradient this step or not), and no group's ``step`` moves (no partial
  step).
* P3 no false skip: a finite step is never skipped; a weight whose gradient is zero or None is left
  bitwise unchanged (no decay either).
* P4 reference (one process): where the float64 reference is defined (``reference_defined``), every
  weight equals (1 - lr wd) W_t - lr U_ref(G_t) computed from the library's own W_t (step by step),
  to the tolerance ``bound`` states.
* P5 backends (2 ranks: DDP, FSDP2, ZeRO-2): P1-P3 on every rank with the same skip decision, and the
  weights equal the single-process optimizer stepped on the same gradients (``backend_bound``); DDP
  replicas stay bitwise identical.

Multi-rank examples are drawn once, in the pytest process, from fixed seeds (``draw_examples``) and
shipped to the ranks as data, so every rank checks the same examples; each backend's examples ride the
2-rank spawn its own test module already makes (``tests/dist_harness.py``).
Profiles (``conftest.py``): ``ci`` (default, derandomized: CI runs the same examples every time) and
``HYPOTHESIS_PROFILE=thorough`` (random, ~10x the examples).
"""

from __future__ import annotations

import math
import multiprocessing
import zlib

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

import optim_db
import reference as R
from dist_harness import run_cases

F64 = torch.float64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PATTERNS = ("gauss", "const_rows", "const_cols", "const", "rank1", "onehot", "spike", "zero", "none")
SHAPE_KINDS = ("1x1", "1xN", "Nx1", "tall", "wide", "square", "empty", "stack", "vector", "scalar")
# Shapes a backend cannot hold: ZeRO flattens parameters (an empty or 0-D one has no place in a flat
# partition), FSDP2 shards dim 0 (a 0-D or empty weight has nothing to shard).
BACKEND_SHAPES = {
    "single": SHAPE_KINDS,
    "ddp": SHAPE_KINDS,
    "fsdp2": tuple(k for k in SHAPE_KINDS if k not in ("scalar", "empty")),
    "zero2": tuple(k for k in SHAPE_KINDS if k not in ("scalar", "empty")),
}
# ZeRO keeps fp32 masters whatever the model's dtype: its examples are fp32.
BACKEND_DTYPES = {"zero2": ("float32",)}
WORLD = 2

# Hyper-parameters: lr 0.02 for the matrix rules with the fallback at 2x (AdamW or the stateless rule);
# SGD-SaI at lr 1e-2 (1e-1 for the max-normalised variant, whose scales are <= 1, as test_reference).
MATRIX_LR, FALLBACK_RATIO = 0.02, 2.0


def hyper(info) -> dict:
    if info.splits_rules:
        return {"lr": MATRIX_LR, "fallback_lr_ratio": FALLBACK_RATIO}
    return {"lr": 1e-1 if info.variant.get("max_normalized_gsnr") else 1e-2}


def scale_range(dtype: str) -> tuple[int, int]:
    """Exponents k of the gradient peak 10^k the dtype holds (fp16: 6e-8 .. 65504)."""
    return (-7, 4) if dtype == "float16" else (-30, 30)


# ===================================================================================== the examples
def shape_of(kind: str, a: int, b: int, c: int) -> tuple[int, ...]:
    """A shape of ``kind`` from three small draws (2 <= a, b <= 7, 2 <= c <= 3)."""
    hi, lo = max(a, b) + 1, min(a, b)
    return {
        "1x1": (1, 1), "1xN": (1, a), "Nx1": (a, 1), "tall": (hi, lo), "wide": (lo, hi), "square": (a, a),
        "empty": (0, a), "stack": (c, a, b), "vector": (a,), "scalar": (),
    }[kind]


@st.composite
def example(draw, backend: str = "single", row: str | None = None) -> dict:
    """One fuzz example as plain data (picklable, shipped to ranks); ``row``: of that catalogue row."""
    row = row or draw(st.sampled_from([r.id for r in optim_db.OPTIM_DB]))
    info = optim_db.info(row)
    dtypes = BACKEND_DTYPES.get(backend) or tuple(
        d for d in DTYPES if DTYPES[d] in info.cls.param_dtypes)
    dtype = draw(st.sampled_from(dtypes))
    lo, hi = scale_range(dtype)
    kinds = BACKEND_SHAPES[backend]
    shape = st.builds(shape_of, st.sampled_from(kinds), st.integers(2, 7), st.integers(2, 7), st.integers(2, 3))
    groups = []
    for i in range(draw(st.integers(1, 2))):
        # rule="fallback" marks a group as param_groups(model) marks embeddings / head / norms (a variant
        # with ``marked_groups`` refuses to be built without one: its first group is marked)
        marked = info.marked_groups and i == 0 or (info.splits_rules or info.marked_groups) and draw(st.booleans())
        groups.append({
            "shapes": draw(st.lists(shape, min_size=1, max_size=3)),
            "batch_dims": draw(st.sampled_from((0, 1))) if info.splits_rules else 0,
            "weight_decay": draw(st.sampled_from((0.0, 0.1))),
            "rule": "fallback" if marked else "auto",
        })
    # extremes and zero first, then anything in the range
    k = st.one_of(st.sampled_from((lo, hi, 0)), st.integers(lo, hi))
    grad = st.tuples(st.sampled_from(PATTERNS), k)
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        bad = draw(st.one_of(st.none(), st.tuples(
            st.integers(0, 8), st.floats(0.0, 1.0, exclude_max=True), st.sampled_from(("nan", "inf", "-inf")),
            st.integers(0, WORLD - 1))))
        steps.append({"grads": [[draw(grad) for _ in g["shapes"]] for g in groups], "bad": bad})
    # DDP: told the replicas' group (``replicate_group=``, as ``param_groups(ddp)`` does), or built on the
    # plain parameters (``SGDSaI(ddp.parameters())``: every rank steps everything, votes on skipping)
    how = draw(st.sampled_from(("replicate_group", "plain"))) if backend == "ddp" else None
    # who decides the step: the host (the CPU default) or the device (capturable=True, the default on
    # accelerators: every weight computed, each write masked), on the CPU too
    capturable = draw(st.sampled_from((None, True))) if backend != "zero2" else None
    return {"row": row, "dtype": dtype, "groups": groups, "steps": steps, "seed": draw(st.integers(0, 2**20)),
            "how": how, "capturable": capturable}


def pattern(shape: tuple, name: str, gen: torch.Generator) -> torch.Tensor:
    """A float64 gradient of ``shape`` with peak magnitude 1 (or zero). Rows and columns are those of the
    (-1, last dim) view (a 1-D or 0-D tensor is one row)."""
    numel = math.prod(shape)
    if numel == 0 or name == "zero":
        return torch.zeros(shape, dtype=F64)
    rows, cols = (numel // shape[-1], shape[-1]) if len(shape) >= 2 else (1, numel)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    if name == "gauss":
        x = randn(rows, cols) + 0.3
    elif name == "const_rows":
        x = randn(rows, 1).expand(rows, cols)
    elif name == "const_cols":
        x = randn(1, cols).expand(rows, cols)
    elif name == "const":
        x = torch.full((rows, cols), -0.7, dtype=F64)
    elif name == "rank1":
        x = randn(rows, 1) @ randn(1, cols)
    elif name == "onehot":
        x = torch.zeros(rows * cols, dtype=F64)
        x[int(torch.randint(rows * cols, (1,), generator=gen))] = 1.0
    elif name == "spike":
        x = randn(rows * cols)
        x[int(torch.randint(rows * cols, (1,), generator=gen))] = 1e6
    else:
        raise ValueError(name)
    x = x.reshape(shape).clone()
    peak = x.abs().max()
    return x / peak if peak > 0 else x


def all_shapes(ex) -> list[tuple[int, tuple]]:
    """(group index, shape) of every weight, in order."""
    return [(gi, tuple(s)) for gi, g in enumerate(ex["groups"]) for s in g["shapes"]]


def initial_weights(ex) -> list[list[torch.Tensor]]:
    """The float64 starting weights (O(1)), per group."""
    gen = torch.Generator().manual_seed(ex["seed"])
    return [[torch.randn(s, generator=gen, dtype=F64) for s in g["shapes"]] for g in ex["groups"]]


def full_grads(ex, t: int, rank: int | None = None) -> list[list[torch.Tensor | None]]:
    """Step ``t``'s gradients in the weight dtype, per group (None: no gradient). The injected NaN/Inf
    goes into the first weight with elements at or after the drawn one; ``rank``: only if it is the
    drawn rank (None: every rank, i.e. the gradient as the single-process reference sees it)."""
    dtype = DTYPES[ex["dtype"]]
    out = []
    for gi, g in enumerate(ex["groups"]):
        row = []
        for ti, s in enumerate(g["shapes"]):
            name, k = ex["steps"][t]["grads"][gi][ti]
            if name == "none":
                row.append(None)
                continue
            gen = torch.Generator().manual_seed(ex["seed"] * 1_000_003 + t * 1009 + gi * 101 + ti)
            row.append((pattern(tuple(s), name, gen) * 10.0**k).to(dtype))
        out.append(row)
    bad = ex["steps"][t]["bad"]
    target = bad_target(ex, t)
    if target is not None and (rank is None or rank == bad[3]):
        gi, ti = target
        flat = out[gi][ti].reshape(-1)
        flat[int(bad[1] * flat.numel())] = float(bad[2])
    return out


def bad_target(ex, t: int) -> tuple[int, int] | None:
    """(group, tensor) that step ``t``'s NaN/Inf goes into, or None (no injection or nowhere to put it)."""
    bad = ex["steps"][t]["bad"]
    if bad is None:
        return None
    slots = [(gi, ti) for gi, g in enumerate(ex["groups"]) for ti, s in enumerate(g["shapes"])
             if math.prod(s) > 0 and ex["steps"][t]["grads"][gi][ti][0] != "none"]
    return slots[bad[0] % len(slots)] if slots else None


# ===================================================================================== float64 model
def expected_rule(info, shape: tuple, batch_dims: int, rule: str = "auto") -> str:
    """Which rule the documentation gives a weight: SGD-SaI is elementwise on everything but a group
    marked ``rule="fallback"`` under ``fallback="adamw"``; SWAN / SinkGD / ColRMS send a marked group's
    weights and 0-/1-D weights to the fallback, and SWAN also a matrix whose GradNorm axis (the longer
    side) has one element (a 1 x 1, which GradNorm would zero)."""
    if not info.splits_rules:
        return "fallback" if rule == "fallback" and info.variant.get("fallback") == "adamw" else "elementwise"
    if len(shape) < 2 or rule == "fallback":
        return "fallback"
    bd = max(min(batch_dims, len(shape) - 2), 0)
    m, n = shape[bd], math.prod(shape[bd + 1:])
    if info.name == "swan" and max(m, n) == 1:
        return "fallback"
    return "matrix"


def matrices(shape: tuple, batch_dims: int) -> tuple[int, int, int]:
    bd = max(min(batch_dims, len(shape) - 2), 0)
    return math.prod(shape[:bd]), shape[bd], math.prod(shape[bd + 1:])


def reference_defined(info, rule: str, shape: tuple, batch_dims: int, grad: tuple, history: list,
                      g: torch.Tensor, own_scale_constant: bool = False, any_scale_constant: bool = False) -> bool:
    """Where the float64 reference is a fair target for fp32 arithmetic (P4):

    * SWAN's polar factor is discontinuous where the normalised gradient loses rank (constant rows or
      columns, rank one, one-hot, square matrices after centring): there the fp32 rank decision, not
      rounding, sets the result. Defined for Gaussian gradients; for the iterative whitenings
      (``amplifies_rounding``) only on non-square matrices, as in ``test_reference``, and for
      Newton-Schulz's 12 steps only where the GradNorm'd matrix has sigma_min / sigma_max >= 0.2: that is
      where they converge to fp32 accuracy (measured on 300 random small Gaussians, 1e-30 to 1e30: worst
      5e-6 relative above 0.2, 1e-4 above 0.05, 0.3 below 0.01; Polar Express 2.4e-6 on all of them).
    * SGD-SaI's g-SNR of a constant gradient (of more than one element) is ||g|| / (0 + eps) in exact
      arithmetic but ||g|| / (rounding noise + eps) in any floating-point sum: ill-conditioned. A
      weight whose (frozen) scale was taken from one is not compared, at that step or later; nor, in
      the max-normalised variant, any weight once such a scale entered the max.
    * The AdamW fallback squares the gradient in the weight's precision, as torch.optim.AdamW does: a
      peak above 1e18 overflows fp32's exp_avg_sq (the update becomes 0, then and at every later step);
      compared only while every gradient so far stayed below that.
    SinkGD, ColRMS and the stateless fallback are compared everywhere, 1e-30 to 1e30."""
    name, _k = grad
    if rule == "matrix" and info.name == "swan":
        if name != "gauss":
            return False
        count, m, n = matrices(shape, batch_dims)
        if info.amplifies_rounding and m == n:
            return False
        if info.variant.get("whitening") == "newton_schulz":
            for x in g.to(F64).reshape(count, m, n):
                x = x.T if m > n else x
                sv = torch.linalg.svdvals(R.gradnorm(x, 1e-8))
                if sv.min() < 0.2 * sv.max():
                    return False
    if rule == "elementwise" and (own_scale_constant
                                  or info.variant.get("max_normalized_gsnr") and any_scale_constant):
        return False
    if rule == "fallback" and info.variant.get("fallback", "adamw") == "adamw":
        return all(k <= 18 for k in history)
    return True


class Float64Model:
    """The float64 references of ``tests/reference.py`` on one example's weights, step by step: the
    next weights from the library's current ones and the same gradients, with each rule's state (AdamW
    moments, SGD-SaI scales and momentum) advanced only where the library's is."""

    def __init__(self, ex):
        self.ex = ex
        self.info = optim_db.info(ex["row"])
        self.hp = hyper(self.info)
        self.adamw: dict = {}
        self.scale: dict = {}  # SGD-SaI: g-SNR taken at the first non-zero gradient
        self.buf: dict = {}  # SGD-SaI: the float64 EMA momentum
        self.factor: dict = {}  # SGD-SaI: scale / max scale of the last step
        self.constant_scale: set = set()  # SGD-SaI: weights whose scale came from a constant gradient

    def step(self, weights: list[list[torch.Tensor]], grads: list[list[torch.Tensor | None]]) -> list[list]:
        """Expected float64 weights after a finite step (a weight with no or a zero gradient: None)."""
        info, hp = self.info, self.hp
        out = [[None] * len(ws) for ws in weights]
        live = {(gi, ti) for gi, gs in enumerate(grads) for ti, g in enumerate(gs)
                if g is not None and bool(g.ne(0).any())}
        if not info.splits_rules:
            for key in sorted(live):  # scales of every weight first (max-normalised: the max over all)
                g = self.ex["groups"][key[0]]
                if expected_rule(info, tuple(g["shapes"][key[1]]), 0, g["rule"]) != "elementwise":
                    continue
                if key not in self.scale:
                    g = grads[key[0]][key[1]]
                    self.scale[key] = R.gsnr(g, 1e-8)
                    if g.numel() > 1 and bool((g == g.reshape(-1)[0]).all()):
                        self.constant_scale.add(key)
            top = max(self.scale.values()) if info.variant.get("max_normalized_gsnr") and self.scale else 1.0
        for gi, g in enumerate(self.ex["groups"]):
            wd = g["weight_decay"]
            for ti, shape in enumerate(g["shapes"]):
                if (gi, ti) not in live:
                    continue
                w, grad = weights[gi][ti].to(F64), grads[gi][ti].to(F64)
                rule = expected_rule(info, tuple(shape), g["batch_dims"], g["rule"])
                if rule == "elementwise":
                    buf = self.buf.get((gi, ti))
                    buf = grad.clone() if buf is None else 0.9 * buf + 0.1 * grad
                    self.buf[(gi, ti)] = buf
                    self.factor[(gi, ti)] = self.scale[(gi, ti)] / top
                    out[gi][ti] = (1 - hp["lr"] * wd) * w - hp["lr"] * self.factor[(gi, ti)] * buf
                elif rule == "fallback":
                    lr = hp["lr"] * hp.get("fallback_lr_ratio", info.variant.get("fallback_lr_ratio", 1.0))
                    kind = info.variant.get("fallback", "adamw")
                    if kind == "adamw":
                        ref = self.adamw.setdefault((gi, ti), R.AdamWRef(lr, weight_decay=wd))
                        out[gi][ti] = ref.step(w, grad)
                    else:
                        fn = R.stateless_fallback_update if kind == "stateless" else R.rowclip_fallback_update
                        out[gi][ti] = (1 - lr * wd) * w - lr * at_unit_scale(fn)(grad)
                else:
                    count, m, n = matrices(tuple(shape), g["batch_dims"])
                    stack = grad.reshape(count, m, n) if count > 1 else grad.reshape(1, *grad.shape)
                    fn = info.reference if info.name == "swan" else at_unit_scale(info.reference)
                    d = torch.stack([fn(x) for x in stack]).reshape(grad.shape)
                    out[gi][ti] = (1 - hp["lr"] * wd) * w - hp["lr"] * d
        return out


def at_unit_scale(fn):
    """``fn`` evaluated on G * 2^-e, with 2^e the power of two that brings G's peak into [0.5, 1).

    For the rules that are scale-free in exact arithmetic (SinkGD, ColRMS and the stateless fallback
    floor each norm relative to the matrix's own scale), this is exact in float64 and changes nothing
    but the absolute 1e-30 guard of the references (``TINY``, there so a zero matrix stays zero), which
    otherwise exceeds every norm of a gradient of peak 1e-30 and bends the reference itself. The library
    is scale-free down there (it folds 2^k back into its scales). SWAN and AdamW add an absolute eps
    and are evaluated as they are."""
    def scaled(g: torch.Tensor) -> torch.Tensor:
        peak = g.abs().max() if g.numel() else torch.zeros((), dtype=g.dtype)
        if peak == 0:
            return fn(g)
        _, e = torch.frexp(peak)
        return fn(torch.ldexp(g, -e))
    return scaled


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype``'s grid at |x| (float64), subnormals included."""
    fi = torch.finfo(dtype)
    mag = x.to(F64).abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def bound(dtype: torch.dtype, before: torch.Tensor, ref: torch.Tensor, rel: float) -> torch.Tensor:
    """Per-entry tolerance of a weight against its float64 next value ``ref``:

    * ``rel`` of the step's largest movement (fp32 arithmetic against float64: 1e-5, ``FP32_TOL`` of
      ``test_reference``, tens of roundings through the normalisations; fp64 weights (SGD-SaI) 1e-6:
      the arithmetic is fp64 but the g-SNR is kept as fp32 state, 6e-8 relative);
    * one ulp (of the weight dtype, at the larger of |W_t| and |W_t+1|): the decay and the update are two
      roundings of the weight (an update below half an ulp vanishes, which no relative bound covers),
      and a bf16/fp16 weight is stochastically rounded to one of the two neighbours of its fp32 value
      (``test_reference``'s bf16 bound), after the same fp32 arithmetic (one fp32 ulp more)."""
    moved = (ref - before).abs().max()
    top = torch.maximum(before.abs(), ref.abs())
    out = rel * moved + ulp(top, dtype)
    if dtype in (torch.bfloat16, torch.float16):
        out = out + ulp(top, torch.float32)
    return out


def representable(ref: torch.Tensor, dtype: torch.dtype) -> bool:
    """The float64 result fits the weight dtype with room for rounding (half its largest value)."""
    return bool(ref.abs().max() <= torch.finfo(dtype).max / 2) if ref.numel() else True


# ===================================================================================== one process
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.contiguous().reshape(-1).view(torch.uint8).clone()


def state_bits(opt) -> dict:
    """Every tensor of the optimizer state, bitwise (NaN-safe), by (group, position, key)."""
    return {(gi, j, k): _bits(v) for gi, group in enumerate(opt.param_groups) for j, p in enumerate(group["params"])
            for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}


def state_kept(before: dict, opt) -> bool:
    """The state is as it was: every tensor that existed bitwise unchanged; one allocated since holds
    only zeros, or NaN (SGD-SaI's scale not taken yet): the template a zero-gradient step allocates
    too, which a device-decided step allocates even when it skips (it computes every weight, masked)."""
    after = {(gi, j, k): v for gi, group in enumerate(opt.param_groups) for j, p in enumerate(group["params"])
             for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}
    if not set(before) <= set(after):
        return False
    for key, v in after.items():
        if key in before:
            if not torch.equal(before[key], _bits(v)):
                return False
        else:
            v = _local(v).double()
            if not bool(((v == 0) | torch.isnan(v)).all()):
                return False
    return True


def same_bits(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


def counters(opt) -> dict:
    return {"skipped": opt.skipped_steps, "group_skipped": [g["skipped_steps"] for g in opt.param_groups],
            "group_step": [g["step"] for g in opt.param_groups]}


def make_optimizer(ex, params: list[list[torch.Tensor]], **extra):
    info = optim_db.info(ex["row"])
    groups = []
    for g, ps in zip(ex["groups"], params):
        group = {"params": ps, "weight_decay": g["weight_decay"]}
        if info.splits_rules:
            group["batch_dims"] = g["batch_dims"]
        if g["rule"] != "auto":
            group["rule"] = g["rule"]
        groups.append(group)
    if ex.get("capturable") is not None:
        extra = {"capturable": ex["capturable"], **extra}
    return info.make(groups, **hyper(info), **extra)


def _local(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t


def non_finite(tensors) -> bool:
    return any(t is not None and not bool(torch.isfinite(_local(t)).all()) for t in tensors)


class StepProbe:
    """What P1-P3 look at around one ``step()`` of ``opt`` (``weights``: the model's weights as lists per
    example group; local pieces, bitwise): ``before()`` right before the optimizer runs, ``after()``."""

    def __init__(self, opt, weights):
        self.opt, self.weights = opt, weights

    def before(self) -> None:
        opt = self.opt
        self.bits = [[_bits(p) for p in ps] for ps in self.weights]
        self.state, self.counts = state_bits(opt), counters(opt)
        self.bad = False

    def seen(self, groups) -> None:
        """The gradients the optimizer is about to step on: all its groups, or under DeepSpeed ZeRO-1/2,
        which calls ``step()`` once per group with ``param_groups`` swapped to that group, one of them."""
        self.bad = self.bad or non_finite(p.grad for g in groups for p in g["params"])

    def after(self) -> dict:
        after = [[_bits(p) for p in ps] for ps in self.weights]
        return {
            "changed": [[not torch.equal(a, b) for a, b in zip(xs, ys)] for xs, ys in zip(after, self.bits)],
            "state_unchanged": state_kept(self.state, self.opt),
            "finite": not non_finite(p for ps in self.weights for p in ps),
            "bad": self.bad,  # a non-finite gradient in what this rank's optimizer sees
            "before": self.counts,
            "after": counters(self.opt),
        }


def check_skip_properties(rec: dict, ex, t: int, bad: bool, where: str = "") -> None:
    """P2 / P3 on one step's record (``bad``: a non-finite gradient somewhere, on any rank)."""
    b, a = rec["before"], rec["after"]
    if bad:  # P2
        assert not any(any(c) for c in rec["changed"]), f"{where}step {t}: a weight changed in a skipped step"
        assert rec["state_unchanged"], f"{where}step {t}: optimizer state changed in a skipped step"
        assert a["skipped"] == b["skipped"] + 1, f"{where}step {t}: skipped_steps {b['skipped']} -> {a['skipped']}"
        assert a["group_skipped"] == [s + 1 for s in b["group_skipped"]], (f"{where}step {t}: group counters", b, a)
        assert a["group_step"] == b["group_step"], f"{where}step {t}: a group stepped in a skipped step"
    else:  # P3
        assert a["skipped"] == b["skipped"] and a["group_skipped"] == b["group_skipped"], (
            f"{where}step {t}: a finite step was skipped", b, a)
        for gi, gs in enumerate(ex["steps"][t]["grads"]):
            for ti, (name, _) in enumerate(gs):
                if name in ("zero", "none") or math.prod(ex["groups"][gi]["shapes"][ti]) == 0:
                    assert not rec["changed"][gi][ti], f"{where}step {t}: weight {gi}.{ti} moved with a {name} gradient"


def momentum_in_weight_dtype(opt, p, model: Float64Model, key, before: torch.Tensor, ex) -> torch.Tensor:
    """SGD-SaI on bf16/fp16 weights keeps its momentum in the weight's dtype (as the official code): the
    buffer is held to the float64 EMA within that storage precision (2^-6 of its peak: two roundings a
    step in bf16, and torch's ``add_(g, alpha=0.1)`` rounds alpha to the dtype, as ``test_reference``'s
    bf16 test states; plus two ulps, for subnormal fp16 gradients), and the weight's expected next value
    is taken from the library's buffer."""
    buf = opt.state[p]["momentum_buffer"].to(F64)
    ref_buf = model.buf[key]
    err = (buf - ref_buf).abs()
    tol = 2.0**-6 * ref_buf.abs().max() + 2 * ulp(ref_buf, p.dtype)
    assert bool((err <= tol).all()), f"momentum buffer of {key} off the float64 EMA by {(err / tol).max():.3g}x"
    lr, wd = model.hp["lr"], ex["groups"][key[0]]["weight_decay"]
    return (1 - lr * wd) * before - lr * model.factor[key] * buf


def run_single(ex) -> None:
    """P1-P4 on one example in this process."""
    info = optim_db.info(ex["row"])
    dtype = DTYPES[ex["dtype"]]
    params = [[torch.nn.Parameter(w.to(dtype)) for w in ws] for ws in initial_weights(ex)]
    opt = make_optimizer(ex, params)
    for gi, g in enumerate(ex["groups"]):  # the documented routing of each weight (SWAN / SinkGD / ColRMS)
        for ti, p in enumerate(params[gi]):
            want = expected_rule(info, tuple(p.shape), g["batch_dims"], g["rule"])
            if info.splits_rules:
                assert opt.weight_rule(opt.param_groups[gi], tuple(p.shape)) == want, (gi, ti, tuple(p.shape))
    model = Float64Model(ex)
    history: dict = {}
    rel = 1e-6 if dtype == F64 else 1e-5  # fp64 (SGD-SaI): its g-SNR is fp32 state (6e-8 relative)
    for t in range(len(ex["steps"])):
        grads = full_grads(ex, t)
        for ps, gs in zip(params, grads):
            for p, g in zip(ps, gs):
                p.grad = g
        before = [[p.detach().to(F64).clone() for p in ps] for ps in params]
        probe = StepProbe(opt, params)
        probe.before()
        probe.seen(opt.param_groups)
        opt.step()
        rec = probe.after()
        check_skip_properties(rec, ex, t, rec["bad"])
        if rec["bad"]:
            continue
        expected = model.step(before, grads)
        for gi, g in enumerate(ex["groups"]):
            for ti, shape in enumerate(g["shapes"]):
                ref = expected[gi][ti]
                if ref is None:
                    continue
                spec = ex["steps"][t]["grads"][gi][ti]
                rule = expected_rule(info, tuple(shape), g["batch_dims"], g["rule"])
                hist = history.setdefault((gi, ti), [])
                hist.append(spec[1])
                got = params[gi][ti].detach().to(F64)
                if not representable(ref, dtype):  # P1 does not apply; later steps neither
                    return
                if rule == "elementwise" and dtype in (torch.bfloat16, torch.float16):
                    ref = momentum_in_weight_dtype(opt, params[gi][ti], model, (gi, ti), before[gi][ti], ex)
                assert bool(torch.isfinite(got).all()), f"step {t}: weight {gi}.{ti} {tuple(shape)} not finite"
                if reference_defined(info, rule, tuple(shape), g["batch_dims"], spec, hist, grads[gi][ti],
                                     (gi, ti) in model.constant_scale, bool(model.constant_scale)):  # P4
                    err = (got - ref).abs()
                    tol = bound(dtype, before[gi][ti], ref, rel)
                    worst = (err / tol).max().item()
                    assert worst <= 1.0, (
                        f"step {t}: weight {gi}.{ti} {tuple(shape)} ({rule}, grad {spec}) off the float64 "
                        f"reference by {worst:.3g}x the bound (max err {err.max().item():.3g}, movement "
                        f"{(ref - before[gi][ti]).abs().max().item():.3g})")


# ===================================================================================== tests
@given(ex=example("single"))  # examples, deadline, derandomization: the active profile (conftest.py)
def test_single_process_properties(ex):
    run_single(ex)


# ===================================================================================== two ranks
class Holder(torch.nn.Module):
    """The example's weights as a module (``w{group}_{index}``) for DDP, FSDP2 and DeepSpeed to wrap."""

    def __init__(self, ex, device):
        super().__init__()
        dtype = DTYPES[ex["dtype"]]
        self.names = []
        for gi, ws in enumerate(initial_weights(ex)):
            self.names.append([])
            for ti, w in enumerate(ws):
                self.register_parameter(f"w{gi}_{ti}", torch.nn.Parameter(w.to(device=device, dtype=dtype)))
                self.names[-1].append(f"w{gi}_{ti}")

    def grouped(self) -> list[list[torch.nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self.names]


def flat(nested: list[list]) -> list:
    return [x for xs in nested for x in xs]


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole weight (FSDP2: gathered, a collective every rank joins), float64 on the host."""
    p = p.detach()
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).to("cpu", F64)


def backend_bound(row: str, dtype: torch.dtype, before, ref, got, path: float, steps: int) -> float:
    """Worst |distributed - single process| over the per-entry tolerance, after ``steps`` steps of both
    from the same start: ``test_fsdp2.REL_TOL`` of the path the single-process weight travelled (the sum
    of its steps' largest movements, as ``test_reference.traj_error``: 1e-4; 1e-3 for the iterative
    whitenings; the runs differ only in the order of fp32 sums over ranks, which an unconverged
    whitening amplifies, see test_fsdp2), plus one ulp of the weight dtype a step (a rounding that
    went the other way), two for bf16/fp16 (each side rounds stochastically, with its own draws)."""
    from test_fsdp2 import REL_TOL

    if not ref.numel():
        return 0.0
    ulps = steps * (2 if dtype in (torch.bfloat16, torch.float16) else 1)
    tol = REL_TOL[row] * path + ulps * ulp(torch.maximum(before.abs(), ref.abs()), dtype)
    return ((got - ref).abs() / tol).max().item()


def constant_scales(ex, grads, seen: set) -> set:
    """Flat indices of the elementwise (SGD-SaI) weights whose g-SNR is taken from a constant gradient at
    this step (``seen``: those whose scale was taken already, updated): ill-conditioned (see
    ``reference_defined``), so two runs that sum in another order (ranks) disagree by O(1) there."""
    info, out, k = optim_db.info(ex["row"]), set(), -1
    for gi, g in enumerate(ex["groups"]):
        for ti, shape in enumerate(g["shapes"]):
            k += 1
            x = grads[gi][ti]
            if (k in seen or x is None or not bool(x.ne(0).any()) or not bool(torch.isfinite(x).all())
                    or expected_rule(info, tuple(shape), 0, g["rule"]) != "elementwise"):
                continue
            seen.add(k)
            if x.numel() > 1 and bool((x == x.reshape(-1)[0]).all()):
                out.add(k)
    return out


def compared_out(ex, k: int, ill: set) -> bool:
    """P5 does not compare weight ``k`` (flat index): its SGD-SaI scale came from a constant gradient, or,
    in the max-normalised variant, some weight's did."""
    return k in ill or bool(ill) and optim_db.info(ex["row"]).variant.get("max_normalized_gsnr", False)


def run_backend(ctx, backend: str, ex) -> dict:
    """One example on this rank under ``backend``, with the single-process twin (the same optimizer on
    plain tensors, rank-local, stepped on the same full gradients) for P5."""
    dtype = DTYPES[ex["dtype"]]
    twin_params = [[torch.nn.Parameter(w.to(dtype)) for w in ws] for ws in initial_weights(ex)]
    twin = make_optimizer(ex, twin_params, replicate_group=False)
    model, engine = Holder(ex, ctx.device), None
    if backend == "ddp":  # the step's gradients are set after DDP's all-reduce would have run
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model) if ctx.device_type == "cpu" else DDP(model, device_ids=[ctx.device.index])
        extra = {"replicate_group": ddp.process_group} if ex["how"] == "replicate_group" else {}
        opt = make_optimizer(ex, model.grouped(), **extra)
    elif backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        from test_fsdp2 import get_mesh

        fully_shard(model, mesh=get_mesh(ctx, "1d"))
        opt = make_optimizer(ex, model.grouped())
    else:  # ZeRO-2; DeepSpeed's own norm and clipping off, so every gradient reaches our screen
        from test_deepspeed import _cfg, _ds

        deepspeed, _ = _ds(ctx)
        cfg = _cfg(2, mb=1, gas=1, clip=0.0, zero={"compute_grad_norm": False})
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(ex, model.grouped()), config=cfg)
        opt = engine.basic_optimizer
    weights = model.grouped()
    probe = StepProbe(opt, weights)
    if engine is not None:  # DeepSpeed's gradients exist (flat partitions) only when it calls our step
        inner = opt.step

        def step(closure=None):
            probe.seen(opt.param_groups)
            return inner(closure)

        opt.step = step
    steps = []
    twin_prev = [p.detach().to(F64) for p in flat(twin_params)]
    paths = [0.0] * len(twin_prev)
    ill, ill_seen = set(), set()  # SGD-SaI weights whose scale came from a constant gradient; scales taken
    try:
        for t in range(len(ex["steps"])):
            full = full_grads(ex, t)  # the single-process twin's (the injection on no particular rank)
            # DDP: after the all-reduce, on one rank; ZeRO: in one rank's micro-batch gradient, then averaged
            mine = full_grads(ex, t, rank=ctx.rank) if backend in ("ddp", "zero2") else full
            before = [[_full(p) for p in ps] for ps in weights]
            if backend == "zero2":  # d/dW sum(W * C) = C exactly; (C + C) / 2 = C; no gradient: C = 0
                loss = sum((p * (torch.zeros_like(p) if g is None else g.to(ctx.device))).sum()
                           for ps, gs in zip(weights, mine) for p, g in zip(ps, gs))
                engine.backward(loss)
                probe.before()
                engine.step()
            else:
                for ps, gs in zip(weights, mine):
                    for p, g in zip(ps, gs):
                        if g is None:
                            p.grad = None
                        elif backend == "fsdp2":
                            from torch.distributed.tensor import distribute_tensor

                            p.grad = distribute_tensor(g.to(ctx.device), p.device_mesh, p.placements)
                        else:
                            p.grad = g.to(ctx.device)
                probe.before()
                probe.seen(opt.param_groups)
                opt.step()
            rec = probe.after()
            for ps, gs in zip(twin_params, full):
                for p, g in zip(ps, gs):
                    p.grad = None if g is None else g.clone()
            twin.step()
            got = [[_full(p) for p in ps] for ps in weights]
            refs = [[p.detach().to(F64) for p in ps] for ps in twin_params]
            rec["representable"] = all(representable(r, dtype) for rs in refs for r in rs)
            for k, r in enumerate(flat(refs)):  # the path each single-process weight travelled
                paths[k] += (r - twin_prev[k]).abs().max().item() if r.numel() else 0.0
                twin_prev[k] = r
            ill.update(constant_scales(ex, full, ill_seen))
            rec["worst"] = max((backend_bound(ex["row"], dtype, b, r, g, paths[k], t + 1) for k, (b, r, g)
                                in enumerate(zip(flat(before), flat(refs), flat(got))) if not compared_out(ex, k, ill)),
                               default=0.0)
            steps.append(rec)
            if not rec["representable"]:  # the result overflows the dtype: nothing more to compare
                break
        final = [[_bits(p.full_tensor() if hasattr(p, "full_tensor") else p) for p in ps] for ps in weights]
    finally:
        if engine is not None:
            from test_deepspeed import _finish

            _finish(engine)
    return {"steps": steps, "final": final if backend == "ddp" else None}


def backend_case(ctx, backend: str, examples: list[dict]) -> list[dict]:
    """Every example of ``backend`` on this rank. An example that raises ends the case (its peers may be
    waiting in a collective it will never join): the harness reports every rank's traceback, named by
    the example here."""
    out = []
    for i, ex in enumerate(examples):
        try:
            out.append(run_backend(ctx, backend, ex))
        except Exception as err:
            raise RuntimeError(f"{backend} example {i} raised on rank {ctx.rank}: {ex}") from err
    return out


def richness(ex) -> tuple:
    """How much an example exercises: finite steps with live multi-element gradients, distinct patterns
    and shapes, an injected NaN/Inf (the first draws of a derandomized run are the minimal ones)."""
    live = [(x[0], tuple(s)) for st in ex["steps"] if st["bad"] is None for g, gs in zip(ex["groups"], st["grads"])
            for s, x in zip(g["shapes"], gs) if math.prod(s) > 1 and x[0] not in ("zero", "none")]
    return (len({p for p, _ in live}) + len({s for _, s in live}) + any(st["bad"] for st in ex["steps"]), repr(ex))


def draw_examples(backend: str, n: int) -> list[dict]:
    """``n`` examples of ``example(backend)``, the same on every run, drawn here in the pytest process and
    shipped to the ranks as data: for each catalogue row a pool of 5 draws per example it may get, from a
    fixed seed (the backend's and row's name), duplicates dropped, then taken round-robin over the rows,
    richest first (``richness``: a run's first draws are the minimal ones); every row appears once
    ``n`` reaches the catalogue's size."""
    rows = [r.id for r in optim_db.OPTIM_DB]
    per_row = 5 * -(-n // len(rows))
    by_row = {}
    for row in rows:
        pool: dict[str, dict] = {}

        @seed(zlib.crc32(f"{backend}/{row}".encode()))
        @settings(database=None, max_examples=per_row, phases=[Phase.generate], deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(example(backend, row))
        def collect(ex):
            pool.setdefault(repr(ex), ex)

        collect()
        by_row[row] = sorted(pool.values(), key=richness, reverse=True)
    out: list[dict] = []
    while len(out) < n and any(by_row.values()):
        for queue in by_row.values():
            if queue and len(out) < n:
                out.append(queue.pop(0))
    return out


def check_backend(backend: str, examples: list[dict], per_rank: list[list[dict]]) -> None:
    for i, ex in enumerate(examples):
        recs = [ranks[i] for ranks in per_rank]
        where = f"{backend} example {i} {ex}: "
        for t in range(len(recs[0]["steps"])):
            steps = [rec["steps"][t] for rec in recs]
            bad = any(s["bad"] for s in steps)
            assert bad == (bad_target(ex, t) is not None), f"{where}step {t}: the injected NaN/Inf went astray"
            for r, s in enumerate(steps):
                check_skip_properties(s, ex, t, bad, where=f"{where}rank {r} ")  # P2, P3
                if s["representable"]:
                    assert s["finite"], f"{where}rank {r} step {t}: non-finite weights"  # P1
                    assert s["worst"] <= 1.0, f"{where}rank {r} step {t}: {s['worst']:.3g}x the bound off " \
                                              "the single-process optimizer"  # P5
            assert all(s["after"] == steps[0]["after"] for s in steps), f"{where}step {t}: ranks disagree"
        if backend == "ddp":
            assert all(same_bits(flat(recs[0]["final"]), flat(rec["final"])) for rec in recs), (
                f"{where}DDP replicas differ")


BACKENDS = ("ddp", "fsdp2", "zero2")


def _hosts() -> dict:
    """The registry whose 2-rank spawn each backend's examples ride (registered at import, so they run
    in the spawn that module's own tests start anyway)."""
    import test_ddp
    import test_deepspeed
    import test_fsdp2

    return {"ddp": test_ddp.CASES, "fsdp2": test_fsdp2.CASES, "zero2": test_deepspeed.REG[2]}


# Examples per backend: a twentieth of the profile's (ci: 20, every catalogue row twice; thorough: 200).
# Drawn and registered by the pytest process only: a spawned rank imports this module for
# ``backend_case`` and gets its examples as arguments.
BACKEND_EXAMPLES = max(settings.default.max_examples // 20, 3)
if multiprocessing.parent_process() is None:
    HOSTS = _hosts()
    EXAMPLES = {b: draw_examples(b, BACKEND_EXAMPLES) for b in BACKENDS}
    for _b in BACKENDS:
        HOSTS[_b].add(f"fuzz_{_b}", backend_case, (WORLD,), backend=_b, examples=EXAMPLES[_b])


def backend_results(backend: str) -> list:
    """The ranks' results: from the host module's spawn when it ran (the whole suite), else (this file
    alone, or the host's tests deselected) from a spawn of this case only."""
    reg = HOSTS[backend]
    name = f"fuzz_{backend}"
    kw = {"timeout": 480.0} if backend == "zero2" else {}  # test_deepspeed's spawn timeout
    if reg.ran(WORLD):
        return reg.result(name, WORLD, **kw)
    run = run_cases([reg.cases[name]], WORLD, **kw)
    if name in run.errors:
        raise AssertionError(run.errors[name])
    return run.results[name]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_rank_properties(backend):
    check_backend(backend, EXAMPLES[backend], backend_results(backend))
