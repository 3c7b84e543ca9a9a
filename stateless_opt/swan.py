"""SWAN (Ma et al., arXiv 2412.13148): GradNorm then GradWhitening of each 2-D gradient, no state.

The rule for one weight is ``swan_update`` below, in plain torch: view the gradient as an (m x n)
matrix oriented so that m <= n; GradNorm standardises every row; GradWhitening replaces the result by
its orthogonal polar factor (G G^T)^(-1/2) G = U V^T (on the range: GradNorm's centring leaves every
square matrix rank-deficient); the update is scaled to RMS 1 and W <- (1 - lr*wd) W - lr * update.

The rest of the file computes the same thing batched and sharded:

* ``swan_direction``: the direction for a batch of whole same-shape matrices (B, m, n), with the polar
  factor by a Polar Express schedule (default; ``polar_express.py``), coupled Newton-Schulz on the Gram
  matrix, or an exact fp64 eigendecomposition;
* ``whitening_flops``: the cost model owners are balanced by (``owner_compute.py``);
* ``SWAN``: whitening needs whole matrices, so each matrix goes to one owner rank, which computes the
  direction for all its matrices batched by shape and sends every rank back its piece.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator

from .config import MatrixRuleConfig
from .optimizer import MatrixRuleOptimizer
from .owner_compute import gather_compute_scatter, owners_and_chunks
from .polar_express import PE_LOWER, bf16_ops, direct_bf16, polar_express, polar_express_flops
from .precision import FP32_TINY, TINY, matmul_precision


# ====================================================================================== the rule
def swan_update(grad: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SWAN's update direction for one gradient of >= 2 dims, in float64 (the paper's default axis)."""
    g = grad.double().reshape(grad.shape[0], -1)
    transposed = g.shape[0] > g.shape[1]
    x = g.T if transposed else g  # m <= n
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, correction=0, keepdim=True) + eps)  # GradNorm
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # GradWhitening: U V^T on the range
    keep = s > 1e-10 * s.max()
    d = u[:, keep] @ vh[keep]
    d = d * (math.sqrt(d.numel()) / torch.linalg.matrix_norm(d).clamp_min(TINY))  # RMS 1
    return (d.T if transposed else d).reshape(grad.shape)


# ====================================================================================== batched
# Ridge added to the normalised Gram matrix (eigenvalues <= 1) before Newton-Schulz.
NS_RIDGE = 1e-6

# Iterations when ``ns_steps`` is left at None (measured, see docs/algorithms.md). bf16 Polar Express:
# 5 steps from PE_LOWER, the cheapest schedule that kept every non-square matrix we tried within the 2%
# bar: 60 random Gaussian shapes (worst 1.1%) and real LLaMA gradients at the 60m/350m/1.3b widths
# (worst 0.98%). 4 steps (from 1.5e-2, best for 4) also hold the bar on Gaussians (worst 0.86%) but
# reach 7-8% on 1.3b gate/up gradients (GradNorm'd condition number ~150), more than Newton-Schulz's
# 5%. fp32: 7 steps, converged to fp32 accuracy (~1e-6) on those. Newton-Schulz: 12.
DEFAULT_STEPS = {
    ("polar_express", "bfloat16"): 5,
    ("polar_express", "float32"): 7,
    ("newton_schulz", "float32"): 12,
}


def whitening_plan(
    method: str, ns_steps: int | None, whitening_dtype: str, device: torch.device
) -> tuple[int, str]:
    """(iterations, matmul dtype) for a SWAN group: ``whitening_dtype="auto"`` is bfloat16 for Polar
    Express on CUDA and float32 elsewhere (``precision.matmul_precision``); Newton-Schulz and eigh always
    run in fp32; ``ns_steps=None`` takes ``DEFAULT_STEPS``."""
    if method == "polar_express":
        dtype = matmul_precision(whitening_dtype, device)
    else:
        if whitening_dtype == "bfloat16":
            raise ValueError(f"whitening_dtype='bfloat16' needs whitening='polar_express', got {method!r}")
        dtype = "float32"
    if ns_steps is None:
        ns_steps = DEFAULT_STEPS.get((method, dtype), 0)  # eigh: no iterations
    return ns_steps, dtype


