"""Cost of the optimizer step alone (gradients given) on LLaMA-shaped parameter sets.

Times ``optimizer.step()`` with default settings for fused AdamW, ``torch.optim.Muon`` (if this torch
has it), microsoft/dion's ``Muon`` (mega-batched Polar Express; when its ``dion`` package is importable,
e.g. a checkout's parent directory on PYTHONPATH: it is not a dependency), SWAN, SinkGD and SGD-SaI:
CUDA events, warm-up, median of N, and the host time of issuing the step. ``--graph`` also times the
named optimizers with the whole step captured in a CUDA graph and replayed (ours through
``stateless_opt.CUDAGraphOptimizer``, dion's through its ``CudaGraphOptimizer``); ``--variants`` times
other settings (e.g. ``"ns_steps=5;sinkgd:stats_dtype=float32;sgdsai:fused=false"``). With
``--train-step`` each step's share of a training step; ``targets`` holds the issue's ratios, met or
missed; ``--baseline-json`` adds the rows of another commit's run of this script (same device, same
call) as ``before``. Also writes SWAN's
relative Frobenius error from the exact polar factor (fp64 SVD, on the range) for its default settings
on this device, on the benchmark's Gaussian matrices and on real gradients (a small random-init
``transformers`` LlamaForCausalLM with the preset's widths, forward/backward on random tokens), with
the old default (Newton-Schulz, 12 fp32 steps) beside it; and a device-vs-CPU check of one step of
every optimizer on a small set (the GPU path, fused kernels included, against the CPU reference path).

    python benchmarks/step_cost.py --preset 350m --out benchmarks/results/step_cost_<device>.json
    torchrun --standalone --nproc-per-node 2 benchmarks/step_cost.py --world 2 --preset 1.3b --out ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from stateless_opt import SGDSaI, SinkGD, SWAN
from stateless_opt.swan import swan_direction, whitening_flops, whitening_plan

# (layers, hidden, intermediate, vocab) following the GaLore/C4 LLaMA family.
PRESETS = {
    "tiny": (2, 128, 344, 1000),  # a smoke test of the script on a CPU
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


def make_params(shapes, device, dtype, seed=0, on_device=False):
    """Random weights and gradients; drawn on the CPU (the same values on every device) unless
    ``on_device`` (much faster for the 1.3B timing runs, where the values do not matter)."""
    gen_device = device if on_device else torch.device("cpu")
    g = torch.Generator(device=gen_device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g, device=gen_device) * 0.02).to(device, dtype))
        p.grad = (torch.randn(s, generator=g, device=gen_device) * 1e-3).to(device, dtype)
        params.append(p)
    return params


def dion_module():
    """microsoft/dion's package if importable (its checkout's parent on PYTHONPATH), else None."""
    try:
        import dion
    except ImportError:
        return None
    return dion


def build(name, matrices, fallback, **kw):
    """The optimizer ``name`` over the parameter set; ``kw`` overrides our optimizers' defaults."""
    groups = [{"params": matrices, "rule": "matrix"}, {"params": fallback, "rule": "fallback"}]
    if name == "adamw_fused":
        return torch.optim.AdamW(matrices + fallback, lr=1e-3, fused=True)
    if name == "muon":
        return [torch.optim.Muon(matrices, lr=1e-3), torch.optim.AdamW(fallback, lr=1e-3, fused=True)]
    if name == "dion_muon":  # its defaults: mega-batched Polar Express (5 bf16 steps), AdamW for the rest
        return dion_module().Muon([{"params": matrices}, {"params": fallback, "algorithm": "adamw"}], lr=1e-3)
    if name == "swan":
        return SWAN(groups, lr=1e-3, **kw)
    if name == "sinkgd":
        return SinkGD(groups, lr=1e-3, **kw)
    if name == "sgdsai":
        return SGDSaI(matrices + fallback, lr=1e-4, **kw)
    raise ValueError(name)


