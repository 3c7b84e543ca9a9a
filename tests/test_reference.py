"""Our optimizers against the float64 references of ``reference.py`` (written from docs/algorithms.md).

fp32 weights: the whole trajectory of several steps (a fresh gradient each step) is compared with
the float64 trajectory from the same start. Error = max |W - W_ref| / (path length of W_ref in
max-norm), i.e. relative to how far the weights moved. Tolerance 1e-5: fp32 arithmetic (~6e-8 per rounding, tens
of roundings per entry through GradNorm / whitening / normalisation) against a float64 reference.

bf16 weights: step by step, from the library's own bf16 weights W_t, the reference next value is
(1 - lr*wd) W_t - lr * U_ref(G_t) with G_t the same bf16 gradient in float64. Stochastic rounding
returns one of the two bf16 neighbours of the fp32 result, so |W_{t+1} - ref| <= 1 bf16 ulp (0.5
ulp with round-to-nearest), plus 1e-5 of the update for the fp32 math. Weights start at ~0.02 and
updates are ~1e-2, i.e. ~100 ulps, so the 1-ulp bound catches any update error above ~1%.
"""

from __future__ import annotations

import math

import pytest
import torch

import optim_db
import reference as R
from stateless_opt.sinkgd import sinkgd_update as sinkgd_rule
from stateless_opt import SGDSaI, SinkGD, SWAN, sgd_sai

F64 = torch.float64
FP32_TOL = 1e-5  # fp32 math vs float64 reference (see module docstring)

