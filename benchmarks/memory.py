"""Peak GPU memory per rank of one training step, our optimizers against AdamW and the SGD floor.

LLaMA 350M / 1.3B (transformers ``LlamaConfig``, random init, vocab 32000, the GaLore shapes),
fp32 parameters with bf16 autocast, sequence 1024, a fixed micro-batch. For every selected
configuration (backend x activation checkpointing x optimizer) in this process:

    build model + optimizer -> reset peak -> 2 x (forward + backward + optimizer.step)
    -> stateless_opt.memory_report (per-rank breakdown, AdamW prediction) -> teardown + empty_cache

Backends: ``plain`` (one GPU; DDP when ``--world`` > 1), ``zero1`` / ``zero2`` / ``zero3``
(DeepSpeed, the optimizer passed as ``optimizer=``, ``torch_autocast`` bf16 in the DeepSpeed JSON)
and ``fsdp2`` (``fully_shard`` per decoder layer + root, over all ranks). Optimizers: ``adamw``
(torch, fused on CUDA), ``sgd`` (no momentum: no state, the floor), ``sgd_momentum``, ``swan`` and
``sinkgd`` (fallback AdamW, and ``*_stateless`` with the stateless fallback), ``sgdsai``; all on
``stateless_opt.param_groups(model)``.

Output in ``--out-dir`` (default benchmarks/results): ``memory_<model>_<selection>_<device>_w<world>.json``
(device name in the name and the content; rewritten after every configuration, so a run cut short
keeps what it measured) and a PNG bar chart when matplotlib is importable. The printed table gives
the peak (max over ranks, net of memory still allocated before the configuration started) with its
ratio to AdamW and to the SGD floor measured in the same run, and the AdamW peak predicted by
``memory_report`` from our own run (to check the prediction against the measured AdamW).

    python benchmarks/memory.py --tiny                                    # CPU smoke check (RSS)
    python benchmarks/memory.py --model 350m --backends plain,fsdp2       # one GPU
    torchrun --standalone --nproc-per-node 8 benchmarks/memory.py --world 8 --model 1.3b --backends zero3,fsdp2

``--max-minutes`` (default 7.5) stops starting new configurations once the budget is spent (the rest
are listed as skipped); split the grid over invocations with --backends / --optimizers / --ckpt and join
the files with ``--merge A.json B.json ... --merge-out grid.json`` (a later file wins per configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import os
import platform
import re
import socket
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent

# hidden, intermediate, layers, heads (the GaLore / SWAN / SinkGD C4 LLaMA family, vocab 32000)
MODELS = {
    "tiny": (64, 176, 2, 4, 1000),
    "350m": (1024, 2736, 24, 16, 32000),
    "1.3b": (2048, 5461, 24, 32, 32000),
}
OPTIMIZERS = ("adamw", "sgd", "sgd_momentum", "swan", "swan_stateless", "sinkgd", "sinkgd_stateless", "sgdsai")
BACKENDS = ("plain", "zero1", "zero2", "zero3", "fsdp2")


# ------------------------------------------------------------------------------------ set-up
def init_distributed(world: int, device_type: str) -> tuple[int, int, torch.device]:
    """One process group for every backend (torchrun's env, or a 1-rank group for --world 1)."""
    if "RANK" not in os.environ:
        if world != 1:
            raise SystemExit(f"--world {world}: launch with torchrun --nproc-per-node {world}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world:
        raise SystemExit(f"--world {world} but WORLD_SIZE={size}")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=size,
                            timeout=datetime.timedelta(minutes=10),
                            **({"device_id": device} if device_type == "cuda" else {}))
    return rank, size, device


def build_model(name: str, seq: int, device: torch.device, ckpt: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, vocab = MODELS[name]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq,
        tie_word_embeddings=False, use_cache=False, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=0,
        pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place on the GPU (1.3B on the CPU takes ~20 s)
        model = LlamaForCausalLM(config)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_optimizer(name: str, groups, device: torch.device, adamw_impl: str):
    import stateless_opt as so

    if name == "adamw":
        kw = {"fused": True} if (adamw_impl == "fused" and device.type == "cuda") else {"foreach": True}
        return torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0, **kw)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=1e-3)
    if name == "sgd_momentum":
        return torch.optim.SGD(groups, lr=1e-3, momentum=0.9)
    if name.startswith(("swan", "sinkgd")):
        cls = so.SWAN if name.startswith("swan") else so.SinkGD
        return cls(groups, lr=1e-4, fallback="stateless" if name.endswith("_stateless") else "adamw")
    if name == "sgdsai":
        return so.SGDSaI(groups, lr=1e-4)
    raise ValueError(name)