def time_ms(run, device, warmup=2, iters=5, host: list | None = None) -> float:
    """Median milliseconds of ``run()`` after ``warmup`` calls: CUDA events on a GPU, wall clock on CPU.
    ``host`` (a list) receives the median host time of issuing ``run()`` on a GPU: close to the CUDA
    time means the step is bound by the CPU issuing launches (or by syncs), not by the GPU."""
    for _ in range(warmup):
        run()
    times, issue = [], []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            run()
            issue.append((time.perf_counter() - t0) * 1e3)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    if host is not None and issue:
        host.append(statistics.median(issue))
    return statistics.median(times)


def graphed(name: str, opt):
    """``opt`` with its whole step captured in a CUDA graph after 2 eager steps."""
    if name == "dion_muon":
        from dion.cuda_graph import CudaGraphOptimizer

        return CudaGraphOptimizer(opt, warmup_steps=2)
    from stateless_opt import CUDAGraphOptimizer

    return CUDAGraphOptimizer(opt, warmup_steps=2)


def profile_step(name: str, matrices, fallback, device, dtype, rows: int = 25) -> dict:
    """Where one eager step's GPU time goes: kernels by total CUDA time (torch.profiler), and how many
    launches the step makes."""
    from torch.profiler import ProfilerActivity, profile

    m = make_params(matrices, device, dtype, on_device=True)
    f = make_params(fallback, device, dtype, 1, on_device=True)
    opt = build(name, m, f)
    for _ in range(2):
        opt.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]
    out = {"gpu_ms": total, "launches": sum(e.count for e in kernels),
           "kernels": [{"name": e.key[:120], "count": e.count, "ms": e.self_device_time_total / 1e3} for e in top]}
    del m, f, opt
    torch.cuda.empty_cache()
    return out


def time_step(opt, device, warmup=2, iters=5, host: list | None = None) -> float:
    opts = opt if isinstance(opt, list) else [opt]

    def run():
        for o in opts:
            o.step()

    return time_ms(run, device, warmup, iters, host)


