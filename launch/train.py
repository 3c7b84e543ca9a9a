r"""Train a LLaMA-style causal LM with SWAN, SinkGD, SGD-SaI or AdamW, on one process, DDP, FSDP2 or
DeepSpeed: one entry point, driven by a config (launch/config.py).

    python launch/train.py --config configs/quickstart.yaml          # CPU: ~80 s on 2 cores, val loss ~3.75
    python -m launch.train -c configs/quickstart.yaml --optimizer adamw --training.steps=100
    torchrun --standalone --nproc-per-node 2 -m launch.train -c configs/quickstart.yaml --backend ddp
    torchrun --standalone --nproc-per-node 2 -m launch.train -c configs/quickstart.yaml --backend fsdp2
    torchrun --standalone --nproc-per-node 2 -m launch.train -c configs/quickstart.yaml --backend deepspeed \
        --backend.deepspeed_config configs/ds_zero2_swan.json       # "auto" values filled from our config
    python -m launch.train -c configs/quickstart.yaml --resume        # continue from the newest checkpoint
    bash launch/multinode.sh ...                                        # several nodes (see the script)

Order (torchtitan's): parse config -> process group -> data -> model -> apply_ddp / apply_fsdp2 /
apply_deepspeed -> optimizer built *after* wrapping (``stateless_opt.param_groups`` on the wrapped
model: FSDP2 DTensors, DDP's process group for SWAN's split whitening) -> LR schedule -> [resume] ->
loop. Rank 0 writes ``<run dir>/config.yaml`` (the resolved config), ``metrics.jsonl``,
``summary.json`` and ``loss.png``; checkpoints go to ``<run dir>/checkpoints`` (launch/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/train.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

import stateless_opt
from stateless_opt import registry
from stateless_opt.optimizer import StatelessOptimizer
from launch import checkpoint as ckpt
from launch import data as data_mod
from launch.config import REPO_ROOT, ConfigError, TrainConfig, describe, dump, load_config, parse_cli
from launch.model import build_model, count_params

# --------------------------------------------------------------------------- process group
@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device


def init_distributed(cfg: TrainConfig) -> Env:
    """Read torchrun's environment; start the process group for ddp/fsdp2/deepspeed."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = cfg.backend.name
    if backend == "single" and world > 1:
        raise ConfigError(f"backend.name=single under a launcher with WORLD_SIZE={world}: use --backend ddp or fsdp2")
    want_cuda = cfg.training.device == "cuda" or (cfg.training.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("training.device=cuda but no CUDA device is visible")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg.training.threads or max(1, (os.cpu_count() or 1) // local_world))
    if cfg.training.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if backend != "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # a plain `python -m launch.train` = 1 rank
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        pg = cfg.backend.dist_backend
        pg = ("nccl" if want_cuda else "gloo") if pg == "auto" else pg
        timeout = datetime.timedelta(minutes=cfg.backend.timeout_min)
        if backend == "deepspeed":
            if not want_cuda:
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
                # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (a C++ build of
                # ~1 min) when the process group starts; gloo does the same job, so skip the build.
                import importlib

                importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
            import deepspeed

            deepspeed.init_distributed(dist_backend=pg, timeout=timeout)
        else:
            dist.init_process_group(pg, timeout=timeout, device_id=device if want_cuda else None)
    return Env(rank, world, local_rank, local_world, device)


def close_distributed() -> None:
    # The barrier keeps one rank from tearing down gloo while its peer still has a collective in
    # flight (seen as "terminate called without an active exception" / SIGABRT at exit).
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- parallelisms
def apply_ddp(model: torch.nn.Module, device: torch.device, group=None):
    """Replicate; gradients all-reduced (averaged) by DDP. Buffers (RoPE tables) are constants."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group,
               broadcast_buffers=False)


def apply_fsdp2(model: torch.nn.Module, mesh, reshard_after_forward: bool = True):
    """FSDP2: each decoder block is one unit (gathered for its forward/backward), the root holds the
    embedding, final norm and LM head. Weights become Shard(0) DTensors."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def deepspeed_json(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with every ``"auto"`` filled from our config (batch sizes, clipping, bf16, the
    optimizer's hyper-parameters); a concrete value that contradicts our config is an error, so one
    config file decides each number."""
    path = Path(cfg.backend.deepspeed_config)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.exists():
        raise ConfigError(f"backend.deepspeed_config: file not found: {cfg.backend.deepspeed_config}")
    raw = json.loads(path.read_text())
    t = cfg.training
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": float(t.grad_clip),
        "bf16.enabled": cfg.model.dtype == "bfloat16" or t.autocast == "bfloat16",
    }
    opt = raw.get("optimizer")
    if opt is not None:
        ds_type = str(opt.get("type", "")).lower()
        if ds_type != cfg.optimizer.name:
            raise ConfigError(
                f"{path}: its optimizer type is {opt.get('type')!r} but optimizer.name={cfg.optimizer.name!r}; "
                f"pass --optimizer {ds_type} (its hyper-parameters come from optimizer.{ds_type}) or another JSON"
            )
        hp = cfg.optimizer.selected().model_dump()
        for key in opt.get("params", {}):
            if key in hp:
                ours[f"optimizer.params.{key}"] = list(hp[key]) if isinstance(hp[key], tuple) else hp[key]

    def lookup(tree: dict, dotted: str):
        node = tree
        for k in dotted.split("."):
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    for key, value in ours.items():
        given = lookup(raw, key)
        if given is None or given == "auto":
            continue
        same = (
            math.isclose(float(given), float(value), rel_tol=1e-9)
            if isinstance(given, (int, float)) and not isinstance(given, bool) and isinstance(value, (int, float))
            else given == value
        )
        if not same and not (key == "gradient_clipping" and not t.grad_clip):
            raise ConfigError(
                f'{path}: {key}={given!r} contradicts the training config ({value!r}); set it to "auto" in the '
                "JSON or change the training config"
            )
    from stateless_opt.integrations.deepspeed import fill_auto

    ds = fill_auto(raw, {k: v for k, v in ours.items()})
    if lookup(raw, "train_micro_batch_size_per_gpu") is None:
        ds["train_micro_batch_size_per_gpu"] = t.batch_size
    if lookup(raw, "gradient_accumulation_steps") is None:
        ds["gradient_accumulation_steps"] = t.grad_accum
    if lookup(raw, "train_batch_size") is None:
        ds["train_batch_size"] = ours["train_batch_size"]
    if lookup(raw, "gradient_clipping") is None and t.grad_clip:
        ds["gradient_clipping"] = float(t.grad_clip)
    return ds


def apply_deepspeed(model: torch.nn.Module, cfg: TrainConfig, env: "Env", build_optimizer_fn, scheduler_fn):
    """``deepspeed.initialize`` with the JSON of ``backend.deepspeed_config``. Its ``"optimizer"`` block
    (our types are registered by ``stateless_opt.integrations.deepspeed``) builds the optimizer on our
    param groups; without one, the optimizer comes from our config (``optimizer=``)."""
    try:
        import stateless_opt.integrations.deepspeed  # noqa: F401  (registers SWAN/SinkGD/SGDSaI JSON types)
    except ImportError as err:
        raise RuntimeError(
            "backend.name=deepspeed needs `stateless_opt.integrations.deepspeed` (the ZeRO layouts and the JSON "
            f"registration), which could not be imported: {err}. Install the package (`pip install -e .` maps "
            "integrations/ to stateless_opt.integrations) or use --backend ddp / fsdp2."
        ) from err
    import deepspeed

    ds = deepspeed_json(cfg, env.world)
    groups = stateless_opt.param_groups(model, fallback_weight_decay=cfg.optimizer.fallback_weight_decay)
    if cfg.optimizer.name == "adamw":  # DeepSpeed's own AdamW (JSON "optimizer" block) keeps group LRs too
        groups = adamw_groups(groups, cfg.optimizer.adamw.lr * cfg.optimizer.adamw.fallback_lr_ratio)
    kwargs: dict[str, Any] = {"model": model, "config": ds, "lr_scheduler": scheduler_fn}
    if "optimizer" in ds:
        kwargs["model_parameters"] = groups
    else:
        kwargs["optimizer"] = build_optimizer_fn(groups)
    engine, optimizer, _, scheduler = deepspeed.initialize(**kwargs)
    return engine, optimizer, scheduler


# --------------------------------------------------------------------------- optimizer + schedule
def build_optimizer(cfg: TrainConfig, model_or_groups) -> torch.optim.Optimizer:
    """The paper grouping (``stateless_opt.param_groups``: embeddings, head and 1-D tensors to the
    fallback) for every optimizer, AdamW included, so they differ only in the update rule."""
    o = cfg.optimizer
    groups = (
        model_or_groups
        if isinstance(model_or_groups, list)
        else stateless_opt.param_groups(model_or_groups, fallback_weight_decay=o.fallback_weight_decay)
    )
    hp = o.selected().model_dump()
    if o.name == "adamw":
        groups = adamw_groups(groups, hp["lr"] * hp["fallback_lr_ratio"])
        return torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    lr = hp.pop("lr")
    return registry.lookup(o.name).cls(groups, lr=lr, **hp)


def adamw_groups(groups: list[dict], fallback_lr: float) -> list[dict]:
    """AdamW's groups with the fallback group (``param_groups``' rule "fallback") at its own LR; the
    schedule scales every group's LR by the same factor, so the ratio holds throughout."""
    return [{**g, "lr": fallback_lr} if g.get("rule") == "fallback" else g for g in groups]


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to the peak over ``warmup_steps`` then cosine to ``min_lr_ratio * peak``."""
    t = cfg.training
    warm, total, floor = t.warmup_steps, t.steps, t.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


# --------------------------------------------------------------------------- reporting
def base_optimizer(optimizer):
    """Our (or torch's) optimizer inside DeepSpeed's ZeRO / bf16 wrappers."""
    seen = 0
    while not isinstance(optimizer, StatelessOptimizer) and seen < 4:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if ckpt._is_dtensor(t) else t


def memory_numbers(model: torch.nn.Module, optimizer, env: Env) -> dict[str, int]:
    """This rank's bytes: parameters and gradients held here (local shards under FSDP2), optimizer
    state tensors, peak / current RSS and (CUDA) peak allocated."""
    import psutil

    seen, pbytes, gbytes = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        loc = _local(p)
        pbytes += loc.numel() * loc.element_size()
        if p.requires_grad:
            gbytes += loc.numel() * loc.element_size()
    base = base_optimizer(optimizer)
    sbytes = 0
    for st in base.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                loc = _local(v)
                sbytes += loc.numel() * loc.element_size()
    out = {
        "rank": env.rank,
        "param_bytes": pbytes,
        "grad_bytes": gbytes,
        "optimizer_state_bytes": sbytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_bytes": psutil.Process().memory_info().rss,
    }
    if env.device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(env.device)
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:10.2f}"


def format_memory(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "rank"]
    head = "rank " + " ".join(f"{k.replace('_bytes', '') + ' MiB':>18}" for k in keys)
    lines = [head] + [f"{r['rank']:>4} " + " ".join(f"{_mib(r[k]):>18}" for k in keys) for r in rows]
    return "\n".join(lines)


def plot_losses(metrics_path: Path, out_path: Path, title: str, meta: dict | None = None) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no loss.png (pip install 'stateless-opt[plot]' or matplotlib)"
    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "train_loss" in rec:
            train.append((rec["step"], rec["train_loss"]))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, lw=0.8, alpha=0.5, label="train (per step)")
        k = max(1, len(ys) // 30)
        if k > 1:
            smooth = [sum(ys[max(0, i - k + 1): i + 1]) / len(ys[max(0, i - k + 1): i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, lw=1.6, label=f"train (running mean of {k})")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", lw=1.6, label="validation")
    if meta:
        ax.axhline(meta["unigram_entropy_train"], color="gray", ls="--", lw=1, label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return f"loss curve: {out_path}"


# --------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, env: Env):
        self.cfg, self.env = cfg, env
        self.run_dir = cfg.run_dir
        self.is_main = env.rank == 0
        self.log(f"[run] {self.run_dir}  backend={cfg.backend.name} world={env.world} device={env.device} "
                 f"threads={torch.get_num_threads()}")
        self.data = self._data()
        model = build_model(cfg.model, self.data.vocab_size, env.device, seed=cfg.training.seed)
        self.params = count_params(model)
        self.log(f"[model] LLaMA {cfg.model.preset}: {self.params['total'] / 1e6:.2f}M parameters "
                 f"({self.params['non_embedding'] / 1e6:.2f}M outside embedding/head), vocab {self.data.vocab_size}, "
                 f"dtype {cfg.model.dtype}")
        self.engine = None
        self.scheduler = None
        backend = cfg.backend.name
        if backend == "ddp":
            self.model = apply_ddp(model, env.device)
            self.optimizer = build_optimizer(cfg, self.model)  # the DDP model: SWAN splits whitening over ranks
        elif backend == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(env.device.type, (env.world,), mesh_dim_names=("dp",))
            self.model = apply_fsdp2(model, mesh, cfg.backend.reshard_after_forward)
            self.optimizer = build_optimizer(cfg, self.model)
        elif backend == "deepspeed":
            self.engine, self.optimizer, self.scheduler = apply_deepspeed(
                model, cfg, env, lambda groups: build_optimizer(cfg, groups),
                lambda opt: make_scheduler(cfg, opt),
            )
            self.model = self.engine
        else:
            self.model = model
            self.optimizer = build_optimizer(cfg, model)
        if self.scheduler is None:
            self.scheduler = make_scheduler(cfg, self.optimizer)
        self._log_optimizer()
        self.start_step = 0
        if cfg.checkpoint.resume:
            path = ckpt.resolve(cfg.checkpoint.resume, cfg.checkpoint_dir)
            self.start_step = ckpt.load(
                path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, backend=backend,
                rank=env.rank, world=env.world, engine=self.engine,
            )
            self.log(f"[resume] from {path} at step {self.start_step}")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if self.is_main:
            self._start_files()

    # ------------------------------------------------------------------ setup helpers
    def log(self, msg: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _data(self) -> data_mod.PreparedData:
        d = self.cfg.data
        args = (d.corpus, d.vocab_size, d.val_fraction, d.cache_dir)
        if self.env.local_rank == 0:  # one writer per node (the cache may be node-local)
            data = data_mod.prepare(*args, verbose=False)
        self._barrier()
        if self.env.local_rank != 0:
            data = data_mod.prepare(*args, verbose=False)
        self.log(f"[data] {data.summary()}")
        if d.max_train_tokens:
            self.log(f"[data] sampling training windows from the first {d.max_train_tokens:,} tokens only")
        return data

    def _log_optimizer(self) -> None:
        o = self.cfg.optimizer
        hp = o.selected()
        base = base_optimizer(self.optimizer)
        counts = base.rule_counts() if hasattr(base, "rule_counts") else None
        extra = (f", fallback lr {hp.lr * hp.fallback_lr_ratio:g} ({getattr(hp, 'fallback', o.name)})"
                 if hasattr(hp, "fallback_lr_ratio") else "")
        self.log(f"[optimizer] {o.name}: lr {hp.lr:g}{extra}, weight decay {hp.weight_decay:g}"
                 + (f"; tensors per rule {counts}" if counts else ""))
        t = self.cfg.training
        self.log(f"[schedule] {t.steps} steps, warm-up {t.warmup_steps}, cosine to {t.min_lr_ratio:g} x peak; "
                 f"global batch {self.global_batch} x {self.cfg.data.seq_len} tokens")

    @property
    def global_batch(self) -> int:
        t = self.cfg.training
        return t.batch_size * t.grad_accum * self.env.world

    def _start_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(dump(self.cfg), sort_keys=False))
        keep = []
        if self.start_step and self.metrics_path.exists():  # drop what the resumed part will redo
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if json.loads(ln)["step"] <= self.start_step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    def _record(self, rec: dict) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ loss / eval
    def _autocast(self):
        if self.cfg.training.autocast == "bfloat16" and self.engine is None:  # DeepSpeed: its bf16 mode
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        with self._autocast():
            logits = self.model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), reduction=reduction)

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.env.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.env.world
        return values

    @torch.no_grad()
    def evaluate(self) -> float:
        t, env = self.cfg.training, self.env
        # eval_batches per rank, so every rank runs the same number of forwards (FSDP2/ZeRO-3 need that)
        # and the windows are the same set whatever the world size (batch_size x world is global).
        batches = t.eval_batches * env.world
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        self.model.eval()
        for x, y in data_mod.val_batches(
            self.data.val, num_batches=batches, batch_size=t.eval_batch_size or t.batch_size,
            seq_len=self.cfg.data.seq_len, rank=env.rank, world=env.world,
        ):
            loss = self._loss(x.to(env.device), y.to(env.device), reduction="sum")
            total[0] += loss.double()
            total[1] += y.numel()
        self.model.train()
        if dist.is_initialized() and env.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> float:
        t, env, cfg = self.cfg.training, self.env, self.cfg
        losses = []
        for micro in range(t.grad_accum):
            x, y = data_mod.train_batch(
                self.data.train, step * t.grad_accum + micro, rank=env.rank, world=env.world,
                batch_size=t.batch_size, seq_len=cfg.data.seq_len, seed=t.seed, max_tokens=cfg.data.max_train_tokens,
            )
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            last = micro == t.grad_accum - 1
            if self.engine is not None:
                loss = self._loss(x, y)
                self.engine.backward(loss)
                self.engine.step()
            else:
                sync = self.model.no_sync() if (cfg.backend.name == "ddp" and not last) else contextlib.nullcontext()
                with sync:
                    loss = self._loss(x, y)
                    (loss / t.grad_accum).backward()
            losses.append(loss.detach())
        if self.engine is None:
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(self._mean_over_ranks(torch.stack(losses).mean()))

    # ------------------------------------------------------------------ loop
    def _progress(self):
        from tqdm import tqdm

        mode = self.cfg.training.progress
        on = self.is_main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        bar = tqdm(total=self.cfg.training.steps, initial=self.start_step, disable=not on, dynamic_ncols=True,
                   desc=f"{self.cfg.optimizer.name}/{self.cfg.backend.name}", unit="step", mininterval=0.5)
        return bar, on

    def _save(self, step: int) -> None:
        meta = {"optimizer": self.cfg.optimizer.name, "config": dump(self.cfg)}
        path = ckpt.save(
            self.cfg.checkpoint_dir, step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            backend=self.cfg.backend.name, rank=self.env.rank, world=self.env.world, meta_extra=meta,
            keep=self.cfg.checkpoint.keep, engine=self.engine,
        )
        self.log(f"[checkpoint] step {step}: {path}")

    def train(self) -> dict:
        cfg, t, env = self.cfg, self.cfg.training, self.env
        tokens_per_step = self.global_batch * cfg.data.seq_len
        bar, bar_on = self._progress()
        t_start = time.perf_counter()
        rate, last_val, losses = None, None, []
        if self.start_step == 0 and t.eval_every:
            last_val = self.evaluate()
            self._record({"step": 0, "val_loss": last_val})
            self.log(f"[eval] step 0: val loss {last_val:.4f}")
        for step in range(self.start_step, t.steps):
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step(step)
            dt = time.perf_counter() - t0
            rate = tokens_per_step / dt if rate is None else 0.9 * rate + 0.1 * tokens_per_step / dt
            losses.append(loss)
            done = step + 1
            self._record({"step": done, "train_loss": loss, "lr": lr, "tokens": done * tokens_per_step,
                          "step_time_s": round(dt, 5), "tokens_per_s": round(tokens_per_step / dt, 1)})
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {done}")
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if not bar_on and (done % t.log_every == 0 or done == t.steps):
                self.log(f"step {done:>6}/{t.steps}  loss {loss:.4f}  lr {lr:.3e}  {rate:,.0f} tok/s  "
                         f"{time.perf_counter() - t_start:.0f}s")
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                last_val = self.evaluate()
                self._record({"step": done, "val_loss": last_val})
                self.log(f"[eval] step {done}: val loss {last_val:.4f}")
            if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or (cfg.checkpoint.final and done == t.steps):
                self._save(done)
        bar.close()
        if last_val is None:  # resumed at (or past) the last step: still report where the model stands
            last_val = self.evaluate()
        wall = time.perf_counter() - t_start
        return self._finish(losses, last_val, wall, tokens_per_step)

    def _finish(self, losses: list[float], val: float | None, wall: float, tokens_per_step: int) -> dict:
        cfg, env = self.cfg, self.env
        done_steps = len(losses)
        meta = self.data.meta
        summary = {
            "backend": cfg.backend.name,
            "optimizer": cfg.optimizer.name,
            "world_size": env.world,
            "device": str(env.device),
            "steps": cfg.training.steps,
            "steps_this_run": done_steps,
            "params": self.params,
            "first_train_loss": losses[0] if losses else None,
            "final_train_loss": losses[-1] if losses else None,
            "final_train_loss_mean10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "final_val_loss": val,
            "unigram_entropy": meta["unigram_entropy_train"],
            "unigram_val_loss": meta["unigram_val_loss"],
            "wall_time_s": round(wall, 2),
            "tokens_per_s": round(done_steps * tokens_per_step / wall, 1) if wall > 0 else None,
            "train_losses": losses,
        }
        rows = [memory_numbers(self.model, self.optimizer, env)]
        if dist.is_initialized() and env.world > 1:
            gathered: list[Any] = [None] * env.world
            dist.all_gather_object(gathered, rows[0])
            rows = gathered
        summary["memory"] = rows
        if self.is_main:
            beat = val is not None and val < meta["unigram_entropy_train"]
            train_txt = (f"train loss {summary['final_train_loss_mean10']:.4f} (mean of last {min(10, done_steps)})"
                         if losses else "no steps left to run")
            self.log(
                f"[done] {done_steps} steps in {wall:.1f}s ({summary['tokens_per_s'] or 0:,.0f} tok/s): {train_txt}, "
                f"val loss {val:.4f}; unigram entropy {meta['unigram_entropy_train']:.4f} -> "
                f"{'below' if beat else 'NOT below'} the unigram baseline"
            )
        report = getattr(stateless_opt, "memory_report", None)
        if self.is_main and report is None:
            self.log("[memory] per rank (params/grads/optimizer state are this rank's local tensors)\n"
                     + format_memory(rows))
        if report is not None:  # the library's accounting (AdamW comparison), when it is exported
            try:
                full = report(
                    self.model, self.optimizer,
                    backend="auto" if cfg.backend.name == "deepspeed" else cfg.backend.name,
                    print_table=self.is_main, json_path=str(self.run_dir / "memory_report.json") if self.is_main else None,
                )
                summary["memory_report"] = full.get("summary", full) if isinstance(full, dict) else full
            except Exception as err:  # a later issue's API: never fail the run over the report
                summary["memory_report_error"] = repr(err)
                self.log(f"[memory] stateless_opt.memory_report failed ({err!r}); plain numbers per rank:\n"
                         + format_memory(rows))
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            if cfg.run.plot:
                self.log(f"[plot] {plot_losses(self.metrics_path, self.run_dir / 'loss.png', self._title(), meta)}")
        return summary

    def _title(self) -> str:
        c = self.cfg
        return f"LLaMA {c.model.preset} on {c.data.corpus}: {c.optimizer.name}, {c.backend.name} x{self.env.world}"


# --------------------------------------------------------------------------- entry
def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig | None, dict]:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides, flags = parse_cli(argv)
    if flags.get("help"):
        print(__doc__)
        print("Fields (set with --section.key=value):")
        print(describe())
        return None, flags
    return load_config(path, dict(overrides) if overrides else None), flags


def main(argv: list[str] | None = None) -> dict | None:
    try:
        cfg, flags = parse_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg is None:
        return None
    if flags["print_config"]:
        print(yaml.safe_dump(dump(cfg), sort_keys=False))
        return None
    env = init_distributed(cfg)
    try:
        trainer = Trainer(cfg, env)
        return trainer.train()
    finally:
        close_distributed()


def _exit_fast_after_distributed_run() -> None:
    """Leave without C++ static destructors once a multi-process run has finished and flushed.

    With gloo, a rank sometimes aborts at interpreter exit ("terminate called without an active
    exception", SIGABRT) after the run completed and the process group was destroyed: a c10d worker
    thread outlives its group because DeviceMesh/DeepSpeed still reference it. The work is done and
    written by then, so we skip the destructors instead of turning a finished run into a failure.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
    _exit_fast_after_distributed_run()