MATRIX_SHAPES = {
    "tall": (24, 10),
    "wide": (10, 24),
    "1xn": (1, 17),
    "mx1": (17, 1),
    "conv": (6, 3, 3, 3),  # viewed (6, 27)
    "square": (12, 12),  # rank-deficient after GradNorm's centring
}
ALL_SHAPES = {**MATRIX_SHAPES, "1d": (13,), "0d": ()}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(shape, steps: int, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    """A different, non-degenerate gradient each step (mean offset so centring matters)."""
    g = _gen(seed)
    return [(torch.randn(shape, generator=g) + 0.3 * (t + 1)).to(dtype) for t in range(steps)]


def _weight(shape, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.nn.Parameter:
    return torch.nn.Parameter((scale * torch.randn(shape, generator=_gen(seed + 1000))).to(dtype))


def traj_error(ws: list[torch.Tensor], refs: list[torch.Tensor], w0: torch.Tensor) -> float:
    """max over steps t of max|W_t - W_ref_t| / (sum over s <= t of max|W_ref_s - W_ref_{s-1}|): the
    error relative to the path the reference weights travelled (robust to steps that move back)."""
    errs, path, prev = [], 0.0, w0.to(F64)
    for w, r in zip(ws, refs):
        path += (r - prev).abs().max().item()
        prev = r
        errs.append((w.to(F64) - r).abs().max().item() / path)
    return max(errs)


# ------------------------------------------------------------------------------------ matrix rules
def matrix_run_fp32(cls, shape, ref_fn, *, lr=0.05, wd=0.1, steps=3, seed=0, **kw) -> float:
    """Trajectory error of ``cls`` on one matrix-rule weight vs W <- (1 - lr*wd) W - lr * ref_fn(G)."""
    w = _weight(shape, seed)
    w0 = w.detach().clone()
    opt = cls([{"params": [w], "rule": "matrix"}], lr=lr, weight_decay=wd, **kw)
    ref = w0.to(F64)
    ws, refs = [], []
    for g in _grads(shape, steps, seed):
        w.grad = g.clone()
        opt.step()
        ref = (1 - lr * wd) * ref - lr * ref_fn(g)
        ws.append(w.detach().clone())
        refs.append(ref.clone())
    return traj_error(ws, refs, w0)


def bf16_step_errors(opt, params, grads_per_step, ref_next, stochastic: bool):
    """Run ``opt`` on bf16 ``params``; after each step compare with ``ref_next(t, W_t list, G_t list)``.
    Returns (max error in bf16 ulps of the reference, max error relative to the update size).
    Asserts the per-entry bound stated in the module docstring."""
    max_ulps, max_rel = 0.0, 0.0
    half = 1.0 if stochastic else 0.5
    for t, grads in enumerate(grads_per_step):
        before = [p.detach().to(F64).clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        refs = ref_next(t, before, grads)
        for p, b, r in zip(params, before, refs):
            got = p.detach().to(F64)
            upd = (r - b).abs().max().item()
            err = (got - r).abs()
            bound = half * R.bf16_ulp(r) + 1e-5 * upd
            assert bool((err <= bound).all()), (
                f"step {t}: bf16 result off the reference by {(err / R.bf16_ulp(r)).max().item():.2f} ulp"
            )
            max_ulps = max(max_ulps, (err / R.bf16_ulp(r)).max().item())
            max_rel = max(max_rel, err.max().item() / upd)
            # the update is large against the grid, so the bound above is a real check
            assert upd > 20 * R.bf16_ulp(b).max().item()
    return max_ulps, max_rel


def matrix_run_bf16(cls, shape, ref_fn, *, lr=0.01, wd=0.1, steps=3, seed=0, stochastic=True, **kw):
    w = _weight(shape, seed, torch.bfloat16, scale=0.02)
    opt = cls([{"params": [w], "rule": "matrix"}], lr=lr, weight_decay=wd, stochastic_rounding=stochastic, **kw)
    grads = [[g] for g in _grads(shape, steps, seed, torch.bfloat16)]
    return bf16_step_errors(
        opt, [w], grads, lambda t, ws, gs: [(1 - lr * wd) * ws[0] - lr * ref_fn(gs[0])], stochastic
    )


SQUARE_FREE = [k for k in MATRIX_SHAPES if k != "square"]


@pytest.mark.parametrize("shape", list(MATRIX_SHAPES))
def test_swan_eigh_matches_exact_polar_fp32(shape):
    # eigh whitening is exact up to fp32: tolerance FP32_TOL, square (rank-deficient) shapes included.
    err = matrix_run_fp32(SWAN, MATRIX_SHAPES[shape], R.swan_update, whitening="eigh")
    assert err < FP32_TOL, err


@pytest.mark.parametrize("shape", SQUARE_FREE)
def test_swan_newton_schulz_matches_exact_polar_fp32(shape):
    # Default Newton-Schulz (12 steps) converges on these well-conditioned full-rank shapes to fp32
    # accuracy; square shapes are rank-deficient and covered by the 2% test below.
    err = matrix_run_fp32(SWAN, MATRIX_SHAPES[shape], R.swan_update)
    assert err < FP32_TOL, err


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_swan_default_newton_schulz_within_2_percent(shape):
    # The acceptance bound for the default iteration: 2% relative Frobenius error against the
    # exact polar factor on a non-square, well-conditioned (Gaussian) matrix.
    g = torch.randn(shape, generator=_gen(3))
    w = torch.nn.Parameter(torch.zeros(shape))
    w.grad = g
    SWAN([w], lr=1.0).step()
    ref = R.swan_update(g)
    rel = (torch.linalg.matrix_norm(-w.detach().to(F64) - ref) / torch.linalg.matrix_norm(ref)).item()
    assert rel < 0.02, rel


@pytest.mark.parametrize("n", [32, 64])
def test_swan_newton_schulz_square_converges_on_range(n):
    # Square Gaussian after centring: rank n-1 with small non-zero singular values (~1e-2 sigma_max),
    # which 12 steps do not fully converge; with 20 the polar factor on the range is within 1%.
    g = torch.randn(n, n, generator=_gen(n))
    w = torch.nn.Parameter(torch.zeros(n, n))
    w.grad = g
    SWAN([w], lr=1.0, ns_steps=20).step()
    ref = R.swan_update(g)
    rel = (torch.linalg.matrix_norm(-w.detach().to(F64) - ref) / torch.linalg.matrix_norm(ref)).item()
    assert rel < 0.01, rel


def test_swan_many_newton_schulz_steps_stay_finite():
    # A rank-deficient Gram (square weight after centring) has a slightly negative fp32 round-off
    # eigenvalue; without the ridge in ops.inverse_sqrt_newton_schulz it diverges to NaN by ~26 steps.
    g = torch.randn(64, 64, generator=_gen(0))
    w = torch.nn.Parameter(torch.zeros(64, 64))
    w.grad = g
    SWAN([w], lr=1.0, ns_steps=40).step()
    assert torch.isfinite(w).all()


def test_swan_orients_before_gradnorm_on_tall():
    # Default: transpose a tall gradient first, so GradNorm standardises stored columns; the
    # "stored_rows" option standardises stored rows. Both equal their reference; they differ a lot.
    shape = (24, 10)
    oriented = matrix_run_fp32(SWAN, shape, R.swan_update, whitening="eigh")
    stored = matrix_run_fp32(SWAN, shape, lambda g: R.swan_update(g, gradnorm_axis="stored_rows"),
                             whitening="eigh", gradnorm_axis="stored_rows")
    assert oriented < FP32_TOL and stored < FP32_TOL
    g = _grads(shape, 1, 0)[0]
    gap = (R.swan_update(g) - R.swan_update(g, gradnorm_axis="stored_rows")).abs().max().item()
    assert gap > 0.05, "test matrix does not tell the two axes apart"
    wrong = matrix_run_fp32(SWAN, shape, lambda g: R.swan_update(g, gradnorm_axis="stored_rows"), whitening="eigh")
    assert wrong > 100 * FP32_TOL


@pytest.mark.parametrize("shape", list(MATRIX_SHAPES))
def test_swan_update_has_rms_one(shape):
    # Step 4 of SWAN: RMS(Delta) = 1 exactly (up to fp32), whatever the gradient's scale.
    s = MATRIX_SHAPES[shape]
    w = torch.nn.Parameter(torch.zeros(s))
    w.grad = 1e3 * _grads(s, 1, 5)[0]
    SWAN([w], lr=1.0, whitening="eigh").step()
    assert abs(w.detach().to(F64).square().mean().sqrt().item() - 1.0) < 1e-5


@pytest.mark.parametrize("shape", list(MATRIX_SHAPES))
@pytest.mark.parametrize("iterations", [1, 5])
def test_sinkgd_matches_reference_fp32(shape, iterations):
    err = matrix_run_fp32(
        SinkGD, MATRIX_SHAPES[shape], lambda g: R.sinkgd_update(g, iterations=iterations), iterations=iterations
    )
    assert err < FP32_TOL, err


def test_sinkgd_rows_first_and_iteration_count_matter():
    shape = (10, 24)
    right = matrix_run_fp32(SinkGD, shape, lambda g: R.sinkgd_update(g, iterations=2), iterations=2)
    cols_first = matrix_run_fp32(SinkGD, shape, lambda g: R.sinkgd_update(g, iterations=2, rows_first=False),
                                 iterations=2)
    other_l = matrix_run_fp32(SinkGD, shape, lambda g: R.sinkgd_update(g, iterations=1), iterations=2)
    assert right < FP32_TOL
    assert cols_first > 100 * FP32_TOL and other_l > 100 * FP32_TOL


def test_sinkgd_last_normalisation_is_columns():
    g = torch.randn(10, 24, generator=_gen(1)) * torch.logspace(-2, 2, 24)
    w = torch.nn.Parameter(torch.zeros(10, 24))
    w.grad = g
    SinkGD([w], lr=1.0, iterations=3).step()
    x = -w.detach().to(F64)
    assert torch.allclose(x.norm(dim=0), torch.full((24,), math.sqrt(10), dtype=F64), rtol=1e-5)
    assert torch.allclose(x.norm(dim=1), torch.full((10,), math.sqrt(24), dtype=F64), rtol=0.05)


def _tiny_row_case():
    g = torch.randn(8, 16, generator=_gen(2))
    g[3] = 1e-30 * torch.randn(16, generator=_gen(3))
    g[:, 5] = 0.0
    return g


def test_sinkgd_norm_floor_is_relative_to_matrix_scale():
    # A 1e-30 row and a zero column in an O(1) matrix (one round): the tiny row is not blown up to
    # norm sqrt(n), the zero column stays exactly zero, nothing is NaN; equal to the reference.
    g = _tiny_row_case()
    w = torch.nn.Parameter(torch.zeros(8, 16))
    w.grad = g.clone()
    SinkGD([w], lr=1.0, iterations=1).step()
    x = -w.detach()
    assert torch.isfinite(x).all()
    assert x[3].abs().max() < 1e-10
    assert (x[:, 5] == 0).all()
    assert torch.cat([x[:3], x[4:]]).square().mean().sqrt() > 0.5
    ref = R.sinkgd_update(g.double(), iterations=1)
    assert (x.double() - ref).abs().max() < FP32_TOL * ref.abs().max()


def test_sinkgd_tiny_row_stays_tiny_with_default_iterations():
    # Re-flooring the already scaled row every round would grow it by 1/eps per round (1e-30 * 1e8^4 > 1):
    # with the default L=5 the 1e-30 row would reach norm sqrt(n). Floors apply to pre-scale norms.
    w = torch.nn.Parameter(torch.zeros(8, 16))
    w.grad = _tiny_row_case()
    SinkGD([w], lr=1.0).step()
    assert w.detach()[3].abs().max() < 1e-10


@pytest.mark.parametrize("rel", [3.36e-9, 1e-10, 1e-12])
def test_sinkgd_near_floor_rows_and_columns_follow_the_reference_every_round(rel):
    # A column and a row just under the floor (eps = 1e-8 relative), default L=5: the optimizer, the
    # readable rule and the float64 reference agree (each axis's norms under the other axis's scale
    # only, so a floored row or column stays floored; re-flooring every round gave [1, 1] where the
    # optimizer gives [1, 0.475] on [[1, 3.36e-9]]). fp32 optimizer vs float64: FP32_TOL of the update.
    g = torch.randn(8, 16, generator=_gen(11))
    g[:, 5] *= rel
    g[3] *= rel
    ref = R.sinkgd_update(g.double())
    assert (sinkgd_rule(g) - ref).abs().max() < 1e-12 * ref.abs().max()
    w = torch.nn.Parameter(torch.zeros(8, 16))
    w.grad = g.clone()
    SinkGD([w], lr=1.0).step()
    assert (-w.detach().double() - ref).abs().max() < FP32_TOL * ref.abs().max()
    one = torch.tensor([[1.0, 3.36e-9]])
    assert (sinkgd_rule(one) - R.sinkgd_update(one.double())).abs().max() < 1e-12


@pytest.mark.parametrize("scale", [1e-15, 1e15])
@pytest.mark.parametrize("kind", ["sinkgd", "stateless_fallback"])
def test_norm_floors_are_scale_invariant(kind, scale):
    # Floors relative to the matrix's scale (not an absolute eps): c * G gives the same update for
    # any c within fp32 range (an absolute eps = 1e-8 would shrink the 1e-15 case ~1e6 times).
    g = torch.randn(8, 16, generator=_gen(9))
    outs = []
    for c in (1.0, scale):
        w = torch.nn.Parameter(torch.zeros(8, 16))
        w.grad = g * c
        if kind == "sinkgd":
            SinkGD([w], lr=1.0).step()
        else:
            SinkGD([{"params": [w], "rule": "fallback"}], lr=1.0, fallback_lr_ratio=1.0, fallback="stateless").step()
        outs.append(w.detach().clone())
    assert (outs[0] - outs[1]).abs().max() < 1e-5


def test_swan_zero_row_and_constant_row_stay_finite():
    # GradNorm of a zero or constant row is 0 / (0 + eps): zero, not NaN; whitening keeps it zero.
    g = torch.randn(8, 16, generator=_gen(4))
    g[2] = 0.0
    g[5] = 3.0
    for whitening in ("newton_schulz", "eigh"):
        w = torch.nn.Parameter(torch.zeros(8, 16))
        w.grad = g.clone()
        SWAN([w], lr=1.0, whitening=whitening).step()
        x = -w.detach().double()
        assert torch.isfinite(x).all()
        ref = R.swan_update(g)
        assert (x - ref).abs().max() < 1e-4 * ref.abs().max(), whitening  # NS: rank-6 Gram, 12 steps


# ------------------------------------------------------------------------------------ fallbacks
FALLBACK_SHAPES = {"1d": (13,), "0d": (), "embedding": (11, 6)}


@pytest.mark.parametrize("shape", list(FALLBACK_SHAPES))
@pytest.mark.parametrize("cls", [SWAN, SinkGD])
def test_adamw_fallback_matches_torch_adamw(cls, shape):
    # Fallback = torch's AdamW at lr * fallback_lr_ratio with the group's wd: same torch math, so the
    # only difference is the kernel path (foreach vs ours): tolerance 1e-6 relative to the movement.
    # Also against the float64 AdamW formula at FP32_TOL.
    s = FALLBACK_SHAPES[shape]
    lr, ratio, wd, betas, eps = 1e-3, 20.0, 0.1, (0.8, 0.95), 1e-6
    ours, theirs = _weight(s, 4), _weight(s, 4)
    w0 = ours.detach().clone()
    group = {"params": [ours], "rule": "fallback"}
    opt = cls([group], lr=lr, weight_decay=wd, fallback_lr_ratio=ratio, betas=betas, adam_eps=eps)
    torch_opt = torch.optim.AdamW([theirs], lr=lr * ratio, betas=betas, eps=eps, weight_decay=wd)
    ref, ref_w = R.AdamWRef(lr * ratio, betas, eps, wd), w0.to(F64)
    ws, ts, refs = [], [], []
    for g in _grads(s, 4, 4):
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
        ref_w = ref.step(ref_w, g)
        ws.append(ours.detach().clone())
        ts.append(theirs.detach().to(F64))
        refs.append(ref_w)
    assert traj_error(ws, ts, w0) < 1e-6
    assert traj_error(ws, refs, w0) < FP32_TOL
    assert torch.equal(opt.state[ours]["step"], torch.tensor(4.0))


@pytest.mark.parametrize("shape", list(FALLBACK_SHAPES) + ["conv"])
@pytest.mark.parametrize("cls", [SWAN, SinkGD])
def test_stateless_fallback_matches_reference(cls, shape):
    # Row-wise RMS normalisation (1-D/0-D as one row) at lr * ratio; decoupled wd; no state at all.
    s = {**FALLBACK_SHAPES, "conv": (6, 3, 3, 3)}[shape]
    lr, ratio, wd = 1e-3, 20.0, 0.1
    w = _weight(s, 6)
    w0 = w.detach().clone()
    opt = cls([{"params": [w], "rule": "fallback"}], lr=lr, weight_decay=wd, fallback="stateless")
    ref_w, ws, refs = w0.to(F64), [], []
    for g in _grads(s, 3, 6):
        w.grad = g.clone()
        opt.step()
        ref_w = (1 - lr * ratio * wd) * ref_w - lr * ratio * R.stateless_fallback_update(g)
        ws.append(w.detach().clone())
        refs.append(ref_w)
    assert traj_error(ws, refs, w0) < FP32_TOL
    assert len(opt.state) == 0


@pytest.mark.parametrize("shape", list(FALLBACK_SHAPES) + ["conv", "skewed"])
@pytest.mark.parametrize("cls", [SWAN, SinkGD])
def test_rowclip_fallback_matches_reference(cls, shape):
    # Rows over max(row RMS, tensor RMS) at lr * ratio; decoupled wd; no state. "skewed": rows whose
    # gradients differ by 1e3 in scale, so the large rows are clipped to RMS 1 and the small rows stay
    # small (with the plain stateless rule every row would reach RMS 1).
    s = {**FALLBACK_SHAPES, "conv": (6, 3, 3, 3), "skewed": (9, 7)}[shape]
    lr, ratio, wd = 1e-3, 20.0, 0.1
    w = _weight(s, 6)
    w0 = w.detach().clone()
    opt = cls([{"params": [w], "rule": "fallback"}], lr=lr, weight_decay=wd, fallback="rowclip")
    grads = _grads(s, 3, 6)
    if shape == "skewed":
        grads = [g * torch.logspace(0, 3, s[0]).reshape(-1, 1) for g in grads]
    ref_w, ws, refs = w0.to(F64), [], []
    for g in grads:
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        ref_w = (1 - lr * ratio * wd) * ref_w - lr * ratio * R.rowclip_fallback_update(g)
        ws.append(w.detach().clone())
        refs.append(ref_w)
        if shape == "skewed":
            rows = ((w.detach() - before * (1 - lr * ratio * wd)) / (lr * ratio)).square().mean(1).sqrt()
            assert rows[-1] == pytest.approx(1.0, rel=1e-4) and rows[0] < 1e-2
    assert traj_error(ws, refs, w0) < FP32_TOL
    assert len(opt.state) == 0


def test_plain_list_splits_by_shape_and_fallback_lr_ratio_applies():
    # SWAN(list): one param group (as the user passed it); inside it >= 2-D -> matrix at lr, 1-D and
    # 0-D -> AdamW at lr * ratio; the first AdamW step moves each entry by ~lr * ratio (|m_hat / sqrt(v_hat)| = 1).
    mat, vec, scalar = _weight((4, 8), 7), _weight((5,), 7), _weight((), 7)
    opt = SWAN([mat, vec, scalar], lr=1e-3, fallback_lr_ratio=7.0)
    assert len(opt.param_groups) == 1
    assert [opt.weight_rule(opt.param_groups[0], tuple(p.shape)) for p in (mat, vec, scalar)] == [
        "matrix", "fallback", "fallback"]
    before = [p.detach().clone() for p in (vec, scalar)]
    for p in (mat, vec, scalar):
        p.grad = torch.randn(p.shape, generator=_gen(8))
    opt.step()
    for p, b in zip((vec, scalar), before):
        assert torch.allclose((p.detach() - b).abs(), torch.full(p.shape, 7e-3), rtol=1e-4)


# ------------------------------------------------------------------------------------ SGD-SaI
def sgdsai_run_fp32(shapes, *, steps=4, seed=0, cls=SGDSaI, **kw):
    ws = [_weight(s, seed + i) for i, s in enumerate(shapes)]
    w0 = [w.detach().clone() for w in ws]
    opt = cls(ws, **kw)
    ref = R.SGDSaIRef(kw["lr"], kw.get("momentum", 0.9), kw.get("eps", 1e-8), kw.get("weight_decay", 1e-2),
                      kw.get("max_normalized_gsnr", False))
    grads = [_grads(s, steps, seed + 10 * i) for i, s in enumerate(shapes)]
    cur = [w.to(F64) for w in w0]
    errs = []
    for t in range(steps):
        gs = [grads[i][t] for i in range(len(ws))]
        for w, g in zip(ws, gs):
            w.grad = g.clone()
        opt.step()
        cur = ref.step(cur, gs)
        errs.append(max(traj_error([w.detach()], [c], w00) for w, c, w00 in zip(ws, cur, w0)))
    return max(errs), opt, ref


def test_sgd_sai_matches_reference_fp32():
    # Every shape, scales from the first gradient (unbiased std), EMA momentum, decoupled wd.
    # lr 1e-2: the one-element tensors (scale 1) move ~1e-2 per step, so fp32 storage of W ~ 1
    # (6e-8) stays well below FP32_TOL of the movement.
    err, opt, ref = sgdsai_run_fp32(list(ALL_SHAPES.values()) + [(1,)], lr=1e-2, weight_decay=0.5)
    assert err < FP32_TOL, err
    for i, p in enumerate(opt.param_groups[0]["params"]):
        assert opt.state[p]["gsnr"].dtype == torch.float32
        assert math.isclose(opt.state[p]["gsnr"].item(), ref.scale[i], rel_tol=1e-6)


def test_sgd_sai_max_normalized_matches_reference_fp32():
    # The paper's variant: every scale divided by the max scale so far; differs from the default.
    err, opt, ref = sgdsai_run_fp32(list(ALL_SHAPES.values()), lr=1e-1, max_normalized_gsnr=True)
    assert err < FP32_TOL, err
    assert max(ref.scale.values()) > 2  # so dividing by the max changes the trajectory
    plain = sgdsai_run_fp32(list(ALL_SHAPES.values()), lr=1e-1)[1]
    diff = max((a.detach() - b.detach()).abs().max().item()
               for a, b in zip(opt.param_groups[0]["params"], plain.param_groups[0]["params"]))
    assert diff > 1e-3


def sgdsai_marked_run(cls=SGDSaI, **variant):
    """SGD-SaI on a matrix group and a group marked rule="fallback" (an embedding-like and a norm-like
    weight) with ``variant``, four steps whose LR changes as a scheduler's would, a state_dict round
    trip after step 2; against SGDSaIRef at lr on the matrix group and, on the marked group, AdamWRef
    (``fallback="adamw"``) or SGDSaIRef at lr * fallback_lr_ratio. Returns (the three weights'
    trajectory errors, the optimizer, its weights)."""
    lr0, wd, betas, eps = 1e-2, 0.1, (0.8, 0.95), 1e-6
    fallback, ratio = variant.get("fallback", "sgdsai"), variant.get("fallback_lr_ratio", 1.0)
    factors = [1.0, 0.5, 0.8, 0.3]
    shapes = [(4, 6), (11, 6), (13,)]  # matrix; embedding-like and norm-like in the fallback group
    ws = [_weight(s_, 20 + i) for i, s_ in enumerate(shapes)]
    w0 = [w.detach().clone() for w in ws]
    grads = [_grads(s_, len(factors), 30 + i) for i, s_ in enumerate(shapes)]

    def build(params):
        return cls([{"params": params[:1], "rule": "matrix"}, {"params": params[1:], "rule": "fallback"}],
                   lr=lr0, weight_decay=wd, **{"betas": betas, "adam_eps": eps, **variant})

    opt = build(ws)
    mat_ref = R.SGDSaIRef(lr0, weight_decay=wd)
    fb_refs = ([R.AdamWRef(lr0 * ratio, betas, eps, wd) for _ in shapes[1:]] if fallback == "adamw"
               else R.SGDSaIRef(lr0 * ratio, weight_decay=wd))
    cur = [w.to(F64) for w in w0]
    traj = [[], [], []]
    refs = [[], [], []]
    for t, f in enumerate(factors):
        if t == 2:  # resume from a checkpoint of the first two steps
            state = opt.state_dict()
            ws = [torch.nn.Parameter(w.detach().clone()) for w in ws]
            opt = build(ws)
            opt.load_state_dict(state)
        for group in opt.param_groups:
            group["lr"] = lr0 * f
        gs = [g[t] for g in grads]
        for w, g in zip(ws, gs):
            w.grad = g.clone()
        opt.step()
        mat_ref.lr = lr0 * f
        cur[0] = mat_ref.step(cur[:1], gs[:1])[0]
        if fallback == "adamw":
            for i, ref in enumerate(fb_refs, start=1):
                ref.lr = lr0 * f * ratio
                cur[i] = ref.step(cur[i], gs[i])
        else:
            fb_refs.lr = lr0 * f * ratio
            cur[1:] = fb_refs.step(cur[1:], gs[1:])
        for i, w in enumerate(ws):
            traj[i].append(w.detach().clone())
            refs[i].append(cur[i])
    return [traj_error(traj[i], refs[i], w0[i]) for i in range(3)], opt, ws


@pytest.mark.parametrize("fallback", ["adamw", "sgdsai"])
def test_sgd_sai_fallback_groups_match_reference(fallback):
    # A departure from the paper, opt-in: groups marked rule="fallback" take AdamW (or SGD-SaI) at
    # lr * fallback_lr_ratio, the others SGD-SaI at lr, each against its float64 reference; the LR is
    # changed between steps as a scheduler does (the ratio follows it), and a state_dict round trip
    # after step 2 continues the same trajectory. fp32 math vs float64: FP32_TOL of the movement.
    errors, opt, ws = sgdsai_marked_run(fallback=fallback, fallback_lr_ratio=7.0)
    for i, err in enumerate(errors):
        assert err < FP32_TOL, (i, err)
    fb_state = opt.state[ws[1]]
    assert ("exp_avg" in fb_state) == (fallback == "adamw") and ("gsnr" in fb_state) == (fallback == "sgdsai")
    assert "gsnr" in opt.state[ws[0]] and "exp_avg" not in opt.state[ws[0]]


@pytest.mark.parametrize("kw", [{"fallback": "adamw"}, {"fallback_lr_ratio": 3.0}])
def test_sgd_sai_fallback_needs_marked_groups(kw):
    # Without a rule="fallback" group the setting would silently do nothing: an error naming it.
    ps = [torch.nn.Parameter(torch.zeros(4, 6)), torch.nn.Parameter(torch.zeros(6))]
    with pytest.raises(ValueError, match=next(iter(kw))):
        SGDSaI(ps, lr=1e-2, **kw)
    SGDSaI([{"params": ps[:1]}, {"params": ps[1:], "rule": "fallback"}], lr=1e-2, **kw)  # marked: accepted


# ------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("shape", list(MATRIX_SHAPES))
def test_swan_bf16(shape, stochastic):
    bf16_swan(shape, stochastic)


def bf16_swan(shape, stochastic=True, whitening="eigh"):
    return matrix_run_bf16(SWAN, MATRIX_SHAPES[shape], R.swan_update, whitening=whitening, stochastic=stochastic)


@pytest.mark.parametrize("shape", SQUARE_FREE)
def test_swan_newton_schulz_bf16(shape):
    bf16_swan(shape, whitening="newton_schulz")


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("shape", list(MATRIX_SHAPES))
def test_sinkgd_bf16(shape, stochastic):
    bf16_sinkgd(shape, stochastic)


def bf16_sinkgd(shape, stochastic=True):
    return matrix_run_bf16(SinkGD, MATRIX_SHAPES[shape], R.sinkgd_update, stochastic=stochastic)


def bf16_fallback(kind: str, stochastic=True):
    """AdamW (fp32 moments) or stateless fallback on bf16 1-D, 0-D and 2-D weights."""
    lr, ratio, wd = 5e-4, 20.0, 0.1
    shapes = list(FALLBACK_SHAPES.values())
    ws = [_weight(s, 20 + i, torch.bfloat16, scale=0.02) for i, s in enumerate(shapes)]
    opt = SWAN([{"params": ws, "rule": "fallback"}], lr=lr, weight_decay=wd, fallback=kind,
               stochastic_rounding=stochastic)
    grads = list(zip(*[_grads(s, 3, 30 + i, torch.bfloat16) for i, s in enumerate(shapes)]))
    adams = [R.AdamWRef(lr * ratio, (0.9, 0.999), 1e-8, wd) for _ in shapes]

    def ref_next(t, before, gs):
        if kind == "adamw":
            return [a.step(b, g) for a, b, g in zip(adams, before, gs)]
        return [(1 - lr * ratio * wd) * b - lr * ratio * R.stateless_fallback_update(g) for b, g in zip(before, gs)]

    out = bf16_step_errors(opt, ws, grads, ref_next, stochastic)
    if kind == "adamw":
        for w in ws:  # moments of bf16 weights are fp32
            assert opt.state[w]["exp_avg"].dtype == torch.float32
            assert opt.state[w]["exp_avg_sq"].dtype == torch.float32
    return out


@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("kind", ["adamw", "stateless"])
def test_fallback_bf16(kind, stochastic):
    bf16_fallback(kind, stochastic)


def bf16_sgd_sai(stochastic=True):
    """SGD-SaI on bf16 weights. Scales: from the bf16 gradient, exact in float64. The momentum buffer
    lives in the weight's dtype (as in the official code), so it is checked separately against the
    float64 EMA within bf16 storage precision (2^-6 relative Frobenius: two bf16 roundings per step,
    and torch's CPU bf16 ``add_(g, alpha=0.1)`` rounds alpha itself to bf16, 0.1 -> 0.10009765625);
    the weight update from that buffer is then held to the 1-ulp bound."""
    lr, wd = 1e-3, 0.1
    shapes = list(ALL_SHAPES.values())
    # one-element tensors have scale 1 (not ~sqrt(numel)): start them smaller so their updates are
    # also ~100 ulps
    ws = [_weight(s, 40 + i, torch.bfloat16, scale=0.02 if math.prod(s) > 1 else 0.002)
          for i, s in enumerate(shapes)]
    opt = SGDSaI(ws, lr=lr, weight_decay=wd, stochastic_rounding=stochastic)
    ref = R.SGDSaIRef(lr, 0.9, 1e-8, wd)
    grads = list(zip(*[_grads(s, 4, 50 + i, torch.bfloat16) for i, s in enumerate(shapes)]))
    buf_err = 0.0

    def ref_next(t, before, gs):
        nonlocal buf_err
        ref.step(before, list(gs))  # advances the float64 EMA and takes the scales
        out = []
        for i, (w, b) in enumerate(zip(ws, before)):
            buf = opt.state[w]["momentum_buffer"].to(F64)
            buf_err = max(buf_err, ((buf - ref.buf[i]).norm() / ref.buf[i].norm()).item())
            out.append((1 - lr * wd) * b - lr * ref.scale[i] * buf)
        return out

    out = bf16_step_errors(opt, ws, grads, ref_next, stochastic)
    assert buf_err < 2.0**-6, buf_err
    for i, w in enumerate(ws):
        assert opt.state[w]["gsnr"].dtype == torch.float32
        assert math.isclose(opt.state[w]["gsnr"].item(), ref.scale[i], rel_tol=1e-6)
    return out


@pytest.mark.parametrize("stochastic", [True, False])
def test_sgd_sai_bf16(stochastic):
    bf16_sgd_sai(stochastic)


# ------------------------------------------------------------------------------------ batch_dims
@pytest.mark.parametrize("cls", [SWAN, SinkGD])
@pytest.mark.parametrize("fallback", ["adamw", "stateless"])
def test_batch_dims_equals_independent_matrices(cls, fallback):
    # (E, out, in) with batch_dims=1 == E separate (out, in) weights; without it the tensor would be
    # one (E, out*in) matrix, which is different.
    e, shape = 3, (6, 10)
    stacked = _weight((e, *shape), 60)
    singles = [torch.nn.Parameter(stacked.detach()[i].clone()) for i in range(e)]
    flat = torch.nn.Parameter(stacked.detach().clone())
    kw = dict(lr=0.05, weight_decay=0.1, fallback=fallback)
    opt_b = cls([{"params": [stacked], "batch_dims": 1}], **kw)
    opt_s = cls(singles, **kw)
    opt_f = cls([flat], **kw)
    assert opt_b.rule_counts() == {"matrix": {"tensors": 1, "params": e * 60}}
    for g in _grads((e, *shape), 3, 60):
        stacked.grad, flat.grad = g.clone(), g.clone()
        for i, p in enumerate(singles):
            p.grad = g[i].clone()
        for o in (opt_b, opt_s, opt_f):
            o.step()
    together = torch.stack([p.detach() for p in singles])
    assert (stacked.detach() - together).abs().max() < 1e-6
    assert (flat.detach() - together).abs().max() > 1e-3
    assert len(opt_b.state) == 0


def test_batch_dims_apply_per_tensor():
    # batch_dims is at most ndim - 2 for each weight: beside an (E, out, in) expert stack, a 2-D
    # weight of the same group stays one matrix on the matrix rule (MoE: attention next to experts)
    for rule in ("matrix", "auto"):
        opt = SWAN([{"params": [torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(3, 4, 5))],
                     "rule": rule, "batch_dims": 1}])
        assert opt.rule_counts() == {"matrix": {"tensors": 2, "params": 16 + 60}}


def test_swan_whitening_sub_batch_size_does_not_change_the_update(monkeypatch):
    # whiten_batch_mb only decides how many same-shape matrices share one batched whitening call (a
    # speed/peak-memory knob): one matrix per call and all in one call must give the same weights up to
    # fp32 summation order in the batched matmuls (tolerance 1e-6 of the weights' movement).
    import stateless_opt.swan as swan_module

    torch.manual_seed(0)
    shapes = [(24, 40)] * 6 + [(40, 24)] * 3
    ws, calls = {}, {}
    real_direction = swan_module.swan_direction

    def counting_direction(*args, **kwargs):
        calls[current] += 1
        return real_direction(*args, **kwargs)

    monkeypatch.setattr(swan_module, "swan_direction", counting_direction)
    for mb in (1e-3, 1024.0):
        current, calls[mb] = mb, 0
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
        start = [p.detach().clone() for p in params]
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 + i))
        SWAN(params, lr=0.1, whiten_batch_mb=mb).step()
        ws[mb] = [(p.detach(), s) for p, s in zip(params, start)]
    for (a, s), (b, _) in zip(ws[1e-3], ws[1024.0]):
        assert (a - b).abs().max() <= 1e-6 * (b - s).abs().max()
    # and the knob is really used: one call per matrix under a tiny bound, one per shape under a large one
    assert calls == {1e-3: len(shapes), 1024.0: len(set(shapes))}


