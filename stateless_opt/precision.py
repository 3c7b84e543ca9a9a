"""Precision policy, in one place: what ``"auto"`` means for matmul precision, fp32 results from bf16
matmuls, stochastic rounding into bf16 and fp16 weights, and the smallest norm anything divides by.

Everything else computes statistics and updates in fp32 (fp64 where a docstring says so); these are
the only places where a lower precision is chosen, and why.
"""

from __future__ import annotations

import functools

import torch

# Smallest norm we divide by: a zero matrix (row, column) stays exactly zero, 0 * (1 / TINY) is finite.
TINY = 1e-30
# fp32's smallest normal number: the floor of a divisor that may underflow (eps scaled by 2^-126).
FP32_TINY = torch.finfo(torch.float32).tiny


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
    """Write fp32 ``value`` into ``dst`` with stochastic rounding when ``dst`` is bf16 or fp16: E[dst] =
    value, so updates far below half an ulp still move the weight on average (round-to-nearest would
    drop them). Other dtypes are written as they are."""
    if dst.dtype == torch.bfloat16:
        bits = value.contiguous().view(torch.int32)
        noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
        rounded = (bits + noise).bitwise_and_(-65536)  # clear the 16 bits bf16 drops
        dst.copy_(rounded.view(torch.float32))
    elif dst.dtype == torch.float16:
        dst.copy_(_stochastic_fp16(value, generator))
    else:
        dst.copy_(value)


def _stochastic_fp16(value: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """fp16 is not a truncation of fp32 (5 exponent bits), so the bf16 bit trick does not apply: take the
    nearest fp16 q and its neighbour on the side of the residual r = value - q, and round to the
    neighbour with probability |r| / spacing. Values beyond the fp16 range saturate at +-65504 instead
    of becoming inf."""
    limit = torch.finfo(torch.float16).max
    v = value.float().clamp(-limit, limit)
    q = v.to(torch.float16)
    r = v - q.float()  # exact: v and q are within one fp16 ulp
    toward = torch.where(r > 0, torch.full_like(q, float("inf")), torch.full_like(q, -float("inf")))
    other = torch.nextafter(q, toward)
    spacing = (other.float() - q.float()).abs()
    u = torch.rand(v.shape, dtype=torch.float32, device=v.device, generator=generator)
    take = (u * spacing < r.abs()) & torch.isfinite(other)
    return torch.where(take, other, q)