def ds_config(stage: int, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class Setup:
    """One configuration: model, optimizer, a ``train_step()``; ``close()`` releases everything."""

    def __init__(self, args, backend: str, ckpt: bool, opt_name: str, device: torch.device, world: int):
        import stateless_opt as so

        self.engine = None
        self.device = device
        model = build_model(args.model, args.seq, device, ckpt)
        if backend == "plain":
            if world > 1:
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            self.model = model
            self.optimizer = make_optimizer(opt_name, so.param_groups(model), device, args.adamw_impl)
            self.label = "ddp" if world > 1 else "single"
        elif backend == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.model = model
            # classify after fully_shard: it replaces the parameters by DTensor ones
            self.optimizer = make_optimizer(opt_name, so.param_groups(model), device, args.adamw_impl)
            self.label = "fsdp2"
        else:
            import deepspeed

            import stateless_opt.integrations.deepspeed  # noqa: F401  (ZeRO layouts for our optimizers)

            stage = int(backend[-1])
            opt = make_optimizer(opt_name, so.param_groups(model), device, args.adamw_impl)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=opt, config=ds_config(stage, args.micro_batch))
            self.model = self.engine.module
            self.label = backend
        vocab = MODELS[args.model][4]
        g = torch.Generator().manual_seed(1 + dist.get_rank())
        self.batch = torch.randint(0, vocab, (args.micro_batch, args.seq), generator=g).to(device)

    def autocast(self):
        if self.engine is not None:  # DeepSpeed's torch_autocast section does it
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def train_step(self, last: bool) -> float:
        ids = self.batch
        if self.engine is not None:
            loss = self.engine(input_ids=ids, labels=ids).loss
            self.engine.backward(loss)
            self.engine.step()
        else:
            with self.autocast():
                loss = self.model(input_ids=ids, labels=ids).loss
            loss.backward()
            self.optimizer.step()
            if not last:  # keep the last gradients for the report
                self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def report(self, label: str, print_table: bool):
        from stateless_opt.memory import memory_report

        if self.engine is not None:
            return memory_report(self.engine, label=label, print_table=print_table)
        return memory_report(self.model, self.optimizer, label=label, print_table=print_table)

    def close(self):
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
            forget_zero3_module(self.model)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        self.engine = self.model = self.optimizer = self.batch = None


def forget_zero3_module(module) -> None:
    """Release what DeepSpeed 0.19's ZeRO-3 keeps alive after ``engine.destroy()``: the global
    ``FWD_MODULE_STACK`` keeps the top module (pushed when the engine is built, never popped) and,
    with activation checkpointing, sub-modules; ``PartitionedParameterCoordinator``'s
    ``__params_to_release`` is an ``lru_cache`` on a method, so the class keeps every coordinator, its
    parameters and through them the optimizer. Each kept the model, engine and optimizer state: a few
    GiB per configuration (found with a referrer walk on CPU)."""
    try:
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator
    except ImportError:
        return
    ours = {id(m) for m in module.modules()}
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", [])
    stack[:] = [m for m in stack if id(m) not in ours]
    cls = getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", None)
    fn = vars(cls).get("_PartitionedParameterCoordinator__params_to_release") if cls else None
    for cell in getattr(fn, "__closure__", None) or ():  # instrument_w_nvtx wraps the lru_cache
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
    if hasattr(fn, "cache_clear"):
        fn.cache_clear()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------ one config