@pytest.mark.parametrize("shape", [*MATRIX_SHAPES, "large"])
def test_sinkgd_bf16_statistics(shape):
    # stats_dtype="bfloat16" (the CUDA default): the rounds read S = G∘G rounded to bf16 (2^-9
    # relative per element) and, on the CPU, each row/column sum is rounded to bf16 once more (CUDA
    # keeps it fp32); every scale is then off by up to ~2^-9 and the update by a few of those, never
    # more: the rounds renormalise, errors do not accumulate. Bound 1e-2; fp32 stats stay at FP32_TOL.
    s = (96, 200) if shape == "large" else MATRIX_SHAPES[shape]
    err = matrix_run_fp32(SinkGD, s, R.sinkgd_update, stats_dtype="bfloat16")
    assert err < 1e-2, err
    assert err > FP32_TOL, "bf16 statistics must show their rounding: the setting has to reach the rounds"
    assert matrix_run_fp32(SinkGD, s, R.sinkgd_update, stats_dtype="float32") < FP32_TOL


# ------------------------------------------------------------------------------------ the catalogue
# Every row of tests/optim_db.py: a new optimizer (or variant) is checked against its reference here.
READABLE_RULES = {r.name: r for r in optim_db.rows(matrix_rule=True) if r.rule is not r.reference}


