"""Float64 reference implementations, written from docs/algorithms.md and nothing else.

Deliberately naive: one tensor at a time, no batching, no fragments, no communication, and no import
of ``stateless_opt``. Every function takes and returns float64 tensors; a weight of ndim >= 2 is the
matrix (shape[0], prod(shape[1:])) ("conv weights viewed as (out, in*kh*kw)").
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
TINY = 1e-30  # the smallest norm divided by (a zero matrix stays zero)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """(shape[0], prod(rest)) view of a >= 2-D tensor, in float64."""
    return t.detach().to(F64).reshape(t.shape[0], -1)


# --------------------------------------------------------------------------------------- SWAN
def gradnorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row standardisation: (x - row mean) / (row population std + eps)."""
    mean = x.mean(dim=1, keepdim=True)
    centred = x - mean
    std = centred.square().mean(dim=1, keepdim=True).sqrt()
    return centred / (std + eps)


def polar_on_range(x: torch.Tensor, rel_cutoff: float = 1e-10) -> torch.Tensor:
    """U_r V_r^T over the singular values > rel_cutoff * sigma_max (the orthogonal polar factor when
    x has full rank): (x x^T)^(-1/2) x on the range of x."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = s > rel_cutoff * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
    return u[:, keep] @ vh[keep, :]


def rms_one(x: torch.Tensor) -> torch.Tensor:
    """Scale to RMS 1: x * sqrt(mn) / ||x||_F (a zero matrix stays zero)."""
    norm = torch.linalg.matrix_norm(x)
    return x * (math.sqrt(x.numel()) / max(norm.item(), TINY))


def swan_update(g: torch.Tensor, *, eps: float = 1e-8, gradnorm_axis: str = "oriented") -> torch.Tensor:
    """SWAN's direction for one >= 2-D gradient, shaped like ``g``, float64.

    1. orient (m <= n) — ``gradnorm_axis="stored_rows"`` standardises the stored rows first instead;
    2. GradNorm; 3. exact polar factor on the range (SVD); 4. RMS 1."""
    x = as_matrix(g)
    if gradnorm_axis == "stored_rows":
        x = gradnorm(x, eps)
        transposed = x.shape[0] > x.shape[1]
        if transposed:
            x = x.T
    else:
        transposed = x.shape[0] > x.shape[1]
        if transposed:
            x = x.T
        x = gradnorm(x, eps)
    d = rms_one(polar_on_range(x))
    if transposed:
        d = d.T
    return d.reshape(g.shape)


# --------------------------------------------------------------------------------------- SinkGD
def _floored(norms: torch.Tensor, x: torch.Tensor, count: int, eps: float) -> torch.Tensor:
    """Row (column) norms clamped at eps * ||X||_F / sqrt(count): a floor relative to the matrix scale."""
    floor = max(eps * torch.linalg.matrix_norm(x).item() / math.sqrt(count), TINY)
    return norms.clamp_min(floor)


def normalize_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Every row to l2 norm sqrt(n) (row RMS 1)."""
    m, n = x.shape
    return x * (math.sqrt(n) / _floored(x.norm(dim=1), x, m, eps))[:, None]