def swan_settings(device, **overrides) -> dict:
    """The keyword arguments of ``swan_direction`` that ``SWAN(**overrides)`` uses on ``device``."""
    d = SWAN([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, **overrides).defaults
    steps, dtype = whitening_plan(d["whitening"], d["ns_steps"], d["whitening_dtype"], device)
    return dict(eps=d["eps"], steps=steps, method=d["whitening"], lower=d["pe_lower_bound"], dtype=dtype,
                gradnorm_axis=d["gradnorm_axis"], symmetric=d["fused"])


def exact_direction(g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SWAN's exact direction in fp64 on the CPU (GradNorm on the oriented matrix, polar factor on the
    range: singular values > 1e-10 sigma_max, RMS 1) and the condition number of G~ on that range."""
    x = g.detach().double().cpu()
    t = x.shape[0] > x.shape[1]
    if t:
        x = x.T
    x = x - x.mean(1, keepdim=True)
    x = x / (x.square().mean(1, keepdim=True).sqrt() + 1e-8)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = s > 1e-10 * s[0]
    ref = u[:, k] @ vh[k]
    ref = ref.T if t else ref
    return ref * math.sqrt(ref.numel()) / ref.norm(), float(s[0] / s[k][-1])


def direction_error(g: torch.Tensor, settings: dict, ref: torch.Tensor | None = None) -> float:
    """Relative Frobenius error of SWAN's direction with ``settings`` vs the exact fp64 one."""
    ref = exact_direction(g)[0] if ref is None else ref
    d = swan_direction(g[None].float(), **settings)[0].double().cpu()
    return float((d - ref).norm() / ref.norm())


def polar_errors(shapes, device, seed=1, steps=()) -> dict:
    """On Gaussian matrices of the benchmark's shapes: error of the default, of the old default, of the
    default with cuBLAS for every product (``fused=False``) and with other step counts (``steps``)."""
    out = {}
    for m, n in shapes:
        g = torch.randn((m, n), generator=torch.Generator().manual_seed(seed)).to(device)
        ref, cond = exact_direction(g)
        out[f"{m}x{n}"] = {"cond_gradnormed": cond, **errors_of_settings(g, device, ref, steps)}
    return out


def errors_of_settings(g, device, ref, steps=()) -> dict:
    out = {
        "default": direction_error(g, swan_settings(device), ref),
        "default_cublas": direction_error(g, swan_settings(device, fused=False), ref),
        "newton_schulz_12_fp32": direction_error(g, swan_settings(device, whitening="newton_schulz"), ref),
    }
    for k in steps:
        out[f"ns_steps_{k}"] = direction_error(g, swan_settings(device, ns_steps=k), ref)
    return out


def llama_model(preset: str, device, *, layers: int | None = None, seq: int = 1024, vocab: int | None = None,
                init_on_device: bool = True):
    """A random-init ``transformers`` LlamaForCausalLM with the preset's widths (``layers`` blocks, default
    the preset's) on ``device``; initialised there (fast at 1.3B) or on the CPU (the same weights on
    every device)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_layers, h, ff, n_vocab = PRESETS[preset]
    heads = max(1, h // 64)
    cfg = LlamaConfig(vocab_size=vocab or n_vocab, hidden_size=h, intermediate_size=ff,
                      num_hidden_layers=layers or n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=seq, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device if init_on_device else "cpu"):
        return LlamaForCausalLM(cfg).to(device)


def llama_gradients(preset: str, device, layers: int = 2, batch: int = 8, seq: int = 512, vocab: int = 32000):
    """Gradients of the block matrices of a random-init LlamaForCausalLM with the preset's widths and
    ``layers`` blocks, from one forward/backward (fp32) on random tokens: {name: grad}."""
    model = llama_model(preset, device, layers=layers, seq=seq, vocab=vocab, init_on_device=False)
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = {n.replace("model.layers.", "L").replace(".weight", ""): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.dim() == 2 and "layers." in n}
    del model
    return grads


def forward_backward_ms(preset: str, device, batch: int = 8, seq: int = 1024, iters: int = 3) -> dict:
    """Median time of one forward + backward of the full LlamaForCausalLM of ``preset`` (fp32 weights,
    bf16 autocast, ``batch`` x ``seq`` tokens, no activation checkpointing): the rest of a training
    step, against which the optimizer step's share is reported."""
    model = llama_model(preset, device, seq=seq)
    tokens = torch.randint(0, PRESETS[preset][3], (batch, seq), device=device)

    def run():  # gradients accumulate across calls: the same work as writing them fresh
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()

    ms = time_ms(run, device, warmup=1, iters=iters)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del model
    return {"ms": ms, "batch": batch, "seq": seq, "peak_gib": peak,
            "setting": "fp32 weights, bf16 autocast, sdpa, no activation checkpointing"}


def real_gradient_errors(preset: str, device, steps=(), layers: int = 2) -> dict:
    grads = llama_gradients(preset, device, layers=layers)
    out = {}
    for name, g in grads.items():
        ref, cond = exact_direction(g)
        out[name] = {"shape": list(g.shape), "cond_gradnormed": cond, **errors_of_settings(g, device, ref, steps)}
    return out


def device_check(device) -> dict:
    """One step of each optimizer on the device vs on the CPU from the same weights and gradients:
    max |update difference| / max |device update|, per tensor, max over tensors. The defaults differ
    by device where a cheaper precision is the CUDA default (SWAN's bf16 whitening, SinkGD's bf16
    statistics) and CUDA runs the fused kernels; so each is compared as users get it ("swan",
    "sinkgd", "sgdsai": CUDA default vs CPU default, the cost of the CUDA defaults) and at one
    precision on both sides ("swan_fp32" and "sinkgd_fp32": the kernels alone; "swan_bf16": tensor
    cores vs the CPU's bf16 emulation)."""
    out = {}
    for label, name, kw in (("swan", "swan", {}), ("swan_fp32", "swan", {"whitening_dtype": "float32"}),
                            ("swan_bf16", "swan", {"whitening_dtype": "bfloat16"}), ("sinkgd", "sinkgd", {}),
                            ("sinkgd_fp32", "sinkgd", {"stats_dtype": "float32"}), ("sgdsai", "sgdsai", {})):
        try:
            cpu, dev = (one_step_update(name, kw, d) for d in (torch.device("cpu"), device))
            out[label] = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(cpu, dev))
        except Exception as err:  # noqa: BLE001  (recorded; the other checks still run)
            out[label] = f"{type(err).__name__}: {err}"
    return out