@pytest.mark.parametrize("shape", list(MATRIX_SHAPES))
@pytest.mark.parametrize("name", sorted(READABLE_RULES))
def test_readable_rule_is_the_reference(name, shape):
    # Each algorithm module opens with its rule for one tensor in plain float64 torch (the form a reader
    # checks against the paper): it must be the independent reference of reference.py, to float64
    # rounding (1e-10 of the update; both are float64, in a different order of operations).
    row = READABLE_RULES[name]
    g = _grads(MATRIX_SHAPES[shape], 1, 11)[0]
    ref = row.reference(g)
    assert (row.rule(g) - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


def test_sgd_sai_readable_rule_is_the_reference():
    # sgd_sai.py opens with gsnr and sgd_sai_update for one tensor: three steps of them are SGDSaIRef's.
    lr, wd, mu = 1e-2, 0.5, 0.9
    shapes = list(ALL_SHAPES.values()) + [(1,)]
    ws = [_weight(s, 70 + i).detach().to(F64) for i, s in enumerate(shapes)]
    grads = [_grads(s, 3, 80 + i, F64) for i, s in enumerate(shapes)]
    ref, cur = R.SGDSaIRef(lr, mu, 1e-8, wd), [w.clone() for w in ws]
    bufs = [torch.zeros_like(w) for w in ws]
    scales = [sgd_sai.gsnr(g[0]) for g in grads]
    for i, g in enumerate(grads):
        assert math.isclose(scales[i].item(), R.gsnr(g[0], 1e-8), rel_tol=1e-12)
    for t in range(3):
        for w, g, buf, scale in zip(ws, grads, bufs, scales):
            sgd_sai.sgd_sai_update(w, g[t], buf, scale.item(), lr=lr, momentum=mu, weight_decay=wd, first=t == 0)
        cur = ref.step(cur, [g[t] for g in grads])
    assert max((w - c).abs().max().item() for w, c in zip(ws, cur)) <= 1e-12


@pytest.mark.parametrize("shape", SQUARE_FREE)
@pytest.mark.parametrize("row", [r.id for r in optim_db.rows(matrix_rule=True)])
def test_catalogue_matrix_rules_match_reference_fp32(row, shape):
    # Every matrix-rule row, fp32, three steps, against W <- (1 - lr wd) W - lr U_ref(G): FP32_TOL
    # (module docstring) on the full-rank shapes (square ones are rank-deficient after SWAN's centring;
    # the exact rows cover them above).
    r = optim_db.info(row)
    err = matrix_run_fp32(r.cls, MATRIX_SHAPES[shape], r.reference, **r.variant)
    assert err < FP32_TOL, err


@pytest.mark.parametrize("row", [r.id for r in optim_db.rows(matrix_rule=False, marked_groups=False)])
def test_catalogue_elementwise_rules_match_reference_fp32(row):
    # Every elementwise row (SGD-SaI and its variants) against SGDSaIRef on every shape, FP32_TOL; lr as
    # in the tests above (the max-normalised scales are <= 1, so a larger lr keeps movements measurable).
    r = optim_db.info(row)
    lr = 1e-1 if r.variant.get("max_normalized_gsnr") else 1e-2
    err, _, _ = sgdsai_run_fp32(list(ALL_SHAPES.values()) + [(1,)], lr=lr, weight_decay=0.5, cls=r.cls, **r.variant)
    assert err < FP32_TOL, err


@pytest.mark.parametrize("row", [r.id for r in optim_db.rows(matrix_rule=False, marked_groups=True)])
def test_catalogue_marked_group_rows_match_reference_fp32(row):
    # Every elementwise row that acts on the marked fallback groups (SGD-SaI's opt-in AdamW fallback):
    # sgdsai_marked_run against the float64 references of both groups, FP32_TOL of the movement.
    r = optim_db.info(row)
    errors, _, _ = sgdsai_marked_run(cls=r.cls, **r.variant)
    assert max(errors) < FP32_TOL, errors