def run_config(args, backend, ckpt, opt_name, device, world, rank) -> dict:
    release(device)
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    row = {"backend": backend, "ckpt": ckpt, "optimizer": opt_name}
    setup = None
    try:
        setup = Setup(args, backend, ckpt, opt_name, device, world)
        row["backend_label"] = setup.label
        t_build = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        losses = [setup.train_step(last=(i == args.steps - 1)) for i in range(args.steps)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rep = setup.report(f"{args.model} {backend} ckpt={'on' if ckpt else 'off'} {opt_name}",
                           print_table=args.print_reports)
        ranks = rep["ranks"]
        row.update(
            ok=True, losses=losses, build_s=t_build, seconds=time.perf_counter() - t0,
            base_allocated=[None] * world,
            peak_gib=[r["peak"] / 2**30 for r in ranks],
            peak_reserved_gib=[r["peak_reserved"] / 2**30 for r in ranks],
            state_gib=[(r["state"] + r["state_host"]) / 2**30 for r in ranks],
            state_pred_gib=[None if r["state_pred"] is None else (r["state_pred"] + (r["state_pred_host"] or 0)) / 2**30
                            for r in ranks],
            adamw_state_pred_gib=[(r["adamw_state"] + r["adamw_state_host"]) / 2**30 for r in ranks],
            adamw_peak_pred_gib=[r["adamw_peak"] / 2**30 for r in ranks],
            report=ranks,
        )
    except torch.cuda.OutOfMemoryError as err:  # one configuration too large must not end the grid
        row.update(ok=False, error=f"OOM: {str(err).splitlines()[0]}", seconds=time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001
        row.update(ok=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc(),
                   seconds=time.perf_counter() - t0)
        if rank == 0:
            print(row["trace"], file=sys.stderr, flush=True)
    finally:
        if setup is not None:
            setup.close()
        del setup
    # memory allocated before this configuration (left by earlier ones), per rank
    gathered = [None] * world
    dist.all_gather_object(gathered, base_alloc)
    row["base_allocated"] = gathered
    if row.get("ok") and device.type == "cuda":
        row["peak_net_gib"] = [p - b / 2**30 for p, b in zip(row["peak_gib"], gathered)]
    elif row.get("ok"):
        row["peak_net_gib"] = row["peak_gib"]
    release(device)
    return row


# ------------------------------------------------------------------------------------ output
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def add_ratios(rows: list[dict]) -> None:
    """Ratio of each peak (max over ranks, net) to AdamW's and to plain SGD's in the same run."""
    for r in rows:
        if not r.get("ok"):
            continue
        r["peak_max_gib"] = max(r["peak_net_gib"])
        ref = {o: x for x in rows if x.get("ok") and x["backend"] == r["backend"] and x["ckpt"] == r["ckpt"]
               for o in [x["optimizer"]]}
        for name, key in (("adamw", "ratio_to_adamw"), ("sgd", "ratio_to_sgd")):
            other = ref.get(name)
            r[key] = r["peak_max_gib"] / max(other["peak_net_gib"]) if other else None
        adamw = ref.get("adamw")
        # AdamW peak predicted by memory_report from this run, net of what earlier configurations left
        # allocated (none since forget_zero3_module; kept so a future leak cannot bias the ratios),
        # against the measured AdamW peak, also net; and the saving each implies.
        base = [b / 2**30 for b in r.get("base_allocated") or [0] * len(r["adamw_peak_pred_gib"])]
        r["adamw_peak_pred_net_gib"] = [p - b for p, b in zip(r["adamw_peak_pred_gib"], base)]
        pred = max(r["adamw_peak_pred_net_gib"])
        r["adamw_peak_pred_vs_measured"] = pred / max(adamw["peak_net_gib"]) if adamw else None
        if adamw and r["optimizer"] != "adamw":
            measured_saving = max(adamw["peak_net_gib"]) - r["peak_max_gib"]
            predicted_saving = pred - r["peak_max_gib"]
            r["saving_measured_gib"], r["saving_predicted_gib"] = measured_saving, predicted_saving
            r["saving_pred_vs_measured"] = predicted_saving / measured_saving if measured_saving > 0 else None
        r["target_gib"], r["target"] = peak_target(r, ref)
        r["meets_target"] = (r["peak_max_gib"] <= r["target_gib"]) if r["target_gib"] is not None else None


TARGET_SLACK = 1.03  # issue #7: peaks within 3% of the floor each optimizer can reach in the same setup


def peak_target(r: dict, ref: dict) -> tuple[float | None, str]:
    """The peak this row should stay under, from rows of the same backend and checkpointing: stateless
    SWAN/SinkGD at the SGD floor; with the AdamW fallback, the floor plus their (fallback) Adam state;
    SGD-SaI at SGD with momentum; all + 3%."""
    sgd, momentum = ref.get("sgd"), ref.get("sgd_momentum")
    name = r["optimizer"]
    if name in ("swan_stateless", "sinkgd_stateless") and sgd:
        return TARGET_SLACK * max(sgd["peak_net_gib"]), "1.03 x SGD floor"
    if name in ("swan", "sinkgd") and sgd:
        return TARGET_SLACK * (max(sgd["peak_net_gib"]) + max(r["state_gib"])), "1.03 x (SGD floor + fallback Adam state)"
    if name == "sgdsai" and momentum:
        return TARGET_SLACK * max(momentum["peak_net_gib"]), "1.03 x SGD with momentum"
    return None, ""


def table(rows: list[dict], world: int) -> str:
    head = (f"{'backend':<8} {'ckpt':<4} {'optimizer':<17} {'peak GiB (max rank)':>20} {'per rank':>24} "
            f"{'/AdamW':>7} {'/SGD':>6} {'state GiB':>10} {'AdamW pred.':>12} {'pred/meas.':>10} {'saving p/m':>12} "
            f"{'target':>9} {'met':>4} {'s':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = f"{r['backend']:<8} {'on' if r['ckpt'] else 'off':<4} {r['optimizer']:<17}"
        if not r.get("ok"):
            err = r.get("error", "skipped")
            lines.append(f"{name} {err if err.startswith(('skipped', 'OOM')) else 'FAILED: ' + err}")
            continue
        per_rank = ",".join(f"{p:.2f}" for p in r["peak_net_gib"][:4]) + (",..." if world > 4 else "")
        fmt = lambda v, spec: format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0] or 1))  # noqa: E731
        lines.append(
            f"{name} {r['peak_max_gib']:>20.2f} {per_rank:>24} {fmt(r['ratio_to_adamw'], '7.3f')} "
            f"{fmt(r['ratio_to_sgd'], '6.3f')} {max(r['state_gib']):>10.3f} {max(r['adamw_peak_pred_net_gib']):>12.2f} "
            f"{fmt(r['adamw_peak_pred_vs_measured'], '10.3f')} {fmt(r.get('saving_pred_vs_measured'), '12.3f')} "
            f"{fmt(r.get('target_gib'), '9.2f')} {({True: 'yes', False: 'NO'}).get(r.get('meets_target'), '-'):>4} "
            f"{r['seconds']:>6.1f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.get("ok")]
    groups = sorted({(r["backend"], r["ckpt"]) for r in ok}, key=lambda k: (BACKENDS.index(k[0]), k[1]))
    opts = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in ok)]
    if not groups or not opts:
        return False
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / len(opts)
    for i, o in enumerate(opts):
        vals = []
        for g in groups:
            r = next((x for x in ok if (x["backend"], x["ckpt"]) == g and x["optimizer"] == o), None)
            vals.append(r["peak_max_gib"] if r else math.nan)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=o)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{b}\nckpt {'on' if c else 'off'}" for b, c in groups])
    ax.set_ylabel("peak GiB per rank (max over ranks)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="350m", choices=sorted(MODELS))
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke check: tiny model, seq 64, micro-batch 2, every backend and optimizer")
    ap.add_argument("--world", type=int, default=1, help="ranks (torchrun --nproc-per-node for > 1)")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {BACKENDS}")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {OPTIMIZERS}")
    ap.add_argument("--ckpt", default="both", choices=["off", "on", "both"], help="activation checkpointing")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=8, help="the issue's reference setting (8 x 1024)")
    ap.add_argument("--steps", type=int, default=2, help="training steps per configuration (peak over all)")
    ap.add_argument("--adamw-impl", default="fused", choices=["fused", "foreach"])
    ap.add_argument("--max-minutes", type=float, default=7.5, help="start no configuration after this")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="", help="file-name tag (default: the selection)")
    ap.add_argument("--print-reports", action="store_true", help="print memory_report's table per configuration")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if CUDA is available")
    ap.add_argument("--reanalyse", metavar="JSON", default=None,
                    help="recompute the ratios and prediction columns of a results file (no GPU) and print its table")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="merge results files of one setup (later files win per configuration; no GPU)")
    ap.add_argument("--merge-out", metavar="JSON", default=None, help="where --merge writes (and its PNG)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.seq, args.micro_batch = "tiny", 64, 2
    if args.merge and not args.merge_out:
        ap.error("--merge needs --merge-out")
    for name, allowed in (("backends", BACKENDS), ("optimizers", OPTIMIZERS)):
        chosen = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        bad = [x for x in chosen if x not in allowed]
        if bad:
            ap.error(f"--{name}: unknown {bad}; choose from {allowed}")
        setattr(args, name, chosen)
    return args


def reanalyse(path: Path) -> str:
    """Rewrite a results file's derived columns with this version's analysis; the measurements stay."""
    data = json.loads(Path(path).read_text())
    add_ratios(data["rows"])
    Path(path).write_text(json.dumps(data, indent=1))
    return table(data["rows"], data["world"])


def chart_title(meta: dict) -> str:
    return f"{meta['model']}, {meta['world']} x {meta['device']}, seq {meta['seq']}, mb {meta['micro_batch']}"


MERGE_KEYS = ("device", "world", "model", "seq", "micro_batch", "steps", "adamw_impl")


def merge(paths: list[Path], out: Path) -> str:
    """One results file from a grid split over invocations (--backends / --optimizers / --ckpt): a
    configuration measured in a later file replaces the same configuration of an earlier one unless the
    later one failed. The files must share the setup (``MERGE_KEYS``); ratios are recomputed."""
    files = [json.loads(Path(p).read_text()) for p in paths]
    first = files[0]
    for p, d in zip(paths[1:], files[1:]):
        differ = [k for k in MERGE_KEYS if d.get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"--merge: {p} differs from {paths[0]} in {differ}")
    rows: dict[tuple, dict] = {}
    for d in files:
        for r in d["rows"]:
            key = (r["backend"], r["ckpt"], r["optimizer"])
            if r.get("ok") or key not in rows:
                rows[key] = r
    order = {key: i for i, key in enumerate(itertools.product(BACKENDS, (False, True), OPTIMIZERS))}
    merged = sorted(rows.values(), key=lambda r: order.get((r["backend"], r["ckpt"], r["optimizer"]), 10**6))
    add_ratios(merged)
    meta = {k: v for k, v in first.items() if k != "rows"}
    meta["merged_from"] = [{"file": Path(p).name, "argv": d.get("argv"), "started": d.get("started")}
                           for p, d in zip(paths, files)]
    out.write_text(json.dumps({**meta, "rows": merged}, indent=1))
    plot(merged, out.with_suffix(".png"), chart_title(first))
    return table(merged, first["world"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reanalyse:
        print(reanalyse(Path(args.reanalyse)))
        return 0
    if args.merge:
        print(merge([Path(p) for p in args.merge], Path(args.merge_out)))
        return 0
    start = time.monotonic()
    device_type = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rank, world, device = init_distributed(args.world, device_type)
    if any(b.startswith("zero") for b in args.backends):
        import importlib
        import logging

        import deepspeed

        if device_type == "cpu":  # skip the JIT shared-memory op on the CPU accelerator
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.utils.logger.setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
    device_name = torch.cuda.get_device_name(device) if device_type == "cuda" else (platform.processor() or "cpu")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.ckpt]
    grid = [(b, c, o) for b in args.backends for c in ckpts for o in args.optimizers]
    tag = args.tag or "-".join(args.backends) + ("" if args.ckpt == "both" else f"-ckpt{args.ckpt}") + (
        "" if len(args.optimizers) == len(OPTIMIZERS) else "-" + "-".join(args.optimizers))
    out_dir = Path(args.out_dir)
    stem = f"memory_{args.model}_{slug(tag)}_{slug(device_name)}_w{world}"
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{len(grid)} configurations on {world} x {device_name}: model {args.model}, seq {args.seq}, "
              f"micro-batch {args.micro_batch}, {args.steps} steps each -> {json_path}", flush=True)
    import transformers

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    meta = {
        "device": device_name, "device_type": device_type, "world": world, "model": args.model,
        "model_shape": dict(zip(("hidden", "intermediate", "layers", "heads", "vocab"), MODELS[args.model])),
        "seq": args.seq, "micro_batch": args.micro_batch, "steps": args.steps, "precision": "fp32 params, bf16 autocast",
        "adamw_impl": args.adamw_impl, "torch": torch.__version__, "transformers": transformers.__version__,
        "deepspeed": ds_version, "argv": sys.argv, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "peak": "torch.cuda.max_memory_allocated net of memory allocated before the configuration"
                if device_type == "cuda" else "peak RSS of the process (not reset between configurations)",
    }
    rows: list[dict] = []
    for i, (backend, ckpt, opt_name) in enumerate(grid):
        elapsed = torch.tensor([time.monotonic() - start], dtype=torch.float64,
                               device=device if device_type == "cuda" else "cpu")
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # every rank takes the same decision
        if elapsed.item() > args.max_minutes * 60:
            rows += [{"backend": b, "ckpt": c, "optimizer": o, "ok": False, "error": "skipped: --max-minutes"}
                     for b, c, o in grid[i:]]
            break
        row = run_config(args, backend, ckpt, opt_name, device, world, rank)
        rows.append(row)
        if rank == 0:
            status = f"{max(row['peak_net_gib']):.2f} GiB" if row.get("ok") else row["error"]
            print(f"[{i + 1}/{len(grid)}] {backend} ckpt={'on' if ckpt else 'off'} {opt_name}: {status} "
                  f"({row['seconds']:.1f} s)", flush=True)
            add_ratios(rows)
            with open(json_path, "w") as f:
                json.dump({**meta, "elapsed_s": time.monotonic() - start, "rows": rows}, f, indent=1)
    if rank == 0:
        add_ratios(rows)
        print()
        print(f"peak memory per rank: {args.model}, {world} x {device_name}, seq {args.seq}, micro-batch "
              f"{args.micro_batch}, fp32 params + bf16 autocast; ratios to AdamW / SGD (no momentum) of the same "
              "backend and checkpointing; 'AdamW pred.' = AdamW peak predicted by memory_report from that run; "
              "'saving p/m' = predicted / measured saving against AdamW (target within 5%); 'target' = the peak "
              "this optimizer should stay under (stateless: 1.03 x SGD floor; AdamW fallback: 1.03 x (floor + its "
              "Adam state); SGD-SaI: 1.03 x SGD with momentum)")
        print(table(rows, world))
        meta["elapsed_s"] = time.monotonic() - start
        with open(json_path, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
        wrote = plot(rows, png_path, chart_title(meta))
        print(f"wrote {json_path}" + (f" and {png_path}" if wrote else " (no matplotlib: no PNG)"), flush=True)
    failed = sum(1 for r in rows if not r.get("ok") and not r.get("error", "").startswith(("skipped", "OOM")))
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