def whitening_flops(m: int, n: int, ns_steps: int, method: str = "polar_express") -> float:
    """Matmul FLOPs of SWAN's whitening of one m x n matrix, with s <= l the sides:

    * polar_express (``ns_steps`` = K): ``polar_express_flops``, K (4 s^2 l + 2 s^3), bf16 or fp32 alike;
    * newton_schulz: Gram (2 s^2 l), the initial scale (2 x 2 s^3), K coupled iterations (3 x 2 s^3
      each) and Z G (2 s^2 l);
    * eigh: Gram, Z G and ~ 10 s^3 for the fp64 eigendecomposition and its reassembly (and slow FLOPs).
    """
    if method == "polar_express":
        return polar_express_flops(m, n, ns_steps)
    s, l = min(m, n), max(m, n)
    if method == "eigh":
        return 4.0 * s * s * l + 10.0 * s**3
    return 4.0 * s * s * l + (4.0 + 6.0 * ns_steps) * s**3


def whitening_temp_bytes(m: int, n: int) -> int:
    """Temporaries of whitening one m x n matrix (stacked copy, centred copy, Gram-sized iterates), as
    for fp32 Newton-Schulz: what ``whiten_batch_mb`` bounds."""
    return 4 * (4 * m * n + 10 * min(m, n) ** 2)


