"""The math, as pure functions on local tensors: no param groups, no ranks, no DTensors.

Everything here runs in fp32 (or fp64 where stated) on batched inputs ``(B, m, n)``: the callers
stack same-shaped matrices so one kernel launch serves many weights.
"""

from __future__ import annotations

import math

import torch

from .polar import PE_LOWER, swan_polar_express

# Ridge added to the normalised Gram matrix (eigenvalues <= 1) before Newton-Schulz.
NS_RIDGE = 1e-6

# Smallest norm we divide by when a whole matrix is zero: keeps 0 * (1 / floor) finite in fp32.
TINY = 1e-30


def orient(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Return the (…, m, n) view with m <= n (the Gram matrix is the small side) and whether we transposed."""
    if x.shape[-2] > x.shape[-1]:
        return x.transpose(-2, -1), True
    return x, False


def gradnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """SWAN's GradNorm: standardise each row over its n entries (population std, 1/n), eps-guarded."""
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    std = centred.square().mean(dim=-1, keepdim=True).sqrt_()
    return centred.div_(std.add_(eps))


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
    spectral_bound = torch.linalg.matrix_norm(a4).clamp_min(TINY ** 2).pow(0.25)[..., None, None]
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
) -> torch.Tensor:
    """SWAN's update direction for whole matrices g (B, m, n), fp32 in, fp32 out, RMS 1 each.

    1. orient so that m <= n; 2. GradNorm; 3. whiten: (G G^T)^(-1/2) G, the polar factor U V^T
    (on the range for rank-deficient G, e.g. square weights after centring); 4. rescale to RMS 1.
    ``gradnorm_axis="stored_rows"`` standardises the rows as stored, before orienting.
    ``method``: "polar_express" (``steps`` Polar Express steps for singular values down to ``lower``,
    matmuls in ``dtype``; see polar.py), "newton_schulz" (``steps`` coupled iterations, fp32) or
    "eigh" (exact, fp64).
    """
    if method == "polar_express":
        return swan_polar_express(g, eps=eps, steps=steps, lower=lower, dtype=dtype, gradnorm_axis=gradnorm_axis)
    if method not in ("newton_schulz", "eigh"):
        raise ValueError(f"unknown whitening method {method!r}")
    x = g.float()
    if gradnorm_axis == "stored_rows":
        x = gradnorm(x, eps)
        x, transposed = orient(x)
    else:
        x, transposed = orient(x)
        x = gradnorm(x, eps)
    if method == "eigh":
        # All in fp64: an fp32 Gram's rounding (~1e-7 lambda_max) sits above the eigenvalue cutoff, so
        # the null direction of a rank-deficient G~ (every square weight after centring) would be
        # inverted from noise (up to ~1% error); in fp64 it is cut and the result is the exact U_r V_r^T.
        x64 = x.double()
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


def floor_norms(norms: torch.Tensor, matrix_of: torch.Tensor, fro: torch.Tensor, count: torch.Tensor, eps: float):
    """Clamp row (or column) norms at a floor relative to their matrix's scale, eps * ||X||_F / sqrt(count):
    a 1e-30 row in a matrix of norm 1 must not be blown up to norm sqrt(n). A zero matrix uses TINY."""
    floor = (eps * fro / count.sqrt()).clamp_min(TINY)
    return torch.maximum(norms, floor[matrix_of])


def gsnr(total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """SGD-SaI's g-SNR = ||g||_2 / (std(g) + eps) from per-tensor sums (float64 in), std unbiased (N-1)
    as in the official code. A one-element tensor has no spread to measure: its scale is 1."""
    norm = total_sq.clamp_min(0).sqrt()
    var = (total_sq - total * total / count) / (count - 1).clamp_min(1)
    std = var.clamp_min(0).sqrt()
    snr = norm / (std + eps)
    return torch.where(count > 1, snr, torch.ones_like(snr)).float()


def stochastic_round_(dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    """Write fp32 ``value`` into bf16 ``dst`` with stochastic rounding: E[dst] = value, so updates far
    below half a bf16 ulp still move the weight on average (plain rounding would drop them)."""
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # clear the 16 bits bf16 drops
    dst.copy_(rounded.view(torch.float32))
