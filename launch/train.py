r"""Train a LLaMA-style causal LM with SWAN, SinkGD, SGD-SaI or AdamW, on one process, DDP, FSDP2 or
DeepSpeed: one entry point, driven by a config (launch/config.py).

    stateless-opt-train -c configs/quickstart.yaml                      # CPU: ~2 min on 2 cores, val loss 3.74
    stateless-opt-train -c configs/quickstart.yaml --optimizer sinkgd   # -> runs/quickstart-sinkgd
    stateless-opt-train -c configs/quickstart.yaml --training.steps=20  # warm-up: 10% of the steps
    torchrun --standalone --nproc-per-node 2 -m stateless_opt.launch.train -c configs/quickstart.yaml --backend ddp
    torchrun --standalone --nproc-per-node 2 -m stateless_opt.launch.train -c configs/quickstart.yaml --backend fsdp2
    torchrun --standalone --nproc-per-node 2 -m stateless_opt.launch.train -c configs/quickstart.yaml --backend deepspeed
    stateless-opt-compare runs/quickstart-swan runs/quickstart-sinkgd    # curves in one picture + a table
    bash launch/multinode.sh ...                                         # several nodes (see the script)

(``python -m launch.train`` in a checkout is the same program.) DeepSpeed reads
``configs/ds_zero2_<optimizer>.json`` unless ``--backend.deepspeed_config`` names another JSON; its
``"auto"`` values are filled from this config. Without torchrun, ``--backend ddp|fsdp2|deepspeed`` runs
one rank.

Each run has its folder, ``runs/<run.name>-<optimizer>[-<backend>]`` (or ``run.dir``): ``config.yaml``
(the resolved config), ``metrics.jsonl`` (appended by every attempt, never truncated), ``summary.json``,
``loss.png``, ``memory_report.json`` and ``checkpoints/``. A relaunch of the same command resumes from the
newest complete checkpoint (``--resume auto``, the default; also under ``torchrun --max-restarts N``,
and at another backend, world size or ZeRO stage through the portable format: ``checkpoint.format``),
or says the run is complete; a folder or checkpoint of another run (other optimizer, model, data or
schedule) is refused, never mixed. Ctrl-C stops with "interrupted at step N" and how to resume.

Order (torchtitan's): parse config -> process group -> what to resume -> data -> model -> apply_ddp /
apply_fsdp2 / apply_deepspeed -> optimizer built *after* wrapping (``stateless_opt.param_groups`` on the
wrapped model: FSDP2 DTensors, DDP's process group for SWAN's split whitening) -> LR schedule ->
[resume] -> loop.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python launch/train.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "launch"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from torch.distributed.tensor.parallel import ParallelStyle  # noqa: E402

import stateless_opt  # noqa: E402
from stateless_opt import registry  # noqa: E402
from stateless_opt.optimizer import StatelessOptimizer  # noqa: E402

from . import checkpoint as ckpt  # noqa: E402
from . import data as data_mod  # noqa: E402
from . import runs  # noqa: E402
from .compare import Run, plot  # noqa: E402
from .config import (  # noqa: E402
    ConfigError, TrainConfig, UserError, describe, dump, load_config, parse_cli, run_differences,
)
from .env import deepspeed_on_cpu, one_process_env, under_launcher  # noqa: E402
from .model import build_model, count_params  # noqa: E402

# --------------------------------------------------------------------------- process group
@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device


def init_distributed(cfg: TrainConfig) -> Env:
    """Read the launcher's environment; start the process group for ddp/fsdp2/deepspeed (one rank,
    with what a launcher would set, when there is no launcher)."""
    backend = cfg.backend.name
    if backend != "single" and not under_launcher():
        one_process_env()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if backend == "single" and world > 1:
        raise ConfigError(f"backend.name=single under a launcher with WORLD_SIZE={world}: use --backend ddp or fsdp2")
    cfg.check_world(world)
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
        pg = cfg.backend.dist_backend
        pg = ("nccl" if want_cuda else "gloo") if pg == "auto" else pg
        timeout = datetime.timedelta(minutes=cfg.backend.timeout_min)
        if backend == "deepspeed":
            _require_deepspeed()
            if not want_cuda:
                deepspeed_on_cpu()
            import deepspeed
        store = _attempt_store(world, timeout)
        kwargs = {"store": store, "rank": rank, "world_size": world} if store is not None else {}
        dist.init_process_group(pg, timeout=timeout, device_id=device if want_cuda else None, **kwargs)
        if backend == "deepspeed":
            deepspeed.init_distributed(dist_backend=pg, timeout=timeout)  # adopts the group started above
    return Env(rank, world, local_rank, local_world, device)


def _attempt_store(world: int, timeout: datetime.timedelta):
    """Under torchrun with one agent, the agent's store with a prefix per restart; else None (torch's
    ``env://``). torchrun keeps one TCPStore for all restarts of its workers (its c10d rendezvous shares
    it since torch 2.5, the static one always did), so a restarted gloo/NCCL group could read the
    previous attempt's addresses and fail to connect (pytorch#135712); every worker of one agent has
    the same TORCHELASTIC_RESTART_COUNT, so it names a fresh key space. Several agents (nodes) count
    restarts separately: there, torchrun needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (launch/multinode.sh
    sets it when MAX_RESTARTS > 0)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and _is_main_process():
            print("[run] note: torchrun --max-restarts over several nodes reuses one store across restarts "
                  "(pytorch#135712): set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (launch/multinode.sh "
                  "does)", file=sys.stderr, flush=True)
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"stateless_opt/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def close_distributed(clean: bool) -> None:
    """Destroy the process group. After a completed run, a barrier first, so no rank tears gloo down
    while a peer still has a collective in flight; after an error or interrupt, no barrier (a peer may
    be gone)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------- parallelisms
def apply_ddp(model: torch.nn.Module, device: torch.device, group=None):
    """Replicate; gradients all-reduced (averaged) by DDP. Buffers (RoPE tables) are constants, the same
    on every rank: no sync in forward (torch 2.13 renamed the flag; 2.11 has only the old name)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group, **no_sync)


