r"""SWAN / SinkGD / SGD-SaI in the Hugging Face ``Trainer``: the three doors, on a tiny random-init LLaMA.

    python -m stateless_opt.launch.hf_trainer                    # all three doors in turn (~1 min on 2 CPU cores)
    python -m stateless_opt.launch.hf_trainer --door optimizers  # (a) Trainer(optimizers=(SWAN(...), None))
    python -m stateless_opt.launch.hf_trainer --door deepspeed   # (b) TrainingArguments(deepspeed=<ZeRO-2 JSON>)
    python -m stateless_opt.launch.hf_trainer --door factory --optimizer sinkgd   # (c) optimizer_cls_and_kwargs=...
    torchrun --standalone --nproc-per-node 2 -m stateless_opt.launch.hf_trainer --door factory     # DDP (gloo on CPU)
    torchrun --nproc-per-node 8 -m stateless_opt.launch.hf_trainer --door factory --fsdp           # FSDP2: GPUs only

(``python launch/hf_trainer.py`` in a checkout is the same program.)

The doors, and why there are three (details in ``stateless_opt/integrations/hf.py``):

(a) ``optimizers=``: you build the optimizer, so embeddings and the LM head go to the fallback through
    ``param_groups(model)``. Use it with one process or DDP. The Trainer refuses it under FSDP, and DeepSpeed
    silently replaces it.
(b) ``deepspeed=``: DeepSpeed builds our optimizer from the JSON ``"type": "SWAN"``. That needs
    ``import stateless_opt.integrations.deepspeed`` in every process, which ``deepspeed_config()`` does.
    ``learning_rate`` fills the JSON's ``"lr": "auto"``. Without a launcher, this script sets the
    one-process environment a launcher would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
    on a CPU it also skips DeepSpeed's shared-memory op build, which gloo does not need.
(c) ``optimizer_cls_and_kwargs=stateless_optimizer(...)``: a factory that receives the model. This is the
    door for FSDP2, and it works with every other backend too. accelerate enables FSDP only on GPUs. On a
    CPU, ``fsdp=`` silently runs without FSDP, so ``--fsdp`` refuses to run there, and on the CPU this door
    runs without FSDP.

Every door adds the ``RequireStatelessOptimizer`` callback. It stops the run at its first step if the
Trainer would step anything but ours. At the end the script destroys the process group the Trainer
started (neither the Trainer nor accelerate does): a gloo group still alive when Python exits can abort
the process after the run ("terminate called without an active exception": gloo's worker thread frees a
finished collective's tensors after the interpreter began finalising).

Data: windows of the launch corpus (its BPE vocabulary, 4096) if ``stateless-opt-data prepare`` has
run. Otherwise the data is synthetic: sequences x[t+1] = (5 x[t] + 3) mod 256 from random starts, which
the model learns within a few dozen steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/hf_trainer.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "launch"

import torch  # noqa: E402

from .config import CONFIG_DIR  # noqa: E402
from .env import deepspeed_on_cpu, one_process_env, under_launcher  # noqa: E402

DOORS = ("optimizers", "deepspeed", "factory")
# Matrix-rule LRs for this model (fallback: x20). They are the quickstart sweep's values, and SGD-SaI's is elementwise.
LR = {"swan": 2e-3, "sinkgd": 2e-3, "sgdsai": 5e-3}
SYNTHETIC_VOCAB = 256


# --------------------------------------------------------------------------- model and data
def tiny_llama(vocab_size: int, seq_len: int = 64, seed: int = 0):
    """A random-init LlamaForCausalLM: hidden 64, 2 blocks, 4 heads, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=seq_len, tie_word_embeddings=False, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class Windows(torch.utils.data.Dataset):
    """``count`` windows of ``seq_len`` tokens. Items are ``{"input_ids", "labels"}``, and the model shifts the labels."""

    def __init__(self, tokens, count: int, seq_len: int, seed: int = 0):
        self.tokens, self.seq_len = tokens, seq_len
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(0, len(tokens) - seq_len, (count,), generator=gen).tolist()

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        o = self.offsets[i]
        x = torch.as_tensor(self.tokens[o : o + self.seq_len].astype("int64") if hasattr(self.tokens, "astype")
                            else self.tokens[o : o + self.seq_len], dtype=torch.long)
        return {"input_ids": x, "labels": x.clone()}


