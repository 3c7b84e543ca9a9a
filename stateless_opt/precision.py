"""Precision policy, in one place: what ``"auto"`` means for matmul precision, fp32 results from bf16
matmuls, stochastic rounding into bf16 weights, and the smallest norm anything divides by.

Everything else computes statistics and updates in fp32 (fp64 where a docstring says so); these are
the only places where a lower precision is chosen, and why.
"""

from __future__ import annotations

import functools

import torch

# Smallest norm we divide by: a zero matrix (row, column) stays exactly zero, 0 * (1 / TINY) is finite.
TINY = 1e-30


def matmul_precision(name: str, device: torch.device) -> str:
    """``"auto"`` -> "bfloat16" on CUDA (tensor cores, half the bytes) and "float32" elsewhere (a CPU
    gains nothing from bf16 matmuls); other names pass through. Read by SWAN's Polar Express and
    SinkGD's statistics, resolved once per step."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b`` with fp32 results. bf16 operands accumulate in fp32; on CUDA the result is
    written in fp32 too (``bmm``'s ``out_dtype``, torch >= 2.8) rather than rounded to bf16 first."""
    if a.dtype == torch.float32:
        return torch.matmul(a, b)
    if a.is_cuda and _has_bmm_out_dtype():
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.matmul(a, b).float()


@functools.cache
def _has_bmm_out_dtype() -> bool:
    try:
        x = torch.ones(1, 1, 1, dtype=torch.bfloat16, device="cuda")
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def stochastic_round_(dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    """Write fp32 ``value`` into bf16 ``dst`` with stochastic rounding: E[dst] = value, so updates far
    below half a bf16 ulp still move the weight on average (plain rounding would drop them)."""
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # clear the 16 bits bf16 drops
    dst.copy_(rounded.view(torch.float32))