def apply_fsdp2(model: torch.nn.Module, mesh, reshard_after_forward: bool = True):
    """FSDP2: each decoder block is one unit (gathered for its forward/backward), the root holds the
    embedding, final norm and LM head. Weights become Shard(0) DTensors."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def apply_tp(model: torch.nn.Module, tp_mesh) -> torch.nn.Module:
    """Tensor parallelism over ``tp_mesh`` (Megatron's split, as torchtitan's ``apply_tp``): q/k/v and
    gate/up colwise (``Shard(0)``: each rank computes its heads and its slice of the MLP), o_proj and
    down_proj rowwise (``Shard(1)``: partial sums all-reduced), the embedding vocabulary-parallel and the
    LM head colwise (``Shard(0)`` over the vocabulary, logits gathered). Activations between blocks stay
    whole on every TP rank (no sequence parallelism: transformers' LLaMA derives positions and the causal
    mask from the sequence length it sees), so the RMSNorm weights become ``Replicate`` DTensors: one
    weight with copies on the TP ranks for the optimizer, the memory report and the checkpoints. The
    MLP keeps DTensor outputs, so an intermediate size TP does not divide splits unevenly (1.3b: 5461)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    colwise, rowwise = ColwiseParallel(), RowwiseParallel()
    plan: dict[str, Any] = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "model.norm": ReplicatedWeights(),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    for i in range(len(model.model.layers)):
        block = f"model.layers.{i}"
        plan |= {f"{block}.input_layernorm": ReplicatedWeights(),
                 f"{block}.post_attention_layernorm": ReplicatedWeights(),
                 **{f"{block}.self_attn.{w}": colwise for w in ("q_proj", "k_proj", "v_proj")},
                 f"{block}.self_attn.o_proj": rowwise,
                 **{f"{block}.mlp.{w}": ColwiseParallel(use_local_output=False) for w in ("gate_proj", "up_proj")},
                 f"{block}.mlp.down_proj": rowwise}
    return parallelize_module(model, tp_mesh, plan)


class ReplicatedWeights(ParallelStyle):
    """A TP style for a module that runs whole on every TP rank (the RMSNorms): its weights become
    ``Replicate`` DTensors on the TP mesh, its input and output stay plain tensors."""

    def _apply(self, module: torch.nn.Module, device_mesh) -> torch.nn.Module:
        from torch.distributed.tensor import DTensor, Replicate, distribute_module

        def to_dtensor(mod, inputs, mesh):
            return tuple(DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
                         if torch.is_tensor(x) and not isinstance(x, DTensor) else x for x in inputs)

        def to_local(mod, output, mesh):
            return output.to_local() if isinstance(output, DTensor) else output

        return distribute_module(module, device_mesh, None, to_dtensor, to_local)  # None: replicate the weights