def one_step_update(name: str, kw: dict, device) -> list[torch.Tensor]:
    """The update (W_1 - W_0, float64 on the CPU) of one step of ``name`` on the device-check set."""
    m = make_params([(48, 80), (80, 48), (64, 64)], device, torch.float32, 3)
    f = make_params([(100, 48), (48,)], device, torch.float32, 4)
    before = [p.detach().double().cpu() for p in m + f]
    build(name, m, f, **kw).step()
    return [p.detach().double().cpu() - b for p, b in zip(m + f, before)]


def variant_label(name: str, kw: dict) -> str:
    """``swan[whiten_batch_mb=1024]``: the optimizer and the settings that differ from its defaults."""
    return name + ("[" + ",".join(f"{k}={v}" for k, v in kw.items()) + "]" if kw else "")


def parse_variants(spec: str, default_name: str = "swan") -> list[tuple[str, dict]]:
    """``"sinkgd:stats_dtype=float32;fused=false,chunk_mb=1024"`` -> [("sinkgd", {...}), ("swan", {...})]:
    ``name:`` picks the optimizer (default ``default_name``); ints, floats and true/false are parsed."""
    out = []
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        name, _, items = part.rpartition(":")
        kw = {}
        for item in items.split(","):
            key, value = (x.strip() for x in item.split("="))
            if value.lower() in ("true", "false"):
                value = value.lower() == "true"
            else:
                for cast in (int, float):
                    try:
                        value = cast(value)
                        break
                    except ValueError:
                        pass
            kw[key] = value
        out.append((name.strip() or default_name, kw))
    return out


# The issue's targets (one H100/H200, 1.3B, ratios in one run): (what, row, reference row or None, bound)
TARGETS = (
    ("SWAN <= 0.8x dion Muon", "swan", "dion_muon", 0.8),
    ("SinkGD <= 2x fused AdamW", "sinkgd", "adamw_fused", 2.0),
    ("SGD-SaI <= 1.0x fused AdamW", "sgdsai", "adamw_fused", 1.0),
)
SHARE_BOUNDS = {"swan": 0.15, "sinkgd": 0.05, "sgdsai": 0.05}


def targets(rows: list[dict]) -> list[dict]:
    """Each target, for the eager and the captured row of our optimizer (against the peer's best row of
    the two): the ratio, the bound, met or by how much it is missed; host time <= 10% of GPU time for
    every row; each step's share of a training step (when timed)."""
    by = {r["optimizer"]: r for r in rows if r.get("ms") is not None}
    out = []

    def best(name):
        cands = [by[n] for n in (name, name + "[graph]") if n in by]
        return min(cands, key=lambda r: r["ms"]) if cands else None

    for what, name, ref, bound in TARGETS:
        peer = best(ref)
        for label in (name, name + "[graph]"):
            if label in by and peer is not None:
                ratio = by[label]["ms"] / peer["ms"]
                out.append({"target": what, "row": label, "against": peer["optimizer"], "value": ratio,
                            "bound": bound, "met": ratio <= bound, "missed_by": max(0.0, ratio / bound - 1.0)})
    for label, r in by.items():
        if r.get("host_share_of_gpu") is not None:
            out.append({"target": "host time <= 10% of GPU time", "row": label, "value": r["host_share_of_gpu"],
                        "bound": 0.10, "met": r["host_share_of_gpu"] <= 0.10,
                        "missed_by": max(0.0, r["host_share_of_gpu"] / 0.10 - 1.0)})
        base = label.split("[")[0]
        if base in SHARE_BOUNDS and r.get("share_of_training_step") is not None:
            bound = SHARE_BOUNDS[base]
            out.append({"target": f"{base} <= {bound:.0%} of a training step", "row": label,
                        "value": r["share_of_training_step"], "bound": bound,
                        "met": r["share_of_training_step"] <= bound,
                        "missed_by": max(0.0, r["share_of_training_step"] / bound - 1.0)})
    return out