def normalize_cols(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Every column to l2 norm sqrt(m)."""
    m, n = x.shape
    return x * (math.sqrt(m) / _floored(x.norm(dim=0), x, n, eps))[None, :]


def sinkgd_update(g: torch.Tensor, *, iterations: int = 5, eps: float = 1e-8, rows_first: bool = True) -> torch.Tensor:
    """SinkGD's direction: L rounds of (rows to norm sqrt(n), then columns to norm sqrt(m)) on the weight
    as stored. ``rows_first=False`` is the wrong order, for tests that the order matters."""
    x = as_matrix(g)
    m, n = x.shape
    r, c = x.new_ones(m), x.new_ones(n)
    # X = diag(r) G diag(c); each axis's norms are taken under the other axis's scale only (before its
    # own), so a row (column) floored once stays floored instead of growing ~1/eps a round
    for i in range(2 * iterations):
        if (i % 2 == 0) == rows_first:
            y = x * c[None, :]
            r = math.sqrt(n) / _floored(y.norm(dim=1), y, m, eps)
        else:
            y = r[:, None] * x
            c = math.sqrt(m) / _floored(y.norm(dim=0), y, n, eps)
    return (r[:, None] * x * c[None, :]).reshape(g.shape)


# --------------------------------------------------------------------------------------- fallbacks
def stateless_fallback_update(g: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """RMS-normalised SGD: each row of a >= 2-D weight to RMS 1; a 0-/1-D tensor as one row."""
    x = as_matrix(g) if g.dim() >= 2 else g.detach().to(F64).reshape(1, -1)
    return normalize_rows(x, eps).reshape(g.shape)


def rowclip_fallback_update(g: torch.Tensor) -> torch.Tensor:
    """Each row over max(its RMS, the whole tensor's RMS): rows above the tensor's RMS to RMS 1, the
    others scaled by the tensor's RMS alone; a 0-/1-D tensor as one row (RMS 1)."""
    x = as_matrix(g) if g.dim() >= 2 else g.detach().to(F64).reshape(1, -1)
    rows = x.square().mean(dim=1, keepdim=True).sqrt()
    return (x / torch.maximum(rows, x.square().mean().sqrt())).reshape(g.shape)


class AdamWRef:
    """torch.optim.AdamW's documented update (amsgrad off), float64, one tensor."""

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = self.v = None
        self.t = 0

    def step(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = g.to(F64)
        b1, b2 = self.betas
        if self.m is None:
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        return (1 - self.lr * self.wd) * w.to(F64) - self.lr * m_hat / (v_hat.sqrt() + self.eps)


# --------------------------------------------------------------------------------------- SGD-SaI
def gsnr(g: torch.Tensor, eps: float) -> float:
    """||g||_2 / (unbiased std(g) + eps); 1 for a one-element tensor (our documented fix)."""
    g = g.to(F64).reshape(-1)
    if g.numel() == 1:
        return 1.0
    return (g.norm() / (g.std(unbiased=True) + eps)).item()


class SGDSaIRef:
    """SGD-SaI on a list of tensors, float64: scale at the first non-zero gradient, EMA momentum
    (m_1 = g_1), p <- (1 - lr*wd) p - lr * scale * m; all-zero or missing gradients skip the tensor.
    ``max_normalized``: the paper's variant, every scale divided by the max scale taken so far."""

    def __init__(self, lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2, max_normalized=False):
        self.lr, self.mu, self.eps, self.wd = lr, momentum, eps, weight_decay
        self.max_normalized = max_normalized
        self.scale: dict[int, float] = {}
        self.buf: dict[int, torch.Tensor] = {}

    def step(self, weights: list[torch.Tensor], grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
        live = [i for i, g in enumerate(grads) if g is not None and bool(g.ne(0).any())]
        for i in live:
            if i not in self.scale:
                self.scale[i] = gsnr(grads[i], self.eps)
        top = max(self.scale.values()) if (self.max_normalized and self.scale) else 1.0
        out = [w.to(F64).clone() for w in weights]
        for i in live:
            g = grads[i].to(F64)
            if i not in self.buf:
                self.buf[i] = g.clone()
            else:
                self.buf[i] = self.mu * self.buf[i] + (1 - self.mu) * g
            out[i] = (1 - self.lr * self.wd) * out[i] - self.lr * (self.scale[i] / top) * self.buf[i]
        return out


# --------------------------------------------------------------------------------------- helpers
def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the bf16 grid at |x| (the gap to the next representable magnitude), float64."""
    x = x.to(F64).abs()
    _, e = torch.frexp(x.clamp_min(2.0**-126))  # x = mant * 2^e, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), e - 8)
