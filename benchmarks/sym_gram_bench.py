"""Time ``kernels.sym_gram`` (half the blocks) against cuBLAS ``bmm`` at SWAN's 1.3B shapes (bf16)."""

import json
import sys

import torch

from stateless_opt import kernels


def ms(fn, iters=10):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


out = {}
for batch, m, k, tall in ((8, 2048, 5504, False), (8, 2048, 5504, True), (8, 2048, 2048, False)):
    # tall: X^T X of a stored (k, m) matrix, read through a transposed view (SWAN's right Gram)
    x = torch.randn(batch, k, m, device="cuda").to(torch.bfloat16).transpose(1, 2) if tall else \
        torch.randn(batch, m, k, device="cuda").to(torch.bfloat16)
    flops = 2.0 * batch * m * m * k
    t_bmm = ms(lambda: torch.bmm(x, x.transpose(1, 2)))
    t_sym = ms(lambda: kernels.sym_gram(x))
    out[f"{batch}x{m}x{k}" + ("_transposed" if tall else "")] = {
        "bmm_ms": t_bmm, "sym_ms": t_sym, "bmm_tflops": flops / t_bmm / 1e9, "sym_effective_tflops": flops / t_sym / 1e9}
json.dump(out, sys.stdout, indent=1)