def orient(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The (..., m, n) view with m <= n (the Gram matrix is the small side), and whether we transposed."""
    if x.shape[-2] > x.shape[-1]:
        return x.transpose(-2, -1), True
    return x, False


def gradnorm(x: torch.Tensor, eps, axis: int = -1) -> torch.Tensor:
    """GradNorm along ``axis`` (-1: rows, -2: columns): (x - mean) / (population std + eps). ``eps`` may be
    a tensor (one per matrix, from ``unit_scale``); a zero-spread row divides by at least fp32's
    smallest normal number, so it gives 0 even where eps underflowed. The statistics come from one
    Welford pass (``var_mean``), whose mean of a constant row is exact: such a row becomes exactly 0, as
    in float64, not the rounding noise of an fp32 sum standardised to full size."""
    var, mean = torch.var_mean(x, dim=axis, correction=0, keepdim=True)
    return (x - mean).div_(var.sqrt_().add_(eps).clamp_min_(FP32_TINY))


def unit_scale(x: torch.Tensor) -> torch.Tensor:
    """Per matrix of x (..., m, n), the power of two 2^k that brings its largest entry into [0.5, 1).
    SWAN's direction does not change when x and eps are both multiplied by it (exactly: a power of
    two), and the scaled squares of GradNorm and the whitening neither overflow (|g| > 1.8e19) nor
    underflow (|g| < 1e-19) in fp32."""
    peak = x.abs().amax(dim=(-2, -1), keepdim=True)
    _, e = torch.frexp(peak)
    return torch.ldexp(torch.ones_like(peak), (-e).clamp_max(126))


def inverse_sqrt_newton_schulz(gram: torch.Tensor, steps: int) -> torch.Tensor:
    """Z ~ (A / c)^(-1/2) for symmetric PSD ``gram`` A (B, m, m), by the coupled Newton-Schulz
    iteration Y0 = A/c, Z0 = I;  T = (3I - Z Y) / 2;  Y <- Y T;  Z <- T Z.

    The scalar c is only a scale (the caller rescales the result to RMS 1); what matters is that
    every eigenvalue of A/c lies in (0, 1] and as close to 1 as possible, since a small eigenvalue x
    needs ~log(1/x)/log(2.25) iterations to converge. We use the safe upper bound
    c = (sum lambda^8)^(1/8) = ||A^4||_F^(1/4) >= lambda_max, which overshoots lambda_max by at most
    rank^(1/8) (2.6x at rank 2048) instead of the Frobenius norm's sqrt(rank) (45x).
    """
    m = gram.shape[-1]
    fro = torch.linalg.matrix_norm(gram).clamp_min(TINY)[..., None, None]
    y = gram / fro  # eigenvalues <= 1, so the powers below cannot overflow
    a2 = torch.matmul(y, y)
    a4 = torch.matmul(a2, a2)
    del a2
    # (clamped after the root: TINY ** 2 is 0 in fp32, and a zero Gram would divide 0 by 0)
    spectral_bound = torch.linalg.matrix_norm(a4).pow(0.25).clamp_min(TINY)[..., None, None]
    del a4
    # A tiny ridge keeps every eigenvalue positive: fp32 rounding gives the null direction of a
    # rank-deficient Gram (square weights after centring) a slightly negative eigenvalue, which the
    # iteration would amplify 2.25x per step into NaN after ~20 steps. Its effect on the polar factor
    # is ~1e-4 relative at most (the null component of G is rounding noise).
    y = y / spectral_bound + NS_RIDGE * torch.eye(m, dtype=gram.dtype, device=gram.device)
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device).expand_as(gram)
    z = eye.clone()
    for _ in range(steps):
        t = (3.0 * eye - torch.matmul(z, y)) * 0.5
        y = torch.matmul(y, t)
        z = torch.matmul(t, z)
    return z


def inverse_sqrt_eigh(gram: torch.Tensor, rel_cutoff: float = 1e-10) -> torch.Tensor:
    """(A)^(-1/2) on the range of A via an fp64 eigendecomposition (eigenvalues below
    ``rel_cutoff * lambda_max`` are treated as zero): the exact reference, slow on GPUs."""
    a = gram.double()
    vals, vecs = torch.linalg.eigh(a)
    cutoff = vals.amax(dim=-1, keepdim=True).clamp_min(0) * rel_cutoff
    inv = torch.where(vals > cutoff, vals.clamp_min(TINY).rsqrt(), torch.zeros_like(vals))
    return ((vecs * inv.unsqueeze(-2)) @ vecs.transpose(-2, -1)).to(gram.dtype)


def rms_normalize_(x: torch.Tensor) -> torch.Tensor:
    """Scale each matrix of (B, m, n) to RMS 1 (a zero matrix stays zero)."""
    m, n = x.shape[-2:]
    norm = torch.linalg.matrix_norm(x).clamp_min(TINY)[..., None, None]
    return x.mul_(math.sqrt(m * n) / norm)


def swan_direction(
    g: torch.Tensor,
    *,
    eps: float,
    steps: int,
    method: str = "newton_schulz",
    gradnorm_axis: str = "oriented",
    lower: float = PE_LOWER,
    dtype: str = "float32",
    symmetric: bool = True,
    in_place: bool = False,
) -> torch.Tensor:
    """SWAN's update direction for whole matrices g (B, m, n) (or a list of B same-shape matrices), fp32
    in, fp32 out, RMS 1 each: the batched ``swan_update``. Each matrix is first scaled by ``unit_scale``
    (eps with it); ``in_place``: an fp32 batch ``g`` may be scaled where it is (the caller's stacked
    copy); a list is never written (its matrices may be the gradients themselves).

    1. orient so that m <= n; 2. GradNorm; 3. whiten: (G G^T)^(-1/2) G, the polar factor U V^T
    (on the range for rank-deficient G, e.g. square weights after centring); 4. rescale to RMS 1.
    ``gradnorm_axis="stored_rows"`` standardises the rows as stored, before orienting.
    ``method``: "polar_express" (``steps`` Polar Express steps for singular values down to ``lower``,
    matmuls in ``dtype``), "newton_schulz" (``steps`` coupled iterations, fp32) or "eigh" (exact, fp64).
    ``symmetric``: bf16 Polar Express on CUDA computes its symmetric products (X X^T, A^2) with the
    Triton kernel that forms only half of each (``polar_express.bf16_ops``).
    """
    if method not in ("polar_express", "newton_schulz", "eigh"):
        raise ValueError(f"unknown whitening method {method!r}")
    if method == "polar_express" and dtype == "bfloat16":  # scales each matrix as it reads it (no stacked copy)
        return _polar_express_bf16(g, eps=eps, steps=steps, lower=lower, gradnorm_axis=gradnorm_axis,
                                   symmetric=symmetric, in_place=in_place)
    stacked = isinstance(g, (list, tuple))
    x = torch.stack(list(g)).float() if stacked else g.float()
    scale = unit_scale(x)
    x = x.mul_(scale) if (x is not g or in_place) else x * scale  # a copy of ours, or the caller's to scale
    eps = eps * scale
    if method == "polar_express":
        return _polar_express_direction(x, eps=eps, steps=steps, lower=lower, dtype=dtype, gradnorm_axis=gradnorm_axis,
                                        symmetric=symmetric)
    if gradnorm_axis == "stored_rows":
        x = gradnorm(x, eps)
        x, transposed = orient(x)
    else:
        x, transposed = orient(x)
        x = gradnorm(x, eps)
    x = x.mul_(unit_scale(x))  # GradNorm's output is eps-small for a tiny gradient; whitening ignores scale
    if method == "eigh":
        # All in fp64: an fp32 Gram's rounding (~1e-7 lambda_max) sits above the eigenvalue cutoff, so
        # the null direction of a rank-deficient G~ (every square weight after centring) would be
        # inverted from noise (up to ~1% error); in fp64 it is cut and the result is the exact U_r V_r^T.
        # A device-decided step whitens every matrix, also one whose gradient holds a NaN/Inf (its write is
        # masked): eigh raises on non-finite input (the CPU's LAPACK), so those entries become 0 first.
        x64 = torch.nan_to_num(x.double(), nan=0.0, posinf=0.0, neginf=0.0)
        d = torch.matmul(inverse_sqrt_eigh(torch.matmul(x64, x64.transpose(-2, -1))), x64).float()
        del x64
    else:
        gram = torch.matmul(x, x.transpose(-2, -1))
        z = inverse_sqrt_newton_schulz(gram, steps)
        del gram
        d = torch.matmul(z, x)
    if transposed:
        d = d.transpose(-2, -1)
    return rms_normalize_(d.contiguous())


def _polar_express_direction(
    g, *, eps: float, steps: int, lower: float, dtype: str, gradnorm_axis: str = "oriented", symmetric: bool = True,
) -> torch.Tensor:
    """``swan_direction`` with Polar Express whitening, fp32 out, RMS 1; ``g`` a batch (B, m, n) or a
    list of same-shape matrices (bf16: read where they are, no stacked copy).

    GradNorm, whitening, and then two exact steps on the output: it is re-centred along the axis
    GradNorm centred (the exact polar factor on the range has zero means there: G~ 1 = 0 puts 1 in
    its null space, so this orthogonal projection can only reduce the error; it removes the null
    direction that rounding noise and the odd polynomials' growth near 0 would otherwise turn on, e.g.
    for square weights), and scaled to RMS 1. In bf16 the statistics are taken with fused reductions
    (mean and variance in one pass, the Frobenius norm of G~ from them) and G~ / ||G~||_F is written
    straight into the padded bf16 buffer, so the fp32 matrix is read twice and the result written once.
    bf16 works in the stored layout: a tall matrix (m > n) is whitened from the right (X X^T on the
    small side is X^T X there, the polynomial multiplies X on the right), so no pass reads or writes a
    transposed matrix (measured on an H100: no net change of the 1.3B step, see docs/design.md).
    """
    if dtype == "bfloat16":
        return _polar_express_bf16(g, eps=eps, steps=steps, lower=lower, gradnorm_axis=gradnorm_axis,
                                   symmetric=symmetric)
    if dtype != "float32":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    x = torch.stack(list(g)).float() if isinstance(g, (list, tuple)) else g.float()
    xo, transposed = orient(x)
    # The axis GradNorm standardises, in the oriented (m <= n) view: -1 = rows, -2 = columns.
    axis = -2 if (gradnorm_axis == "stored_rows" and transposed) else -1
    m, n = xo.shape[-2:]
    xn = gradnorm(xo, eps, axis)
    d = polar_express(xn.mul_(unit_scale(xn)), steps, lower, "float32")  # fp32: cuBLAS; whitening ignores the scale
    out = torch.empty(xo.shape[:-2] + ((n, m) if transposed else (m, n)), dtype=torch.float32, device=x.device)
    _recentre_into(d, axis, out.transpose(-2, -1) if transposed else out)
    return out


def _recentre_into(d: torch.Tensor, axis: int, out: torch.Tensor) -> None:
    """Re-centre along GradNorm's axis and scale to RMS 1, written into ``out`` (fp32): the statistics in
    one fused pass (per-row Welford, accurate where a flat fp32 sum over millions of entries is not),
    one write."""
    m, n = d.shape[-2:]
    var, mean = torch.var_mean(d, dim=axis, correction=0, keepdim=True)
    norm = var.float().sum(dim=(-2, -1), keepdim=True).mul_(d.shape[axis]).sqrt_()
    scale = math.sqrt(m * n) / norm.clamp_min(TINY)
    torch.addcmul(-mean.float() * scale, d, scale, out=out)


def _gradnorm_into(g: torch.Tensor, out: torch.Tensor, axis: int, eps: float, in_place: bool = False) -> None:
    """GradNorm of ``g`` along ``axis``, divided by its Frobenius norm, written into ``out`` (bf16): ``g``
    scaled by ``unit_scale`` first (eps with it: the squares of the statistics stay in fp32's range; in
    place only where ``g`` is a copy of ours or ``in_place``), mean and variance in one Welford pass,
    ||G~||_F from them, one write."""
    x = g.float()
    unit = unit_scale(x)
    x = x.mul_(unit) if (x is not g or in_place) else x * unit
    eps = eps * unit
    count = x.shape[axis]
    var, mean = torch.var_mean(x, dim=axis, correction=0, keepdim=True)
    sd = var.sqrt()
    scale = torch.where(var > 0, (sd + eps).reciprocal_(), torch.zeros_like(sd))  # zero-spread rows: exactly 0
    # ||G~||_F^2 = count * sum over rows of t^2, t = sd * scale (each row's RMS after GradNorm, < 1), taken
    # relative to the largest t (where eps dominates, every t is eps-small and t^2 underflows); no pass over G
    t = sd * scale
    t_max = t.amax(dim=(-2, -1), keepdim=True).clamp_min_(FP32_TINY)
    fro = (t / t_max).square_().sum(dim=(-2, -1), keepdim=True).mul_(count).sqrt_()
    scale = torch.where(fro > 0, scale / t_max / fro.clamp_min(TINY), torch.zeros_like(scale))
    torch.addcmul(-mean * scale, x, scale, out=out)  # (x - mean) * scale, in one pass


def _polar_express_bf16(g, *, eps: float, steps: int, lower: float, gradnorm_axis: str, symmetric: bool,
                        in_place: bool = False):
    mats = list(g) if isinstance(g, (list, tuple)) else None
    first = mats[0] if mats is not None else g[0]
    rows, cols = first.shape[-2:]
    batch = len(mats) if mats is not None else g.shape[0]
    tall = rows > cols
    # GradNorm's axis in the stored layout: the oriented rows are a tall matrix's stored columns
    axis = -2 if (tall and gradnorm_axis == "oriented") else -1
    ops = bf16_ops(first.device, symmetric)
    xs = ops.empty_padded((batch, rows, cols), first.device)
    if mats is None:
        _gradnorm_into(g, xs[..., :rows, :cols], axis, eps, in_place)
    else:
        for k, mat in enumerate(mats):  # each gradient read where it is (and never written): no stacked copy
            _gradnorm_into(mat, xs[k, :rows, :cols], axis, eps)
    d = direct_bf16(ops.load(xs), steps, lower, ops, right=tall)[..., :rows, :cols]
    out = torch.empty(batch, rows, cols, dtype=torch.float32, device=first.device)
    _recentre_into(d, axis, out)
    return out


# ====================================================================================== the optimizer
class SWANConfig(MatrixRuleConfig):
    """SWAN (arXiv 2412.13148): GradNorm then GradWhitening, no state."""

    whitening: Literal["polar_express", "newton_schulz", "eigh"] = Field(
        "polar_express",
        description="how the polar factor (G G^T)^-1/2 G is computed: a Polar Express schedule of optimal "
        "odd quintics (default), coupled Newton-Schulz on the Gram matrix (stateless_opt 0.1), or an exact "
        "fp64 eigh",
    )
    ns_steps: int | None = Field(
        None,
        ge=1,
        le=100,
        description="iterations of the chosen whitening method (ignored by eigh); None: the method's default "
        "(polar_express: 5 with bf16 matmuls, 7 with fp32; newton_schulz: 12)",
    )
    whitening_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="matmul precision of polar_express: bfloat16 operands/results with fp32 accumulation "
        "(statistics and output fp32) or float32; auto = bfloat16 on CUDA, float32 elsewhere. "
        "newton_schulz and eigh always run in fp32/fp64",
    )
    pe_lower_bound: float = Field(
        PE_LOWER,
        ge=1e-7,
        le=0.5,
        description="polar_express: smallest singular value, relative to the spectral upper bound, that the "
        "schedule is designed to converge (smaller: more robust to ill-conditioning, slower convergence)",
    )
    gradnorm_axis: Literal["oriented", "stored_rows"] = Field(
        "oriented",
        description="GradNorm standardises the rows of the oriented matrix (m <= n, the paper's setting) "
        "or the rows as stored",
    )
    chunk_mb: float = Field(512.0, gt=0.0, description="per-rank bound on gathered matrices of one chunk (MiB)")
    fused: bool = Field(
        True,
        description="bf16 Polar Express on CUDA: X X^T and A^2 by a Triton kernel that computes only the blocks on "
        "and below the diagonal (half their FLOPs), where Triton runs; False: cuBLAS for every product",
    )
    whiten_batch_mb: float = Field(
        1024.0,
        gt=0.0,
        description="bound on the temporaries of one batched whitening call (MiB, estimated as for fp32 "
        "Newton-Schulz): larger batches run the bf16 matmuls more efficiently at the cost of that much more "
        "peak memory (measured step times in docs/design.md)",
    )

    @model_validator(mode="after")
    def _bf16_needs_polar_express(self) -> "SWANConfig":
        if self.whitening_dtype == "bfloat16" and self.whitening != "polar_express":
            raise ValueError(f"whitening_dtype='bfloat16' needs whitening='polar_express', got {self.whitening!r}")
        return self


class SWAN(MatrixRuleOptimizer):
    """SWAN: ``SWAN(params, lr=1e-3, ...)``; hyper-parameters in ``SWANConfig``.

    Whitening (``whitening``): a Polar Express schedule (default; ``ns_steps`` steps, 5 with bf16
    matmuls on CUDA, 7 in fp32 elsewhere, ``whitening_dtype``), coupled Newton-Schulz from a spectral
    upper-bound initial scale (12 steps), or an exact fp64 eigendecomposition ("eigh"); see
    docs/algorithms.md. A plain parameter list is split by shape (>= 2-D: matrix rule; 0-/1-D:
    fallback); ``stateless_opt.param_groups(model)`` also sends embeddings and the LM head to the
    fallback, as the paper does. Recipe: lr about 0.05 x the fallback's Adam LR (``fallback_lr_ratio=20``).
    """

    config_cls = SWANConfig
    run_by = "holders"  # whitening needs whole matrices only: one owner assignment over all of them

    def __init__(self, params, lr: float = 1e-3, **hyperparameters):
        super().__init__(params, lr, **hyperparameters)

    def _matrix_rule_fits(self, m: int, n: int, group: dict) -> bool:
        """GradNorm centres along one axis (the longer one, or the stored rows): with one element there
        every entry becomes 0 and the weight would never move (a 1 x 1, or N x 1 with "stored_rows"); such
        a weight takes the fallback."""
        return (n if group["gradnorm_axis"] == "stored_rows" else max(m, n)) > 1

    def _matrix_update(self, group, frags, comm, lr) -> None:
        method = group["whitening"]
        device = frags[0].grad.device if frags else torch.device("cpu")
        steps, dtype = whitening_plan(method, group["ns_steps"], group["whitening_dtype"], device)
        owners, chunk_list = owners_and_chunks(
            frags, comm.world, lambda f: whitening_flops(f.m, f.n, steps, method), int(group["chunk_mb"] * 2**20),
        )
        direction = partial(
            swan_direction, eps=group["eps"], steps=steps, method=method,
            gradnorm_axis=group["gradnorm_axis"], lower=group["pe_lower_bound"], dtype=dtype, symmetric=group["fused"],
        )
        for idx in chunk_list:
            gather_compute_scatter(
                [frags[i] for i in idx], [owners[i] for i in idx], comm, direction,
                lambda fs, us: self._apply_fragments(group, fs, us, lr),
                temp_bytes=whitening_temp_bytes, temp_budget_bytes=int(group["whiten_batch_mb"] * 2**20),
                stacked=False,  # swan_direction reads the matrices where they are
            )