def _require_deepspeed() -> None:
    try:
        import stateless_opt.integrations.deepspeed  # noqa: F401  (registers SWAN/SinkGD/SGDSaI JSON types)
    except ImportError as err:
        raise UserError(f"backend.name=deepspeed: {err}") from None


def deepspeed_json(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with every ``"auto"`` filled from our config (batch sizes, clipping, bf16, the
    optimizer's hyper-parameters); a concrete value that contradicts our config is an error, so one
    config file decides each number."""
    path = cfg.deepspeed_config_path()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"backend.deepspeed_config: {path} is not valid JSON: {err}") from None
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
    """``deepspeed.initialize`` with the JSON of ``cfg.deepspeed_config_path()``. Its ``"optimizer"`` block
    (our types are registered by ``stateless_opt.integrations.deepspeed``) builds the optimizer on our
    param groups; without one, the optimizer comes from our config (``optimizer=``)."""
    _require_deepspeed()
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
    """Linear warm-up to the peak over ``training.warmup`` steps then cosine to ``min_lr_ratio * peak``."""
    t = cfg.training
    warm, total, floor = t.warmup, t.steps, t.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(cfg: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def reposition(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put a fresh schedule at ``step`` (resuming with ``checkpoint.allow_changes``: the LRs follow this
    config, not the checkpoint's)."""
    scheduler.last_epoch = step
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


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


def memory_note(summary: dict, params: dict, optimizer: str) -> str:
    """Why the saving against AdamW is what it is on this run (printed under the memory table)."""
    mib = 1024
    line = (f"[memory] {optimizer} saves {summary['saving_pct']:.1f}% of this peak ({summary['max_peak_gib'] * mib:.0f} "
            f"MiB): its state is {summary['state_gib_all_ranks'] * mib:.1f} MiB against AdamW's "
            f"{summary['adamw_state_gib_all_ranks'] * mib:.1f} MiB (all ranks)")
    if optimizer in ("swan", "sinkgd"):
        share = params["embedding_and_head"] / params["total"]
        line += (f"; the embedding and LM head, {share:.0%} of this model's parameters, keep the AdamW fallback "
                 "(fallback=\"stateless\" drops that state too)")
    if summary["device"] == "cpu":
        line += "; on the CPU the peak is the process's RSS, mostly the Python/torch runtime and activations"
    return line + ". Large models on GPUs save far more (README: Memory report, Measured)."


# --------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, env: Env):
        self.cfg, self.env = cfg, env
        self.run_dir = cfg.run_dir
        self.is_main = env.rank == 0
        self.step = 0  # steps completed
        self.saved_step: int | None = None  # the newest complete checkpoint of this run
        self.memory: dict | None = None
        self.log(f"[run] {self.run_dir}  backend={cfg.backend.name} world={env.world} device={env.device} "
                 f"threads={torch.get_num_threads()}")
        resume_from, notes = self._agree(lambda: runs.plan(cfg, env.world) if self.is_main else None)
        for note in notes:
            self.log(f"[run] {note}")
        self.data = self._data()
        random.seed(cfg.training.seed)  # every RNG from the seed (torch's: build_model), so checkpoints
        np.random.seed(cfg.training.seed)  # of two runs with the same seed are equal, RNG states included
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
            self.model = self._parallelize(model)
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
        self.parts = ckpt.Parts(self.model, self.optimizer, self.scheduler, backend, env.rank, env.world, self.engine,
                                tp=cfg.backend.tp)
        self.start_step, self.time_offset = 0, 0.0
        if resume_from is not None:
            self._resume(Path(resume_from))
        self.metrics_path = self.run_dir / runs.METRICS
        if self.is_main:
            runs.start(self.run_dir, cfg, {"step": self.start_step, "world_size": env.world,
                                           "resumed_from": str(resume_from) if resume_from else None,
                                           "time": datetime.datetime.now().isoformat(timespec="seconds")})

    # ------------------------------------------------------------------ setup helpers
    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: the ranks of one TP group (``tp`` consecutive ranks, the
        mesh's inner dim) read the same batch."""
        return self.env.rank // self.cfg.backend.tp

    @property
    def dp_world(self) -> int:
        return self.env.world // self.cfg.backend.tp

    def _parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 over all ranks, or with ``backend.tp`` > 1 a ("dp", "tp") mesh: TP inside each group of
        tp consecutive ranks, FSDP2 across the groups (none when there is one group), as torchtitan."""
        from torch.distributed.device_mesh import init_device_mesh

        env, tp = self.env, self.cfg.backend.tp
        if tp == 1:
            mesh = init_device_mesh(env.device.type, (env.world,), mesh_dim_names=("dp",))
            return apply_fsdp2(model, mesh, self.cfg.backend.reshard_after_forward)
        mesh = init_device_mesh(env.device.type, (self.dp_world, tp), mesh_dim_names=("dp", "tp"))
        apply_tp(model, mesh["tp"])
        self.log(f"[parallel] mesh dp {self.dp_world} x tp {tp}: tensor parallel inside each group of {tp} ranks"
                 + (", FSDP2 across them" if self.dp_world > 1 else " (one group: no FSDP2)"))
        if self.dp_world > 1:
            apply_fsdp2(model, mesh["dp"], self.cfg.backend.reshard_after_forward)
        return model

    def log(self, msg: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _agree(self, fn):
        """Run ``fn`` on rank 0 and hand its result, or its ``UserError``, to every rank (rank 0's view of
        the run folder decides; other nodes may see a shared filesystem late)."""
        result: list[Any] = [None]
        if self.is_main:
            try:
                result[0] = ("ok", fn())
            except UserError as err:
                result[0] = ("error", str(err))
        if dist.is_initialized() and self.env.world > 1:
            dist.broadcast_object_list(result, src=0)
        kind, value = result[0]
        if kind == "error":
            raise UserError(value)
        return value

    def _all_ok(self, fn) -> None:
        """Run ``fn`` on every rank; if it fails on any, every rank raises (none is left in a collective)."""
        err = None
        try:
            fn()
        except UserError as e:
            err = f"rank {self.env.rank}: {e}"
        errors = [err]
        if dist.is_initialized() and self.env.world > 1:
            errors = [None] * self.env.world
            dist.all_gather_object(errors, err)
        first = next((e for e in errors if e), None)
        if first:
            raise UserError(first if err is None else err)

    def _resume(self, path: Path) -> None:
        cfg, parts = self.cfg, self.parts
        staged: list[ckpt.Staged] = []
        # every rank reads (weights_only) before any applies: a missing or refused file stops all ranks
        self._all_ok(lambda: staged.append(ckpt.read(path, parts)))
        meta = staged[0].meta
        same_optimizer = meta.get("optimizer") == cfg.optimizer.name
        exact = not run_differences(meta.get("config", {}), dump(cfg),
                                    worlds=(meta["world_size"] // meta.get("tp", 1), self.dp_world))
        # this config's hyper-parameters (not the optimizer's counters, which the checkpoint carries on)
        hyper = set(cfg.optimizer.selected().model_dump()) | {"lr", "initial_lr", "weight_decay"}
        fresh = [{k: v for k, v in g.items() if k in hyper} for g in self.optimizer.param_groups]
        self.start_step = ckpt.load(staged[0], parts, optimizer_state=same_optimizer, scheduler_state=exact)
        if not exact:  # allow_changes: this config's hyper-parameters and schedule, at the checkpoint's step
            for group, mine in zip(self.optimizer.param_groups, fresh):
                group.update(mine)
            reposition(self.scheduler, self.start_step)
        self.step = self.saved_step = self.start_step
        self.time_offset = float(meta.get("train_time_s", 0.0))
        self.log(f"[resume] from {path} at step {self.start_step} ({staged[0].format} format"
                 + (")" if same_optimizer else f", weights only: it was written by {meta.get('optimizer')})"))

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
        self.log(f"[schedule] {t.steps} steps, warm-up {t.warmup}, cosine to {t.min_lr_ratio:g} x peak; "
                 f"global batch {self.global_batch} x {self.cfg.data.seq_len} tokens")

    @property
    def global_batch(self) -> int:
        t = self.cfg.training
        return t.batch_size * t.grad_accum * self.dp_world

    def _record(self, rec: dict) -> None:
        if self.is_main:
            runs.append(self.metrics_path, rec)

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
        # (TP: the ranks of a TP group evaluate the same windows, each counted once per TP rank below)
        batches = t.eval_batches * self.dp_world
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        self.model.eval()
        for x, y in data_mod.val_batches(
            self.data.val, num_batches=batches, batch_size=t.eval_batch_size or t.batch_size,
            seq_len=self.cfg.data.seq_len, rank=self.dp_rank, world=self.dp_world,
        ):
            loss = self._loss(x.to(env.device), y.to(env.device), reduction="sum")
            total[0] += loss.double()
            total[1] += y.numel()
        self.model.train()
        if dist.is_initialized() and env.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int, measure: bool = False) -> float:
        """One optimizer step. ``measure``: take the memory report while the gradients exist (after the
        step, before ``zero_grad``; DeepSpeed frees them inside its step, so there: before it)."""
        t, env, cfg = self.cfg.training, self.env, self.cfg
        losses = []
        for micro in range(t.grad_accum):
            x, y = data_mod.train_batch(
                self.data.train, step * t.grad_accum + micro, rank=self.dp_rank, world=self.dp_world,
                batch_size=t.batch_size, seq_len=cfg.data.seq_len, seed=t.seed, max_tokens=cfg.data.max_train_tokens,
            )
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            last = micro == t.grad_accum - 1
            if self.engine is not None:
                loss = self._loss(x, y)
                self.engine.backward(loss)
                if measure and last:
                    self.memory = self._memory_report()
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
            if measure:
                self.memory = self._memory_report()
            self.optimizer.zero_grad(set_to_none=True)
        return float(self._mean_over_ranks(torch.stack(losses).mean()))

    def _memory_report(self) -> dict:
        cfg = self.cfg
        return stateless_opt.memory_report(
            self.model, self.optimizer,
            # auto: DeepSpeed's stage, and tp / fsdp2_tp under tensor parallelism
            backend="auto" if cfg.backend.name == "deepspeed" or cfg.backend.tp > 1 else cfg.backend.name,
            print_table=False, json_path=str(self.run_dir / "memory_report.json") if self.is_main else None,
        )

    # ------------------------------------------------------------------ loop
    def _progress(self):
        from tqdm import tqdm

        mode = self.cfg.training.progress
        on = self.is_main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        bar = tqdm(total=self.cfg.training.steps, initial=self.start_step, disable=not on, dynamic_ncols=True,
                   desc=f"{self.cfg.optimizer.name}/{self.cfg.backend.name}", unit="step", mininterval=0.5)
        return bar, on

    def _save(self, step: int, train_time: float) -> None:
        meta = {"optimizer": self.cfg.optimizer.name, "train_time_s": round(train_time, 3), "config": dump(self.cfg)}
        path = ckpt.save(self.cfg.checkpoint_dir, step, self.parts, meta, keep=self.cfg.checkpoint.keep,
                         formats=self.cfg.checkpoint_formats)
        self.saved_step = step
        self.log(f"[checkpoint] step {step}: {path}")

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.training
        tokens_per_step = self.global_batch * cfg.data.seq_len
        bar, bar_on = self._progress()
        t_start = time.perf_counter()
        rate, last_val, losses = None, None, []
        if self.start_step == 0 and t.eval_every:
            last_val = self.evaluate()
            self._record({"step": 0, "val_loss": last_val})
            self.log(f"[eval] step 0: val loss {last_val:.4f}")
        elif self.start_step == t.steps:
            self.log(f"[run] complete: the newest checkpoint is the last step ({t.steps}); nothing left to train "
                     "(--training.steps=N for more, or --run.overwrite=true to start over)")
        for step in range(self.start_step, t.steps):
            t0 = time.perf_counter()
            lr = self.scheduler.get_last_lr()[0]
            loss = self.train_step(step, measure=step == t.steps - 1)
            dt = time.perf_counter() - t0
            rate = tokens_per_step / dt if rate is None else 0.9 * rate + 0.1 * tokens_per_step / dt
            losses.append(loss)
            done = self.step = step + 1
            train_time = self.time_offset + time.perf_counter() - t_start
            self._record({"step": done, "train_loss": loss, "lr": lr, "tokens": done * tokens_per_step,
                          "step_time_s": round(dt, 5), "tokens_per_s": round(tokens_per_step / dt, 1),
                          "time_s": round(train_time, 3)})
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
                self._save(done, self.time_offset + time.perf_counter() - t_start)
        bar.close()
        if last_val is None:  # resumed at (or past) the last step: still report where the model stands
            last_val = self.evaluate()
        wall = time.perf_counter() - t_start
        return self._finish(losses, last_val, wall, tokens_per_step)

    def _finish(self, losses: list[float], val: float | None, wall: float, tokens_per_step: int) -> dict:
        cfg, env = self.cfg, self.env
        done_steps = len(losses)
        meta = self.data.meta
        if self.memory is None:  # nothing was trained in this attempt: no gradients to measure
            self.memory = self._memory_report()
        mem = self.memory
        summary = {
            "backend": cfg.backend.name,
            "optimizer": cfg.optimizer.name,
            "world_size": env.world,
            "tp": cfg.backend.tp,
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
            "train_time_s": round(self.time_offset + wall, 2),
            "tokens_per_s": round(done_steps * tokens_per_step / wall, 1) if wall > 0 else None,
            "train_losses": losses,
            # per rank, from the memory report (its names; the report itself is memory_report.json)
            "memory": [{"rank": r["rank"], "param_bytes": r["params"], "grad_bytes": r["grads"],
                        "optimizer_state_bytes": r["state"], "peak_rss_bytes": r["peak_rss"], "rss_bytes": r["rss"],
                        **({"cuda_peak_allocated_bytes": r["peak_allocated"]} if r["device"] != "cpu" else {})}
                       for r in mem["ranks"]],
            "memory_report": mem["summary"],
        }
        if self.is_main:
            beat = val is not None and val < meta["unigram_entropy_train"]
            train_txt = (f"train loss {summary['final_train_loss_mean10']:.4f} (mean of last {min(10, done_steps)})"
                         if losses else "no steps left to run")
            self.log(
                f"[done] {done_steps} steps in {wall:.1f}s ({summary['tokens_per_s'] or 0:,.0f} tok/s): {train_txt}, "
                f"val loss {val:.4f}; unigram entropy {meta['unigram_entropy_train']:.4f} -> "
                f"{'below' if beat else 'NOT below'} the unigram baseline"
            )
            self.log(stateless_opt.memory.format_table(mem["ranks"]))
            self.log(memory_note(mem["summary"], self.params, cfg.optimizer.name))
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            if cfg.run.plot:
                run = Run(self.run_dir, runs.read_metrics(self.metrics_path), summary)
                self.log(f"[plot] loss curve: {plot([run], self.run_dir / 'loss.png', self._title())}")
        return summary

    def _title(self) -> str:
        c = self.cfg
        return f"LLaMA {c.model.preset} on {c.data.corpus}: {c.optimizer.name}, {c.backend.name} x{self.env.world}" + (
            f" (tp {c.backend.tp})" if c.backend.tp > 1 else "")


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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (torchrun stopping its workers, a scheduler's pre-emption)."""


_signalled: list[int] = []  # the signals this process received


def _on_signal(signum, frame):
    _signalled.append(signum)
    raise Interrupted()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> dict | None:
    """Parse, train, report; returns the summary (None for --help / --print-config). A user mistake ends
    with one ``error:`` line and exit code 2, an interrupt with where it stopped and exit code 130 (also
    when the signal reaches this rank inside a collective its peers already left: whatever error that
    raises is the interrupt's)."""
    trainer = None
    handlers = {}
    if _in_main_thread():
        handlers = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _signalled.clear()
    clean = False
    try:
        cfg, flags = parse_args(argv)
        if cfg is None:
            return None
        if flags["print_config"]:
            print(yaml.safe_dump(dump(cfg), sort_keys=False))
            return None
        env = init_distributed(cfg)
        trainer = Trainer(cfg, env)
        summary = trainer.train()
        clean = True
        return summary
    except UserError as err:
        if _is_main_process():
            print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except BaseException:
        if not _signalled:
            raise
        if _is_main_process():
            print(_interrupt_message(trainer), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        for sig, previous in handlers.items():
            signal.signal(sig, previous)
        close_distributed(clean)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt_message(trainer: Trainer | None) -> str:
    if trainer is None:
        return "interrupted before training started"
    cfg = trainer.cfg
    msg = f"interrupted at step {trainer.step} of {cfg.training.steps}; "
    if trainer.saved_step:
        return msg + f"rerun the same command to resume from the checkpoint at step {trainer.saved_step}"
    if cfg.checkpoint.every:
        return msg + f"no checkpoint yet (every {cfg.checkpoint.every} steps): a rerun starts over"
    return msg + "no checkpoints (checkpoint.every=0): a rerun starts over"


def cli() -> None:
    """Console script ``stateless-opt-train``."""
    main()


if __name__ == "__main__":
    cli()
