"""Cost of the optimizer step alone (gradients given) on LLaMA-shaped parameter sets.

Times ``optimizer.step()`` with default settings for fused AdamW, ``torch.optim.Muon`` (if this torch
has it), SWAN, SinkGD and SGD-SaI: CUDA events, warm-up, median of N. Also writes, for the same
default settings, SWAN's relative error from the exact polar factor (fp64), and a device-vs-CPU
check of one step of every optimizer on a small set (the GPU path against the CPU reference path).

    python benchmarks/step_cost.py --preset 350m --out benchmarks/results/step_cost_<device>.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch

from stateless_opt import SGDSaI, SinkGD, SWAN
from stateless_opt.ops import swan_direction

# (layers, hidden, intermediate, vocab) following the GaLore/C4 LLaMA family.
PRESETS = {
    "60m": (8, 512, 1376, 32000),
    "134m": (12, 768, 2048, 32000),
    "350m": (24, 1024, 2736, 32000),
    "1.3b": (24, 2048, 5461, 32000),
}


def llama_shapes(preset: str) -> tuple[list[tuple[int, int]], list[tuple[int, ...]]]:
    """(block matrices, fallback tensors: embeddings, head, norms)."""
    layers, h, ff, vocab = PRESETS[preset]
    matrices = []
    for _ in range(layers):
        matrices += [(h, h)] * 4 + [(ff, h), (ff, h), (h, ff)]
    fallback = [(vocab, h), (vocab, h)] + [(h,)] * (2 * layers + 1)
    return matrices, fallback


def make_params(shapes, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(device, dtype)
        params.append(p)
    return params


def build(name, matrices, fallback):
    groups = [{"params": matrices, "rule": "matrix"}, {"params": fallback, "rule": "fallback"}]
    if name == "adamw_fused":
        return torch.optim.AdamW(matrices + fallback, lr=1e-3, fused=True)
    if name == "muon":
        return [torch.optim.Muon(matrices, lr=1e-3), torch.optim.AdamW(fallback, lr=1e-3, fused=True)]
    if name == "swan":
        return SWAN(groups, lr=1e-3)
    if name == "sinkgd":
        return SinkGD(groups, lr=1e-3)
    if name == "sgdsai":
        return SGDSaI(matrices + fallback, lr=1e-4)
    raise ValueError(name)


def time_step(opt, device, warmup=2, iters=5) -> float:
    opts = opt if isinstance(opt, list) else [opt]

    def run():
        for o in opts:
            o.step()

    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def polar_error(shape, device, seed=1) -> float:
    """Relative Frobenius error of SWAN's default direction vs the exact fp64 polar factor on the range."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    d = swan_direction(g[None].to(device), eps=1e-8, steps=SWAN(
        [torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1).defaults["ns_steps"])[0].double().cpu()
    x = g.double()
    t = x.shape[0] > x.shape[1]
    if t:
        x = x.T
    x = x - x.mean(1, keepdim=True)
    x = x / (x.square().mean(1, keepdim=True).sqrt() + 1e-8)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = s > 1e-10 * s[0]
    ref = u[:, k] @ vh[k]
    ref = ref.T if t else ref
    ref = ref * math.sqrt(ref.numel()) / ref.norm()
    return float((d - ref).norm() / ref.norm())


def device_check(device) -> dict:
    """One step of each optimizer on the device vs on the CPU from the same weights and gradients."""
    out = {}
    shapes_m, shapes_f = [(48, 80), (80, 48), (64, 64)], [(100, 48), (48,)]
    for name in ("swan", "sinkgd", "sgdsai"):
        results = []
        for dev in (torch.device("cpu"), device):
            m, f = make_params(shapes_m, dev, torch.float32, 3), make_params(shapes_f, dev, torch.float32, 4)
            opt = build(name, m, f)
            opt.step()
            results.append([p.detach().double().cpu() for p in m + f])
        err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))
        out[name] = err
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="350m", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--optimizers", default="adamw_fused,muon,swan,sinkgd,sgdsai")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    matrices, fallback = llama_shapes(args.preset)
    numel = sum(math.prod(s) for s in matrices + fallback)
    rows = []
    for name in args.optimizers.split(","):
        if name == "muon" and not hasattr(torch.optim, "Muon"):
            continue
        m, f = make_params(matrices, device, dtype), make_params(fallback, device, dtype, 1)
        opt = build(name, m, f)
        ms = time_step(opt, device, iters=args.iters)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        rows.append({"optimizer": name, "ms": ms, "peak_gib": peak})
        print(f"{name:>12} {ms:10.1f} ms", flush=True)
        del m, f, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    base = next((r["ms"] for r in rows if r["optimizer"] == "adamw_fused"), None)
    for r in rows:
        r["ratio_to_adamw_fused"] = r["ms"] / base if base else None
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "numel": numel,
        "tf32": False,
        "steps": rows,
        "swan_polar_error": {f"{m}x{n}": polar_error((m, n), device) for m, n in sorted(set(matrices))},
        "device_vs_cpu_max_rel_error": device_check(device),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
