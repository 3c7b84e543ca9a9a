"""The orthogonal polar factor U V^T of a batch of matrices by a Polar Express schedule.

Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): iterate X <- p_k(X) with odd
quintics p_k(x) = a x + b x^3 + c x^5 (applied to the singular values: p(X) = a X + b (X X^T) X +
c (X X^T)^2 X), where each p_k is the minimax approximation of the constant 1 on the interval
[lo_k, hi_k] that holds the singular values at step k. Starting from [lower, 1] (the caller scales X
so that sigma_max <= 1; ``lower`` is the smallest singular value, relative to that bound, that the
schedule is built to converge), the composition maps [lower, 1] into [1 - E_K, 1 + E_K] with E_K
falling super-exponentially once the interval has closed in on 1. Unlike Muon's fixed quintic this
converges to the exact polar factor; singular values below ``lower`` still grow by ~prod(a_k) and
converge with more steps. Odd polynomials map 0 to 0, so zero singular values stay zero: the
iteration computes the polar factor on the range.

Written from the paper's description (no third-party code): the coefficients come from our own
Remez exchange below (float64, cached per (steps, lower)), with two safety measures for finite
precision, in the spirit of the paper's:

* each p_k is designed on [lo_k, hi_k (1 + PE_MARGIN)]: a singular value that rounding pushed a little
  above the interval is still mapped into [1 - E_k, 1 + E_k] (without it, p_k's steep slope beyond
  hi_k - ~26 for the first step - amplifies an excess of 1e-3 to divergence within a few steps);
* a design interval is never narrower than [PE_MAX_RATIO * hi, hi]: once converged, the remaining
  steps use one fixed, well-conditioned quintic that tolerates rounding noise (bf16: ~1e-2).

The iteration runs in the direct form on X (m x n, m <= n): A = X X^T; B = b A + c A^2;
X <- a X + B X, 4 m^2 n + 2 m^3 FLOPs per step. A Gram-side form computes the same iterates as
X_k = M_k X_0 from m x m products only (R = M A M^T with A = X_0 X_0^T, Q = a I + b R + c R^2,
M <- Q M, and M X_0 once at the end: 4 m^2 n + (8 K - 6) m^3 for K steps, fewer FLOPs when n > 1.5 m),
and is kept here (``gram_side=True``) but never chosen by SWAN: it works with A, whose condition number
is that of X squared, so its rounding floor is ~u kappa^2 instead of ~u kappa (u the unit roundoff).
Measured: fp32 polar error 1.4e-4 vs 1e-6 on a kappa = 100 matrix, FSDP2 sharded-vs-single SWAN
trajectories 7.9e-4 vs 1.7e-5 (relative), and in bf16 2.9-4.2% vs 0.9% on real LLaMA MLP gradients.
(R is recomputed as M A M^T each step, the Gram matrix of the actual iterate; variants relying on M
and A commuting - R = M A M with M <- M Q, or R <- Q R Q - lost all accuracy within 4 steps on real
gradients even in fp32, or were 20-40x less accurate in bf16.)

bfloat16 (``dtype="bfloat16"``): matmul operands and results in bf16 with fp32 accumulation (native on
CUDA tensor cores; emulated elsewhere by rounding operands and results to bf16 around fp32 matmuls,
which is the same arithmetic up to the order of the fp32 sums), the iterate stored in bf16 as in
Muon's implementation (keeping it in fp32 and rounding only the operands measured less accurate,
1.3-4% vs 0.9%: a X then uses the unrounded X but B X the rounded one), the spectral bound from an
fp32-output matmul.
"""

from __future__ import annotations

import functools
import math

import torch

from . import kernels
from .precision import TINY, matmul_fp32

