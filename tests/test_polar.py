"""Polar Express whitening (stateless_opt/polar.py): the coefficient generator, the polar factor against
a float64 SVD reference, the bf16 path (emulated on CPU: operands and results rounded to bf16 around
fp32 matmuls, which is what tensor cores compute up to the order of the fp32 sums), edge cases, and
agreement with the other two whitening methods.

Tolerances and why (CPU, measured values in brackets):
* fp32, converged schedule (7 steps, the fp32 default): 1e-5 relative Frobenius error [<= 1.5e-6]: fp32
  rounding through ~20 matmuls;
* bf16, the default 5 steps on non-square well-conditioned matrices: the issue's 2% bar [0.51-0.94%]:
  bf16 rounding (2^-9 per result, amplified where the first steps lift small singular values) plus
  the 5-step schedule's own error (<= 9.2e-5 worst case on [1e-2, 1]);
* square matrices after GradNorm's centring are rank-deficient: compared on the range (singular
  values > 1e-10 sigma_max), as in tests/reference.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference as R
from stateless_opt import SWAN, SWANConfig
from stateless_opt import polar_express as P
from stateless_opt.swan import swan_direction, whitening_flops, whitening_plan

F64 = torch.float64
FP32_TOL = 1e-5
BAR = 0.02  # the accuracy bar for the default on non-square, well-conditioned matrices


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b).norm() / b.norm())


def compose(x: torch.Tensor, steps: int, lower: float) -> torch.Tensor:
    for a, b, c in P.polar_express_coefficients(steps, lower):
        x = a * x + b * x**3 + c * x**5
    return x


def with_spectrum(m: int, n: int, svals, seed: int = 0) -> torch.Tensor:
    """U diag(svals) V^T with Haar-random U, V (float64); len(svals) < min(m, n) gives exact rank."""
    g = _gen(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    s = torch.as_tensor(svals, dtype=F64)
    return (u[:, : len(s)] * s) @ v[:, : len(s)].T


def polar_rel(x: torch.Tensor, steps: int, dtype: str, lower: float = P.PE_LOWER) -> float:
    """Error of polar_express on x (m <= n) vs the fp64 polar factor on the range (scale removed)."""
    ref = R.polar_on_range(x.to(F64))
    d = P.polar_express(x.float()[None], steps, lower, dtype)[0].to(F64)
    return rel(d * (ref.norm() / d.norm()), ref)


# ------------------------------------------------------------------------------------ coefficients
@pytest.mark.parametrize("lo, hi", [(1e-6, 1.0), (1e-3, 1.0), (1e-2, 1.02), (0.3, 1.7), (0.9, 1.0), (0.999, 1.001)])
def test_optimal_quintic_equioscillates(lo, hi):
    # Chebyshev alternation: 1 - p reaches +E, -E, +E, -E at lo, two interior points, hi, and |1 - p|
    # never exceeds E on the interval (checked on a dense grid), so p is the minimax quintic.
    a, b, c, err, pts = P.optimal_odd_quintic(lo, hi)
    p = lambda x: a * x + b * x**3 + c * x**5  # noqa: E731
    assert pts[0] == pytest.approx(lo) and pts[-1] == pytest.approx(hi)
    assert all(pts[i] < pts[i + 1] for i in range(3))
    for x, sign in zip(pts, (1, -1, 1, -1)):
        assert 1 - p(x) == pytest.approx(sign * err, rel=1e-7, abs=1e-13)
    grid = torch.linspace(lo, hi, 200001, dtype=F64)
    assert float((1 - p(grid)).abs().max()) <= err * (1 + 1e-7) + 1e-14
    assert 0 < err < 1


def test_first_step_is_the_known_shape():
    # For [1e-3, 1] the optimum has slope ~8.5 at 0 and error just below 1 (it only lifts the bottom);
    # the Muon-like shape: a > 0, b < 0, c > 0.
    a, b, c, err, _ = P.optimal_odd_quintic(1e-3, 1.0)
    assert a == pytest.approx(8.4703, abs=1e-3) and b == pytest.approx(-25.108, abs=1e-2)
    assert c == pytest.approx(18.629, abs=1e-2) and err == pytest.approx(0.99153, abs=1e-4)


@pytest.mark.parametrize("steps, lower", [(4, 1e-2), (5, 3e-3), (7, 1e-2), (7, 1e-3), (12, 1e-4)])
def test_composition_maps_interval_near_one(steps, lower):
    # p_K o ... o p_1 maps [lower, 1] into [1 - E_K, 1 + E_K] (E_K from the schedule) and, with the
    # design margin, also singular values that rounding pushed up to 1 + PE_MARGIN.
    sched = P.polar_express_schedule(steps, lower)
    eps = sched[-1][-1]
    x = torch.cat([torch.logspace(math.log10(lower), 0, 20001, dtype=F64),
                   torch.linspace(1, 1 + P.PE_MARGIN, 1001, dtype=F64)])
    y = compose(x, steps, lower)
    assert float((y - 1).abs().max()) <= eps * (1 + 1e-9)
    # nothing is mapped outside [0, 1 + E_K] from [0, 1 + margin]: no blow-up from rounding excess
    z = compose(torch.linspace(0, 1 + P.PE_MARGIN, 20001, dtype=F64), steps, lower)
    assert float(z.min()) >= 0 and float(z.max()) <= 1 + eps * (1 + 1e-9)


def test_schedule_converges_to_fp32_accuracy():
    # The fp32 default (7 steps from PE_LOWER): every singular value in [PE_LOWER, 1] ends within a
    # relative spread of 1e-9 (the common scale is removed by SWAN's RMS normalisation); the bf16
    # default (5 steps) leaves at most 9.2e-5, far below bf16's noise floor (~6e-3 RMS measured).
    y = compose(torch.logspace(math.log10(P.PE_LOWER), 0, 20001, dtype=F64), 7, P.PE_LOWER)
    assert float(y.max() / y.min() - 1) < 1e-9
    assert P.polar_express_schedule(5, P.PE_LOWER)[-1][-1] < 9.2e-5


def test_schedule_validation_and_cache():
    with pytest.raises(ValueError):
        P.polar_express_schedule(0, 1e-2)
    with pytest.raises(ValueError):
        P.polar_express_schedule(4, 1.0)
    with pytest.raises(ValueError):
        P.optimal_odd_quintic(0.5, 0.5)
    assert P.polar_express_schedule(4, 1e-2) is P.polar_express_schedule(4, 1e-2)  # computed once


# ------------------------------------------------------------------------------------ polar factor, fp32
@pytest.mark.parametrize("shape", [(96, 256), (64, 96), (1, 40)])
def test_fp32_gaussian_converges(shape):
    x = torch.randn(shape, generator=_gen(1), dtype=F64)
    assert polar_rel(x, 7, "float32") < FP32_TOL


@pytest.mark.parametrize("shape", [(128, 128), (96, 256)])
def test_fp32_well_conditioned_converges(shape):
    # Singular values in [0.1, 1] (a square Gaussian's reach down to ~1/n: not well conditioned)
    x = with_spectrum(*shape, torch.linspace(1, 0.1, shape[0]))
    assert polar_rel(x, 7, "float32") < FP32_TOL


@pytest.mark.parametrize("n", [96, 256])
def test_fp32_gram_side_equals_direct(n):
    # The Gram-side form computes the same iterates X_k = M_k X_0 (agreement to fp32 rounding on a
    # well-conditioned Gaussian matrix).
    x = torch.randn(1, 64, n, generator=_gen(2))
    gram = P.polar_express(x, 7, P.PE_LOWER, "float32", gram_side=True)
    direct = P.polar_express(x, 7, P.PE_LOWER, "float32")
    assert rel(gram / gram.norm(), (direct / direct.norm()).to(F64)) < FP32_TOL


def test_gram_side_rounding_floor_is_why_swan_uses_the_direct_form():
    # Fewer FLOPs for n > 1.5 m, but the Gram side works with A = X X^T (condition number squared):
    # on kappa = 100 its fp32 error is ~100x the direct form's [1.4e-4 vs 1.5e-6].
    x = with_spectrum(96, 256, torch.logspace(0, -2, 96))
    ref = R.polar_on_range(x)
    errs = []
    for gram_side in (False, True):
        d = P.polar_express(x.float()[None], 7, P.PE_LOWER, "float32", gram_side=gram_side)[0].to(F64)
        errs.append(rel(d * (ref.norm() / d.norm()), ref))
    assert errs[0] < 1e-5 and errs[1] > 20 * errs[0]
    assert P.polar_express_flops(2048, 5461, 5, gram_side=True) < P.polar_express_flops(2048, 5461, 5)
    with pytest.raises(ValueError):
        P.polar_express(x.float()[None], 5, P.PE_LOWER, "bfloat16", gram_side=True)


@pytest.mark.parametrize("kappa, steps, tol", [(1e2, 7, FP32_TOL), (1e3, 7, 0.1), (1e3, 10, FP32_TOL)])
def test_fp32_ill_conditioned(kappa, steps, tol):
    # Singular values spread log-uniformly over [1/kappa, 1], wide and square. kappa = 100: converged
    # [1.5e-6, 1.1e-6]; at kappa = 1e3 the bottom decade lies below the design bound 1e-2 and converges
    # only partly in 7 steps [4.0e-2, 4.2e-2]; 3 more steps converge it [8.6e-6, 3.9e-6].
    for m, n in ((96, 256), (128, 128)):
        x = with_spectrum(m, n, torch.logspace(0, -math.log10(kappa), m))
        assert polar_rel(x, steps, "float32") < tol, (m, n)


def test_fp32_exactly_rank_deficient_on_range():
    # Zero singular values stay zero (odd polynomials map 0 to 0): the polar factor on the range.
    x = with_spectrum(128, 128, torch.linspace(1, 0.1, 100))
    assert polar_rel(x, 7, "float32") < 1e-4  # [1.6e-5: the null directions' fp32 noise, grown ~100x]


# ------------------------------------------------------------------------------------ bf16 (emulated)
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 160), (128, 384), (10, 24), (24, 10)])
def test_bf16_default_within_bar(shape):
    # The default on the bf16 path (5 steps, lower 1e-2) through SWAN's whole direction (GradNorm,
    # whitening, re-centring, RMS 1) vs the float64 reference: within the 2% bar [0.51-0.94%; worst of
    # 60 random non-square Gaussian shapes, 3..128 x 1.3-4 times as many: 1.1%].
    g = torch.randn(shape, generator=_gen(3)) + 0.3
    d = swan_direction(g[None], eps=1e-8, steps=5, method="polar_express", dtype="bfloat16")[0]
    assert rel(d, R.swan_update(g)) < BAR


def test_bf16_through_the_optimizer():
    # SWAN(whitening_dtype="bfloat16") on CPU runs the emulated path; ns_steps=None -> 5 steps.
    g = torch.randn(64, 256, generator=_gen(4))
    w = torch.nn.Parameter(torch.zeros(64, 256))
    w.grad = g
    SWAN([w], lr=1.0, whitening_dtype="bfloat16").step()
    err = rel(-w.detach(), R.swan_update(g))
    assert 1e-3 < err < BAR  # really bf16 (fp32 would be ~1e-6), within the bar [5.5e-3]


@pytest.mark.parametrize("n", [32, 64])
def test_bf16_square_after_centring_on_range(n):
    # Square weight with a well-separated spectrum: GradNorm's centring adds one zero singular value;
    # the output is compared on the range [0.50-0.70%].
    g = with_spectrum(n, n, torch.linspace(1, 0.3, n), seed=n).float()
    d = swan_direction(g[None], eps=1e-8, steps=5, method="polar_express", dtype="bfloat16")[0]
    assert rel(d, R.swan_update(g)) < BAR


def test_recentring_removes_the_null_direction():
    # Without the final re-centring, the centred gradient's null direction (rounding noise) is grown
    # by the iteration; 20 fp32 steps on a square weight leave [5.7e-3]; with it [9.6e-7].
    g = with_spectrum(64, 64, torch.linspace(1, 0.3, 64), seed=5).float()
    ref = R.swan_update(g)
    x = g.double()
    x = ((x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)).float()
    raw = P.polar_express(x[None], 20, P.PE_LOWER, "float32")[0].to(F64)
    raw = raw * (math.sqrt(raw.numel()) / raw.norm())
    d = swan_direction(g[None], eps=1e-8, steps=20, method="polar_express", dtype="float32")[0]
    assert rel(d, ref) < FP32_TOL < rel(raw, ref)


# ------------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("axis", ["oriented", "stored_rows"])
def test_zero_and_constant_rows_stay_finite(dtype, axis):
    g = torch.randn(8, 16, generator=_gen(6))
    g[2] = 0.0
    g[5] = 3.0
    d = swan_direction(g[None], eps=1e-8, steps=40, method="polar_express", dtype=dtype, gradnorm_axis=axis)[0]
    assert torch.isfinite(d).all()
    if axis == "oriented":
        assert d[2].abs().max() == 0 and d[5].abs().max() == 0  # exact zeros, as the polar factor
        assert rel(d, R.swan_update(g)) < (FP32_TOL if dtype == "float32" else BAR)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 17), (17, 1), (1, 1), (5, 5), (7, 30), (30, 7)])
def test_degenerate_shapes_and_zero_matrix(dtype, shape):
    for g in (torch.randn(shape, generator=_gen(7)), torch.zeros(shape)):
        d = swan_direction(g[None], eps=1e-8, steps=7 if dtype == "float32" else 5, method="polar_express",
                           dtype=dtype)[0]
        assert d.shape == g.shape and torch.isfinite(d).all()
        ref = R.swan_update(g)
        if ref.norm() == 0:
            assert d.abs().max() == 0
        else:
            assert rel(d, ref) < (FP32_TOL if dtype == "float32" else BAR)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_many_steps_stay_finite_on_rank_deficient(dtype):
    # Column-centred tall matrix (gradnorm_axis="stored_rows"): rank-deficient; its null direction holds
    # rounding noise that every step grows, up to singular value ~1 (odd polynomials keep [0, 1 + E]),
    # and the final re-centring (along the columns here) removes it.
    g = torch.randn(96, 24, generator=_gen(8)) + 1.0
    for steps in (40, 100):
        d = swan_direction(g[None], eps=1e-8, steps=steps, method="polar_express", dtype=dtype,
                           gradnorm_axis="stored_rows")[0]
        assert torch.isfinite(d).all()
        # [fp32: 1.3e-6 (7 steps) .. 1.7e-6 (100); bf16: 9.6e-3 .. 1.05e-2]
        assert rel(d, R.swan_update(g, gradnorm_axis="stored_rows")) < (FP32_TOL if dtype == "float32" else BAR)


# ------------------------------------------------------------------------------------ vs the other methods
def test_three_methods_agree():
    # Non-square Gaussian: eigh (exact fp64) vs Newton-Schulz (12) vs Polar Express fp32 (7) within
    # fp32 tolerance [1.3e-6, 6.5e-7]; Polar Express bf16 (5) within the bar [6.2e-3].
    g = torch.randn(3, 48, 160, generator=_gen(9)) + 0.2
    eigh = swan_direction(g, eps=1e-8, steps=0, method="eigh").to(F64)
    ns = swan_direction(g, eps=1e-8, steps=12, method="newton_schulz")
    pe = swan_direction(g, eps=1e-8, steps=7, method="polar_express", dtype="float32")
    pe16 = swan_direction(g, eps=1e-8, steps=5, method="polar_express", dtype="bfloat16")
    assert rel(ns, eigh) < FP32_TOL and rel(pe, eigh) < FP32_TOL
    assert rel(pe16, eigh) < BAR


def test_square_polar_express_beats_newton_schulz():
    # Square Gaussian (centring: rank n-1, smallest singular values ~1/n): in fp32, 7 PE steps from
    # the spectral bound converge further than 12 Newton-Schulz steps [1.6e-6 vs 4.6e-2].
    g = torch.randn(1, 128, 128, generator=_gen(10))
    ref = R.swan_update(g[0])
    pe = rel(swan_direction(g, eps=1e-8, steps=7, method="polar_express")[0], ref)
    ns = rel(swan_direction(g, eps=1e-8, steps=12, method="newton_schulz")[0], ref)
    assert pe < ns


# ------------------------------------------------------------------------------------ config and cost
def test_config_defaults_and_plan():
    cfg = SWANConfig()
    assert cfg.whitening == "polar_express" and cfg.ns_steps is None and cfg.whitening_dtype == "auto"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert whitening_plan("polar_express", None, "auto", cpu) == (7, "float32")
    assert whitening_plan("polar_express", None, "auto", cuda) == (5, "bfloat16")
    assert whitening_plan("polar_express", 6, "bfloat16", cpu) == (6, "bfloat16")
    assert whitening_plan("newton_schulz", None, "auto", cuda) == (12, "float32")
    assert whitening_plan("eigh", None, "auto", cuda)[1] == "float32"
    with pytest.raises(ValueError, match="polar_express"):
        SWANConfig(whitening="newton_schulz", whitening_dtype="bfloat16")
    with pytest.raises(ValueError):
        SWANConfig(pe_lower_bound=0.0)


def llama_1b3() -> list[tuple[int, int]]:
    return [(2048, 2048)] * 4 * 24 + [(5461, 2048), (5461, 2048), (2048, 5461)] * 24


def test_default_flops_at_1b3():
    # The default (5 bf16 steps, direct) needs ~1.9x fewer FLOPs than Newton-Schulz (12 fp32 steps) at
    # 1.3B, and runs them on bf16 tensor cores; the fp32 default (7 steps) needs ~1.3x fewer.
    ns = sum(whitening_flops(m, n, 12, "newton_schulz") for m, n in llama_1b3())
    pe16 = sum(whitening_flops(m, n, 5, "polar_express") for m, n in llama_1b3())
    pe32 = sum(whitening_flops(m, n, 7, "polar_express") for m, n in llama_1b3())
    assert ns == pytest.approx(1.1957e14, rel=1e-3) and pe16 == pytest.approx(6.391e13, rel=1e-3)
    assert pe32 < ns / 1.3
    assert whitening_flops(5461, 2048, 4) == whitening_flops(2048, 5461, 4) > whitening_flops(2048, 2048, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for the native bf16 path")
def test_native_bf16_matches_emulation():
    # Tensor-core bf16 vs the CPU emulation: the same arithmetic up to the order of fp32 sums, which can
    # flip a bf16 rounding here and there (one bf16 ulp is 2^-8 = 0.39% relative) and five iterations
    # carry the flips on; measured 0.50% on an H100 (benchmarks/results/gpu_pytest_polar_edge_h100.txt),
    # so the bound is 1% (~2.5 ulps). What matters, distance to the exact factor, keeps the CPU bar.
    g = torch.randn(4, 96, 300, generator=_gen(11))
    cpu = swan_direction(g, eps=1e-8, steps=5, method="polar_express", dtype="bfloat16")
    gpu = swan_direction(g.cuda(), eps=1e-8, steps=5, method="polar_express", dtype="bfloat16").cpu()
    eigh = swan_direction(g, eps=1e-8, steps=0, method="eigh").to(F64)
    assert rel(gpu, cpu.to(F64)) < 1e-2 and rel(gpu, eigh) < BAR