def synthetic_tokens(n: int = 1 << 16, vocab: int = SYNTHETIC_VOCAB, seed: int = 0) -> torch.Tensor:
    """A stream made of runs of x[t+1] = (5 x[t] + 3) mod vocab, each run starting at a random token."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n // 32,), generator=gen)
    runs = [starts]
    for _ in range(31):
        runs.append((5 * runs[-1] + 3) % vocab)
    return torch.stack(runs, 1).reshape(-1)


def dataset(kind: str = "auto", count: int = 512, seq_len: int = 64, seed: int = 0):
    """(dataset, vocab size). ``kind``: ``"kjv"`` (the prepared launch corpus), ``"synthetic"``, or ``"auto"``,
    which uses the corpus if its cache exists and is synthetic otherwise. The corpus is used only if that is cheap."""
    if kind in ("auto", "kjv"):
        from . import data as D

        prepared = D.data_dir("kjv", 4096, 0.05, None) / "meta.json"
        if kind == "kjv" or prepared.exists():
            data = D.prepare("kjv", 4096, 0.05, verbose=False)
            return Windows(data.train, count, seq_len, seed), data.vocab_size
    return Windows(synthetic_tokens(seed=seed), count, seq_len, seed), SYNTHETIC_VOCAB


# --------------------------------------------------------------------------- the three doors
def training_args(out_dir: str | Path, *, steps: int, lr: float, batch_size: int = 8, overrides: dict | None = None):
    """TrainingArguments shared by the doors. ``learning_rate`` matters only for (b), where it fills the JSON's
    ``"lr": "auto"``. Doors (a) and (c) carry their own lr, and the Trainer's scheduler starts from it.
    ``overrides`` replaces any of these TrainingArguments or adds others."""
    from transformers import TrainingArguments

    kw = dict(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    kw.update(overrides or {})
    return TrainingArguments(**kw)


def door_optimizers(model, train_set, out_dir, *, optimizer="swan", lr=None, steps=20, batch_size=8, callbacks=(),
                    args_overrides=None, **hyper):
    """(a) ``Trainer(optimizers=(ours, None))``, for one process or DDP. Not for FSDP, which refuses it, or DeepSpeed, which drops it."""
    from transformers import Trainer

    from stateless_opt import param_groups
    from stateless_opt.integrations.hf import RequireStatelessOptimizer, optimizer_class

    lr = LR[optimizer] if lr is None else lr
    opt = optimizer_class(optimizer)(param_groups(model), lr=lr, **hyper)
    args = training_args(out_dir, steps=steps, lr=lr, batch_size=batch_size, overrides=args_overrides)
    return Trainer(model=model, args=args, train_dataset=train_set, optimizers=(opt, None),
                   callbacks=[RequireStatelessOptimizer(optimizer), *callbacks])


def door_deepspeed(model, train_set, out_dir, *, optimizer="swan", lr=None, steps=20, batch_size=8, callbacks=(),
                   args_overrides=None, config=None):
    """(b) ``TrainingArguments(deepspeed=...)`` with the ``"optimizer"`` block of ``config``. The default config
    is ``configs/ds_zero2_<optimizer>.json``, and its hyper-parameters live in the JSON. Call ``cpu_deepspeed_env()``
    before anything imports DeepSpeed if no launcher set up the process group."""
    from transformers import Trainer

    from stateless_opt.integrations.hf import RequireStatelessOptimizer, deepspeed_config

    lr = LR[optimizer] if lr is None else lr
    ds = deepspeed_config(config or CONFIG_DIR / f"ds_zero2_{optimizer}.json")  # also registers "SWAN"
    args = training_args(out_dir, steps=steps, lr=lr, batch_size=batch_size,
                         overrides={"deepspeed": ds, **(args_overrides or {})})
    return Trainer(model=model, args=args, train_dataset=train_set,
                   callbacks=[RequireStatelessOptimizer(optimizer), *callbacks])


def door_factory(model, train_set, out_dir, *, optimizer="swan", lr=None, steps=20, batch_size=8, callbacks=(),
                 args_overrides=None, fsdp=False, **hyper):
    """(c) ``optimizer_cls_and_kwargs=stateless_optimizer(...)``. The Trainer calls ``factory()(model, **kwargs)``.
    This door also works with DeepSpeed when the JSON has no ``"optimizer"`` block, and ZeRO then wraps ours.
    With ``fsdp=True`` it runs FSDP2. That needs GPUs; on a CPU accelerate would quietly skip FSDP."""
    from transformers import Trainer

    from stateless_opt.integrations.hf import RequireStatelessOptimizer, stateless_optimizer

    lr = LR[optimizer] if lr is None else lr
    overrides = dict(fsdp=True, fsdp_config={"version": 2, "reshard_after_forward": True}) if fsdp else {}
    args = training_args(out_dir, steps=steps, lr=lr, batch_size=batch_size,
                         overrides={**overrides, **(args_overrides or {})})
    return Trainer(model=model, args=args, train_dataset=train_set,
                   callbacks=[RequireStatelessOptimizer(optimizer), *callbacks],
                   optimizer_cls_and_kwargs=stateless_optimizer(optimizer, lr=lr, **hyper))


DOOR_FNS = {"optimizers": door_optimizers, "deepspeed": door_deepspeed, "factory": door_factory}


# --------------------------------------------------------------------------- environment
def cpu_deepspeed_env() -> None:
    """What DeepSpeed needs when this process was started without a launcher: a one-rank process group
    on a free port (launch/env.py), and on a CPU no shared-memory op build. Values a launcher already
    set are kept."""
    if not under_launcher():
        one_process_env()
    if not torch.cuda.is_available():
        deepspeed_on_cpu()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def base_optimizer(trainer):
    """Our optimizer inside the Trainer's wrappers: accelerate's AcceleratedOptimizer, or its DeepSpeed
    wrapper around the ZeRO optimizer around ours."""
    from stateless_opt.integrations.hf import find_stateless_optimizer

    return find_stateless_optimizer(trainer.optimizer)


# --------------------------------------------------------------------------- CLI
def run_door(door: str, args) -> dict:
    train_set, vocab = dataset(args.data, count=args.steps * args.batch_size * 2, seq_len=args.seq_len)
    model = tiny_llama(vocab, args.seq_len)
    out = Path(args.output_dir) / door
    kw = dict(optimizer=args.optimizer, lr=args.lr, steps=args.steps, batch_size=args.batch_size)
    if door == "factory":
        kw["fsdp"] = args.fsdp
    trainer = DOOR_FNS[door](model, train_set, out, **kw)
    result = trainer.train()
    opt = base_optimizer(trainer)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    summary = {
        "door": door, "optimizer": type(opt).__name__, "wrapped_in": type(trainer.optimizer).__name__,
        "rule_counts": opt.rule_counts(), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None, "train_loss": result.training_loss,
    }
    if rank() == 0:
        print(f"[{door}] {json.dumps(summary)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--door", choices=(*DOORS, "all"), default="all")
    ap.add_argument("--optimizer", choices=tuple(LR), default="swan")
    ap.add_argument("--lr", type=float, default=None, help="matrix-rule LR (default: per optimizer, see LR)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--data", choices=("auto", "kjv", "synthetic"), default="auto")
    ap.add_argument("--fsdp", action="store_true", help="door factory: FSDP2 through accelerate (GPUs only)")
    ap.add_argument("--output-dir", default="runs/hf_trainer", help="the Trainer's output_dir (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.fsdp and not torch.cuda.is_available():
        ap.error("--fsdp needs GPUs: accelerate enables FSDP only on GPU-like devices and would silently run "
                 "without it on the CPU (the factory door itself works there: drop --fsdp)")
    if args.fsdp and args.door != "factory":
        ap.error("--fsdp goes with --door factory (FSDP refuses optimizers=; DeepSpeed is its own backend)")
    if args.door == "all":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            ap.error("--door all is for one process; under torchrun pick one --door")
        return [_run_in_subprocess(d, argv if argv is not None else sys.argv[1:]) for d in DOORS]
    if args.door == "deepspeed":
        cpu_deepspeed_env()  # before the first TrainingArguments, which starts the process group
    try:
        return [run_door(args.door, args)]
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy the process group the Trainer started (accelerate never does), so gloo's worker threads
    are joined while Python is alive (see the module docstring)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _run_in_subprocess(door: str, argv: list[str]) -> dict:
    """Run one door in a fresh interpreter. accelerate keeps process-wide state: after the DeepSpeed door
    (``ACCELERATE_USE_DEEPSPEED`` is left in the environment), a later ``optimizers=`` door would be
    silently replaced by AdamW."""
    import subprocess

    target = ["-m", __spec__.name] if __spec__ is not None else [str(Path(__file__).resolve())]
    cmd = [sys.executable, *target, *argv, "--door", door]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    sys.stdout.write(out)
    line = [ln for ln in out.splitlines() if ln.startswith(f"[{door}] ")][-1]
    return json.loads(line.split(" ", 1)[1])


if __name__ == "__main__":
    main()