# Upper end of every design interval inflated by this much: covers rounding above the bound.
PE_MARGIN = 0.02
# Design intervals are never narrower than [PE_MAX_RATIO * hi, hi].
PE_MAX_RATIO = 0.9
# The spectral bound is multiplied by this in bf16 (its matmul operands are rounded to bf16, ~2^-9).
BF16_BOUND_SAFETY = 1.02
# bf16 matmuls on CUDA: sides padded with zeros to a multiple of this (an odd side such as LLaMA's
# 5461 runs ~5x slower on tensor cores). Zero rows/columns stay exactly zero through the iteration.
PAD = 64
# Ridge added to the normalised Gram matrix (eigenvalues <= 1) by the Gram-side form. fp32 rounding
# leaves the null directions of a rank-deficient A (e.g. column-centred tall weights with
# gradnorm_axis="stored_rows") eigenvalues of ~ +-1e-8; a negative one makes q(s) = a + b s + c s^2 > a,
# so R = M A M^T grows there by a^2 per step and overflows after ~10 steps. The ridge keeps it positive.
GRAM_RIDGE = 1e-7


# ------------------------------------------------------------------------------------ coefficients
def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (a 4 x 4 system; plain floats, no dependencies)."""
    n = len(rhs)
    aug = [list(r) + [v] for r, v in zip(rows, rhs)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(aug[r][col]))
        aug[col], aug[piv] = aug[piv], aug[col]
        for r in range(col + 1, n):
            f = aug[r][col] / aug[col][col]
            for k in range(col, n + 1):
                aug[r][k] -= f * aug[col][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (aug[r][n] - sum(aug[r][k] * out[k] for k in range(r + 1, n))) / aug[r][r]
    return out


def optimal_odd_quintic(lo: float, hi: float, max_iter: int = 100) -> tuple[float, float, float, float, tuple]:
    """(a, b, c, E, points): the odd quintic p(x) = a x + b x^3 + c x^5 minimising max |1 - p(x)| over
    [lo, hi] (0 < lo < hi), its error E, and the four points where 1 - p equioscillates (+E at lo,
    -E, +E, -E at hi).

    Remez exchange. {x, x^3, x^5} is a Chebyshev system on x > 0, so the optimum equioscillates on 4
    points; p' = a + 3 b x^2 + 5 c x^4 has at most two positive roots, so these are lo, the two
    interior extrema and hi. Each round solves p(x_i) + s_i E = 1 on the current points and moves the
    interior points to the extrema of p. To stay well conditioned on narrow intervals, q(y) = p(x)/x
    is written in the variable t = (y - C) / H in [-1, 1], y = x^2, C = (lo^2 + hi^2)/2, H = (hi^2 -
    lo^2)/2, and converted to monomials at the end.
    """
    if not 0.0 < lo < hi:
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    C, H = (lo * lo + hi * hi) / 2, (hi * hi - lo * lo) / 2
    ratio = C / H
    ts = [-1.0, -0.5, 0.5, 1.0]  # reference points in t; the interior ones move
    signs = (1.0, -1.0, 1.0, -1.0)
    for _ in range(max_iter):
        xs = [lo, math.sqrt(C + H * ts[1]), math.sqrt(C + H * ts[2]), hi]  # endpoints exact (C - H cancels)
        q0, q1, q2, err = _solve([[x, x * t, x * t * t, s] for x, t, s in zip(xs, ts, signs)], [1.0] * 4)
        # extrema of p: d/dx [x q(y)] = q + 2 y q'(y) = 0, a quadratic in t:
        # 5 q2 t^2 + (3 q1 + 4 q2 C/H) t + (q0 + 2 q1 C/H) = 0
        qa, qb, qc = 5.0 * q2, 3.0 * q1 + 4.0 * q2 * ratio, q0 + 2.0 * q1 * ratio
        disc = qb * qb - 4.0 * qa * qc
        if qa == 0.0 or disc <= 0.0:
            raise RuntimeError(f"Remez exchange lost its interior extrema on [{lo}, {hi}]")
        root = -0.5 * (qb + math.copysign(math.sqrt(disc), qb))
        t1, t2 = sorted((root / qa, qc / root))
        t1, t2 = min(max(t1, -1.0), 1.0), min(max(t2, -1.0), 1.0)
        moved = max(abs(t1 - ts[1]), abs(t2 - ts[2]))
        ts = [-1.0, t1, t2, 1.0]
        if moved < 1e-13:
            break
    a = q0 - q1 * C / H + q2 * C * C / (H * H)
    b = q1 / H - 2.0 * q2 * C / (H * H)
    c = q2 / (H * H)
    points = (lo, math.sqrt(C + H * ts[1]), math.sqrt(C + H * ts[2]), hi)
    return a, b, c, abs(err), points


@functools.lru_cache(maxsize=None)
def polar_express_schedule(steps: int, lower: float) -> tuple[tuple[float, ...], ...]:
    """Per step k: (a, b, c, lo_k, hi_k, E_k) in float64: p_k is optimal on the design interval
    [lo_k, hi_k] (the current interval with the safety measures of the module docstring) and maps the
    singular values' interval into [1 - E_k, 1 + E_k], which is the next one. Starts at [lower, 1]."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < lower < 1.0:
        raise ValueError(f"lower must be in (0, 1), got {lower}")
    lo, hi = lower, 1.0
    out = []
    for _ in range(steps):
        dhi = hi * (1.0 + PE_MARGIN)
        dlo = min(lo, PE_MAX_RATIO * dhi)
        a, b, c, err, _ = optimal_odd_quintic(dlo, dhi)
        out.append((a, b, c, dlo, dhi, err))
        lo, hi = 1.0 - err, 1.0 + err
    return tuple(out)