def plot(result: dict, path: str) -> bool:
    """Bar chart of the step times (log scale) with each bar's ratio to fused AdamW; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [{**r, "optimizer": "before: " + r["optimizer"], "before": True}
            for r in result.get("before", {}).get("steps", []) if r.get("ms")]
    rows += [r for r in result["steps"] if r.get("ms")]
    peers = ("adamw_fused", "muon", "dion_muon")

    def colour(r):
        if r.get("before"):
            return "lightgray"
        if r["optimizer"].split("[")[0] in peers:
            return "tab:orange"
        if r["optimizer"].endswith("[graph]"):
            return "tab:green"
        return "tab:gray" if "[" in r["optimizer"] else "tab:blue"

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4.5))
    bars = ax.bar(range(len(rows)), [r["ms"] for r in rows], color=[colour(r) for r in rows])
    for bar, r in zip(bars, rows):
        ratio = r.get("ratio_to_adamw_fused")
        ax.annotate(f"{r['ms']:.1f} ms" + (f"\n{ratio:.2f}x AdamW" if ratio else ""), (bar.get_x() + bar.get_width() / 2,
                    bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["optimizer"].replace("[", "\n[").replace(",", ",\n") for r in rows], fontsize=7,
                  rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("optimizer step, ms (median)")
    ax.set_title(f"{result['preset']} {result['dtype']} params, {result['device']} (blue: ours eager, green: captured "
                 "in a CUDA graph, orange: peers, light grey: before, grey: other settings)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def distributed_whitening(args) -> None:
    """SWAN's step on ``--world`` ranks (torchrun, NCCL on GPUs, gloo on CPUs), replicated weights as
    under DDP: each rank whitens the matrices it owns (FLOP-balanced owners) and the updates are
    exchanged. Every rank times its own step; rank 0 writes them (compare with a ``--world 1`` run's
    SWAN row: the issue's target is <= 0.6x the 1-GPU time on 2 GPUs)."""
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != args.world:
        raise SystemExit(f"--world {args.world} but torchrun started {world} ranks")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = False
    matrices, fallback = llama_shapes(args.preset)
    rows = []
    for name, kw in [("swan", {})] + [(n, k) for n, k in parse_variants(args.variants) if n == "swan"]:
        m = make_params(matrices, device, getattr(torch, args.dtype), on_device=True)
        f = make_params(fallback, device, getattr(torch, args.dtype), 1, on_device=True)
        opt = build(name, m, f, replicate_group=True, **kw)
        dist.barrier()
        ms = time_step(opt, device, iters=args.iters)
        before = opt.bytes_sent()
        opt.step()
        per_rank = [None] * world
        dist.all_gather_object(per_rank, {"ms": ms, "bytes_sent_per_step": opt.bytes_sent() - before})
        label = variant_label(name, kw)
        rows.append({"optimizer": label, "per_rank": per_rank, "ms_max": max(r["ms"] for r in per_rank)})
        if rank == 0:
            print(f"{label:>12} world {world}: " + ", ".join(f"{r['ms']:.1f}" for r in per_rank) + " ms per rank",
                  flush=True)
        del m, f, opt
        if on_gpu:
            torch.cuda.empty_cache()
    if rank == 0:
        result = {"device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
                  "world": world, "backend": dist.get_backend(), "layout": "replicated (DDP), whitening split over ranks",
                  "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "tf32": False, "steps": rows}
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="350m", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--optimizers", default="adamw_fused,muon,dion_muon,swan,sinkgd,sgdsai")
    ap.add_argument("--graph", default="dion_muon,swan,sinkgd,sgdsai",
                    help="optimizers also timed with the whole step captured in a CUDA graph (CUDA only)")
    ap.add_argument("--baseline-json", default=None, help="another commit's results (same device): the 'before' rows")
    ap.add_argument("--baseline-label", default=None, help="what the baseline is, e.g. 'main at 5a1a79e'")
    ap.add_argument("--polar-steps", default="4", help="other Polar Express step counts whose polar error is measured")
    ap.add_argument("--variants", "--swan-variants", default="",
                    help='other settings to time, ";"-separated, each "[optimizer:]key=value,...", e.g. '
                         '"ns_steps=4,pe_lower_bound=0.015;sinkgd:stats_dtype=float32;sgdsai:fused=false" '
                         '(no optimizer: SWAN)')
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--grad-layers", type=int, default=2, help="blocks of the model whose real gradients are whitened")
    ap.add_argument("--profile", default="", help="optimizers whose eager step is profiled (GPU kernels by total time)")
    ap.add_argument("--no-errors", action="store_true", help="skip the polar-error and device checks")
    ap.add_argument("--train-step", action="store_true",
                    help="also time forward+backward of the full model (micro-batch 8 x 1024, bf16 autocast) and "
                         "report each optimizer step's share of the training step")
    ap.add_argument("--out", default=None, help="JSON path; a PNG chart is written beside it")
    ap.add_argument("--replot", metavar="JSON", default=None, help="only draw the chart of a results file (no GPU)")
    ap.add_argument("--world", type=int, default=1,
                    help="> 1: SWAN's distributed whitening per rank, under torchrun --nproc-per-node N")
    args = ap.parse_args()
    if args.world > 1:
        distributed_whitening(args)
        return
    if args.replot:
        with open(args.replot) as f:
            print("wrote", args.replot.removesuffix(".json") + ".png" if plot(json.load(f), args.replot.removesuffix(
                ".json") + ".png") else "nothing (no matplotlib)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    matrices, fallback = llama_shapes(args.preset)
    numel = sum(math.prod(s) for s in matrices + fallback)
    names = [n for n in args.optimizers.split(",") if n]
    graph = [n for n in args.graph.split(",") if n] if device.type == "cuda" else []
    runs = [(name, {}, False) for name in names]
    runs += [(name, {}, True) for name in graph]
    runs += [(name, kw, False) for name, kw in parse_variants(args.variants)]
    rows = []
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "preset": args.preset, "dtype": args.dtype, "numel": numel, "tf32": False,
        "steps": rows,
    }
    for name, kw, captured in runs:
        if name == "muon" and not hasattr(torch.optim, "Muon"):
            continue
        if name == "dion_muon" and dion_module() is None:
            print("dion_muon skipped: no `dion` package on the path", flush=True)
            continue
        label = variant_label(name, kw) + ("[graph]" if captured else "")
        m = make_params(matrices, device, dtype, on_device=True)
        f = make_params(fallback, device, dtype, 1, on_device=True)
        t0 = time.perf_counter()
        try:
            opt = build(name, m, f, **kw)
            if captured:
                opt = graphed(name, opt)
            host: list[float] = []
            # a captured optimizer's first steps are its eager warm-up and the capture
            ms = time_step(opt, device, warmup=4 if captured else 2, iters=args.iters, host=host)
            if captured and not (getattr(opt, "captured", False) or getattr(opt, "_graph", None) is not None):
                raise RuntimeError("the step was not captured")
        except Exception as err:  # noqa: BLE001  (one broken variant must not cost the rest of the run)
            rows.append({"optimizer": label, "ms": None, "error": f"{type(err).__name__}: {err}"})
            print(f"{label:>12} FAILED: {type(err).__name__}: {err}", flush=True)
            del m, f
            continue
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        row = {"optimizer": label, "ms": ms, "host_issue_ms": host[0] if host else None, "peak_gib": peak,
               "captured": captured, "wall_s": time.perf_counter() - t0}
        if row["host_issue_ms"] is not None:
            row["host_share_of_gpu"] = row["host_issue_ms"] / ms
        if name == "swan":
            row["whitening"] = swan_settings(device, **kw)
            row["whitening_tflop"] = sum(
                whitening_flops(a, b, row["whitening"]["steps"], row["whitening"]["method"])
                for a, b in matrices) / 1e12
        rows.append(row)
        print(f"{label:>12} {ms:10.1f} ms" + (f"  (host issues it in {host[0]:.1f} ms)" if host else ""), flush=True)
        del m, f, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if args.out:  # what is timed survives a later failure
            with open(args.out, "w") as fh:
                json.dump(result, fh, indent=2)
    by = {r["optimizer"]: r["ms"] for r in rows if r.get("ms") is not None}
    for r in (r for r in rows if r.get("ms") is not None):
        r["ratio_to_adamw_fused"] = r["ms"] / by["adamw_fused"] if "adamw_fused" in by else None
        r["ratio_to_muon"] = r["ms"] / by["muon"] if "muon" in by else None
        r["ratio_to_dion_muon"] = r["ms"] / by["dion_muon"] if "dion_muon" in by else None
    fwd_bwd = None
    if args.train_step:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        fwd_bwd = forward_backward_ms(args.preset, device)
        timed = [r for r in rows if r.get("ms") is not None]
        for r in timed:  # share of (forward + backward + optimizer step)
            r["share_of_training_step"] = r["ms"] / (fwd_bwd["ms"] + r["ms"])
        print(f"forward+backward {fwd_bwd['ms']:.1f} ms; step share: "
              + ", ".join(f"{r['optimizer']} {100 * r['share_of_training_step']:.1f}%" for r in timed), flush=True)
    result["forward_backward"] = fwd_bwd
    result["targets"] = targets(rows)
    if args.profile and device.type == "cuda":
        result["profiles"] = {}
        for name in filter(None, args.profile.split(",")):
            try:
                result["profiles"][name] = profile_step(name, matrices, fallback, device, dtype)
            except Exception as err:  # noqa: BLE001  (a profiler hiccup must not cost the timings)
                result["profiles"][name] = f"{type(err).__name__}: {err}"
    if args.baseline_json:
        with open(args.baseline_json) as fh:
            base = json.load(fh)
        result["before"] = {"source": args.baseline_label or args.baseline_json, "device": base.get("device"),
                            "steps": base["steps"]}
        before = {r["optimizer"]: r for r in base["steps"] if r.get("ms")}
        result["before_after"] = {
            n: {"before_ms": before[n]["ms"], "after_ms": by[n], "after_over_before": by[n] / before[n]["ms"],
                "before_host_ms": before[n].get("host_issue_ms"),
                "after_host_ms": next(r["host_issue_ms"] for r in rows if r["optimizer"] == n)}
            for n in before if n in by}
    if args.out:  # the timings survive a failure in the checks below
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if not args.no_errors:
        t0 = time.perf_counter()
        result["swan_default_whitening"] = swan_settings(device)
        steps = [int(k) for k in args.polar_steps.split(",") if k]
        result["swan_polar_error"] = polar_errors(sorted(set(matrices)), device, steps=steps)
        result["swan_polar_error_llama_grads"] = real_gradient_errors(args.preset, device, steps=steps,
                                                                      layers=args.grad_layers)
        result["device_vs_cpu_max_rel_update_error"] = device_check(device)
        print(f"error checks: {time.perf_counter() - t0:.1f} s", flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        plot(result, args.out.removesuffix(".json") + ".png")


if __name__ == "__main__":
    main()