def polar_express_coefficients(steps: int, lower: float) -> tuple[tuple[float, float, float], ...]:
    """The (a, b, c) of each step (see ``polar_express_schedule``)."""
    return tuple(s[:3] for s in polar_express_schedule(steps, lower))


# The schedule's default lower bound (measured with SWAN's defaults, see docs/algorithms.md).
PE_LOWER = 1e-2


# ------------------------------------------------------------------------------------ cost model
def polar_express_flops(m: int, n: int, steps: int, gram_side: bool = False) -> float:
    """Matmul FLOPs of ``polar_express`` on one m x n matrix: the direct form (SWAN's) or the Gram side."""
    s, l = min(m, n), max(m, n)
    if gram_side:
        return 4.0 * s * s * l + (8.0 * steps - 6.0) * s**3
    return steps * (4.0 * s * s * l + 2.0 * s**3)


# ------------------------------------------------------------------------------------ the iteration
def _bound(a2: torch.Tensor) -> torch.Tensor:
    """c = ||A^2||_F^(1/2) = (sum lambda^4)^(1/4) >= lambda_max(A) = sigma_max(X)^2, per matrix (B, 1, 1).
    It overshoots lambda_max by at most rank^(1/4), i.e. sigma_max by rank^(1/8) (2.6x at rank 2048,
    ~1.5x on Gaussian or gradient spectra); it is free: the first step needs A^2 anyway."""
    # Callers pass X / ||X||_F, so a non-zero X has bound >= 1 / rank; only a zero X reaches the floor,
    # which keeps the 1 / bound^2.5 of the bf16 step finite.
    return torch.linalg.matrix_norm(a2.float()).sqrt().clamp_min(1e-12)[..., None, None]


def polar_express(
    x: torch.Tensor, steps: int, lower: float, dtype: str = "float32", gram_side: bool = False,
    symmetric: bool = True,
) -> torch.Tensor:
    """The polar factor of each matrix of ``x`` (B, m, n), m <= n, fp32 in, fp32 out, up to a positive
    scale per matrix (callers normalise). ``steps`` Polar Express steps designed for singular values
    in [lower, 1] relative to the spectral bound sigma_max <= (sum lambda^4)^(1/8) of A = X X^T.

    ``dtype="bfloat16"``: bf16 matmuls with fp32 accumulation (see the module docstring).
    ``dtype="float32"``: fp32 throughout. ``gram_side``: the Gram-side form (fp32 only; fewer FLOPs for
    n > 1.5 m, but a rounding floor ~kappa times higher: see the module docstring). ``symmetric``: bf16
    on CUDA forms X X^T and A^2 with ``kernels.sym_gram`` (half their FLOPs) where Triton runs.
    """
    if x.dim() != 3 or x.shape[-2] > x.shape[-1]:
        raise ValueError(f"polar_express wants (B, m, n) with m <= n, got {tuple(x.shape)}")
    x = x.float()
    fro = torch.linalg.matrix_norm(x).clamp_min(TINY)[..., None, None]
    if dtype == "bfloat16":
        if gram_side:
            raise ValueError("gram_side needs dtype='float32'")
        m, n = x.shape[-2:]
        ops = bf16_ops(x.device, symmetric)
        xs = ops.empty_padded(x.shape, x.device)
        torch.div(x, fro, out=xs[..., :m, :n])
        return direct_bf16(ops.load(xs), steps, lower, ops)[..., :m, :n].float()
    if dtype != "float32":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if gram_side:
        return _gram_fp32(x / fro, polar_express_coefficients(steps, lower))
    return _direct_fp32(x / fro, polar_express_coefficients(steps, lower))


def _direct_fp32(x: torch.Tensor, coeffs) -> torch.Tensor:
    """X <- a X + (b A + c A^2) X with A = X X^T, the bound taken from the first A^2."""
    for k, (a, b, c) in enumerate(coeffs):
        gram = torch.bmm(x, x.transpose(-2, -1))
        if k == 0:
            gram2 = torch.bmm(gram, gram)
            bound = _bound(gram2)
            x = x / bound.sqrt()
            poly = (b / bound) * gram + c * (gram2 / bound / bound)
            del gram2
        else:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
        del gram, poly
    return x


def _gram_fp32(x0: torch.Tensor, coeffs) -> torch.Tensor:
    """The same iterates X_k = M_k X_0, computed on the m x m side (module docstring)."""
    gram = torch.bmm(x0, x0.transpose(-2, -1))
    r2 = torch.bmm(gram, gram)
    bound = _bound(r2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    gram = gram / bound
    r2 = (r2 / bound / bound).add_(gram, alpha=2.0 * GRAM_RIDGE).add_(eye, alpha=GRAM_RIDGE**2)  # (A + d I)^2
    gram = gram.add_(eye, alpha=GRAM_RIDGE)
    mat = None
    for k, (a, b, c) in enumerate(coeffs):
        if k == 0:
            r = gram
        else:
            # R = M A M^T, the Gram matrix of the current iterate M X_0, recomputed each step.
            r = torch.bmm(torch.bmm(mat, gram), mat.transpose(-2, -1))
            r2 = torch.bmm(r, r)
        q = torch.add(r * b, r2, alpha=c)
        q.diagonal(dim1=-2, dim2=-1).add_(a)
        del r2, r
        mat = q if mat is None else torch.bmm(q, mat)
        del q
    return torch.bmm(mat, x0)


# ------------------------------------------------------------------------------------ bf16 arithmetic
class _NativeBF16:
    """bf16 tensors and tensor-core matmuls with fp32 accumulation (CUDA). Sides are zero-padded to
    a multiple of PAD; zero rows and columns stay exactly zero through every step. ``symmetric``: the
    products whose result is symmetric (X X^T, and A^2 = A A^T of a symmetric A) compute only the
    blocks on and below the diagonal (``kernels.sym_gram``): per step s^2 l + s^3 of the direct
    form's 4 s^2 l + 2 s^3 multiply-adds x2 become half, i.e. 3 s^2 l + s^3 in all (29-33% fewer FLOPs
    on LLaMA shapes)."""

    pad = PAD

    def __init__(self, symmetric: bool = False):
        self.symmetric = symmetric

    def empty_padded(self, shape, device) -> torch.Tensor:
        *batch, m, n = shape
        return torch.zeros(*batch, m + (-m) % self.pad, n + (-n) % self.pad, dtype=torch.bfloat16, device=device)

    def load(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16)

    def cast_into(self, op, *args) -> torch.Tensor:
        """``op(*args)`` (fp32 arithmetic) written straight into a bf16 tensor: one pass, one rounding."""
        out = torch.empty(args[0].shape, dtype=torch.bfloat16, device=args[0].device)
        return op(*args, out=out)

    def mm(self, a, b):
        return torch.bmm(a, b)

    def mm_fp32(self, a, b):
        return matmul_fp32(a, b)

    def addmm(self, c, a, b, beta: float, alpha: float = 1.0):
        """beta * c + alpha * (a @ b), combined in fp32 by the matmul epilogue, rounded once to bf16."""
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)

    def gram(self, x):
        """X X^T (bf16)."""
        return kernels.sym_gram(x) if self.symmetric else self.mm(x, x.transpose(-2, -1))

    def square_fp32(self, a):
        """A A for a symmetric A, in fp32."""
        return kernels.sym_gram(a, out_dtype=torch.float32) if self.symmetric else self.mm_fp32(a, a)

    def square_add(self, a, beta: float, alpha: float):
        """alpha A A + beta A for a symmetric A (bf16), combined in fp32 and rounded once."""
        if self.symmetric:
            return kernels.sym_gram(a, alpha=alpha, beta=beta, y=a)
        return self.addmm(a, a, a, beta=beta, alpha=alpha)


class _EmulatedBF16(_NativeBF16):
    """The same arithmetic on fp32 tensors that hold bf16 values (CPU and other devices): operands are
    bf16-exact, their products are exact in fp32 (8 x 8 mantissa bits) and accumulate in fp32, and
    every result is rounded to bf16 - what the tensor cores do, up to the order of the fp32 sums."""

    pad = 1

    def load(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    def cast_into(self, op, *args) -> torch.Tensor:
        return self.cast(op(*args))

    def mm(self, a, b):
        return self.cast(torch.bmm(a, b))

    def mm_fp32(self, a, b):
        return torch.bmm(a, b)

    def addmm(self, c, a, b, beta: float, alpha: float = 1.0):
        return self.cast(torch.baddbmm(c, a, b, beta=beta, alpha=alpha))

    def gram(self, x):
        return self.cast(kernels.sym_gram(x)) if self.symmetric else super().gram(x)

    def square_fp32(self, a):
        return kernels.sym_gram(a) if self.symmetric else super().square_fp32(a)

    def square_add(self, a, beta: float, alpha: float):
        return self.cast(kernels.sym_gram(a, alpha=alpha, beta=beta, y=a)) if self.symmetric else super().square_add(
            a, beta, alpha)


def bf16_ops(device: torch.device, symmetric: bool = True) -> _NativeBF16:
    """The bf16 arithmetic for ``device``: tensor cores on CUDA (with the symmetric Triton products where
    ``symmetric`` and Triton runs), the emulation elsewhere."""
    if device.type == "cuda":
        return _NativeBF16(symmetric and kernels.available(device))
    return _EmulatedBF16(symmetric and kernels.available(device))  # the kernel runs here under the interpreter


def direct_bf16(xs: torch.Tensor, steps: int, lower: float, ops: _NativeBF16, right: bool = False) -> torch.Tensor:
    """The direct iteration in bf16 on ``xs`` (B, m, n) holding bf16 values with sigma_max <= 1 (e.g.
    divided by its Frobenius norm). Returns the last iterate (bf16 values, padded as given).
    ``right``: for m > n, the same polynomial applied from the right, A = X^T X (n x n) and
    X <- a X + X B: no transposed copy of a tall matrix is ever made.

    Step 1 folds the per-matrix spectral scale into a small factor: with s the bound,
    p(X / sqrt s) = P X, P = (a I + (b / s) A + (c / s^2) A^2) / sqrt s, formed in fp32 from an
    fp32-output A^2 in two passes and rounded once (no pass over the m x n iterate to rescale it).
    Later steps are Muon's form: A = X X^T; B = b A + c A A; X = a X + B X, each combination done in
    the fp32 matmul epilogue and rounded once to bf16."""
    for k, (a, b, c) in enumerate(polar_express_coefficients(steps, lower)):
        gram = ops.gram(xs.transpose(-2, -1) if right else xs)
        if k == 0:
            gram2 = ops.square_fp32(gram)
            bound = _bound(gram2) * BF16_BOUND_SAFETY
            root = bound.sqrt()
            # P = (c / bound^2) A^2 + a I, then + (b / bound) A; all over sqrt(bound): two passes
            gram2.mul_(c / bound / bound / root)
            gram2.diagonal(dim1=-2, dim2=-1).add_((a / root)[..., 0])
            poly = ops.cast_into(torch.addcmul, gram2, gram, b / bound / root)
            del gram, gram2
            xs = ops.mm(xs, poly) if right else ops.mm(poly, xs)
        else:
            poly = ops.square_add(gram, beta=b, alpha=c)
            del gram
            xs = ops.addmm(xs, xs, poly, beta=a) if right else ops.addmm(xs, poly, xs, beta=a)
        del poly
    return xs
