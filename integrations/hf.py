"""Hugging Face ``Trainer`` doors for SWAN, SinkGD and SGD-SaI (checked with transformers 5.23, accelerate 1.15).

The Trainer takes a custom optimizer through three doors. They do not behave the same way:

* ``Trainer(optimizers=(SWAN(param_groups(model), lr=...), None))``: one process or DDP. The Trainer
  **refuses** it when FSDP is on ("Passing `optimizers` is not allowed if PyTorch FSDP is enabled").
  With DeepSpeed it **discards it silently**: ``deepspeed_init`` sets ``trainer.optimizer = None``, and
  you get the JSON's optimizer or AdamW.
* ``TrainingArguments(deepspeed=deepspeed_config("configs/ds_zero2_swan.json"))``: DeepSpeed ZeRO-1/2/3
  builds our optimizer from the JSON ``"optimizer": {"type": "SWAN", ...}``. The Trainer fills the ``"auto"``
  values (``lr`` <- ``learning_rate``, ``betas``, ``weight_decay``).
* ``Trainer(optimizer_cls_and_kwargs=stateless_optimizer("swan", lr=...))``: works with every backend.
  With FSDP2 the optimizer is built before the DTensor swap; our optimizers find each parameter's layout
  at ``step()``. With DeepSpeed it works when the JSON has no ``"optimizer"`` block, and ZeRO gets our
  optimizer as a client optimizer.

``RequireStatelessOptimizer()`` is a callback that stops a run whose Trainer would step some other
optimizer. Importing this module does not import DeepSpeed; ``deepspeed_config`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from stateless_opt import registry
from stateless_opt.config import validate
from stateless_opt.extras import require
from stateless_opt.grouping import param_groups
from stateless_opt.optimizer import StatelessOptimizer

require("hf", "stateless_opt.integrations.hf")
PREFIX = "stateless_opt + HF Trainer: "


def optimizer_class(name: str | type) -> type[StatelessOptimizer]:
    """Our class from a registered name or alias such as ``"swan"``, ``"SinkGD"`` or ``"sgd-sai"`` (any
    case; ``stateless_opt.registry``), or the class itself."""
    if isinstance(name, type) and issubclass(name, StatelessOptimizer):
        return name
    spec = registry.find(str(name))
    if spec is None:
        raise ValueError(f"{PREFIX}unknown optimizer {name!r}; choose one of {', '.join(registry.OPTIMIZERS)}")
    return spec.cls


def _refuse_fsdp1(model: nn.Module) -> None:
    """Refuse a model wrapped in FSDP1.

    With FSDP1, the Trainer builds the optimizer after wrapping. Every parameter is then a 1-D slice of
    a flat buffer. ``param_groups`` would put each weight in the fallback group, so no matrix rule would
    run and nothing would say so.
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            f"{PREFIX}the model is wrapped in FSDP1, whose flattened parameters hide the weight shapes the matrix "
            "rule needs; use FSDP2: TrainingArguments(fsdp=True, fsdp_config={'version': 2})"
        )


class StatelessOptimizerFactory:
    """Builds SWAN / SinkGD / SGD-SaI from the model handed over by the Trainer.

    This class deliberately does not subclass ``torch.optim.Optimizer``. transformers calls such a
    class as ``cls()(model, **kwargs)``, so the factory gets the model itself. ``param_groups`` needs
    the model's modules to send embeddings and the LM head to the fallback. Given an ``Optimizer``
    subclass, the Trainer would instead pass its two weight-decay groups, where embeddings and the
    head are plain matrices. Use ``stateless_optimizer`` to build the ``(class, kwargs)`` pair.
    """

    def __call__(
        self, model: nn.Module, *, optimizer: str, lr: float, fallback_weight_decay: float | None = None,
        batch_dims: int = 0, replicate_group: Any = True, **hyper: Any,
    ) -> StatelessOptimizer:
        cls = optimizer_class(optimizer)
        _refuse_fsdp1(model)
        groups = param_groups(model, fallback_weight_decay=fallback_weight_decay, batch_dims=batch_dims)
        # replicate_group=True: when the step runs under torch.distributed with more than one rank, treat
        # plain tensors as DDP replicas, so SWAN splits its whitening over the ranks. The Trainer builds the
        # optimizer before wrapping the model in DDP, so param_groups cannot see the DDP process group.
        # FSDP2 DTensors and DeepSpeed partitions take precedence, so their layouts are unaffected.
        return cls(groups, lr=lr, replicate_group=replicate_group, **hyper)


def stateless_optimizer(
    name: str, lr: float, *, fallback_weight_decay: float | None = None, batch_dims: int = 0,
    replicate_group: Any = True, **hyper: Any,
) -> tuple[type, dict[str, Any]]:
    """``(factory class, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``lr`` is required because the Trainer does not pass ``TrainingArguments.learning_rate`` to a
    factory. The LR scheduler starts from this ``lr``. ``lr`` is the matrix rule's LR. The fallback
    group (embeddings, LM head, norms, biases) steps at ``lr * fallback_lr_ratio`` (default 20).
    ``hyper`` holds the other hyper-parameters, e.g. ``ns_steps=12`` or ``iterations=5``. They are checked
    now with the optimizer's pydantic config, so a bad key or value names its field before training starts.
    ``fallback_weight_decay`` and ``batch_dims`` are passed to ``param_groups``. ``replicate_group=True``
    splits SWAN's whitening over DDP ranks. Pass ``None`` if the processes do not train one replicated model.
    """
    cls = optimizer_class(name)
    validate(cls.config_cls, {"lr": lr, **hyper}, f"stateless_optimizer({name!r}) arguments")
    spec = registry.find(cls)
    kwargs = dict(
        optimizer=spec.name if spec is not None else cls, lr=lr, fallback_weight_decay=fallback_weight_decay, batch_dims=batch_dims,
        replicate_group=replicate_group, **hyper,
    )
    return StatelessOptimizerFactory, kwargs


def find_stateless_optimizer(optimizer: Any, depth: int = 4) -> StatelessOptimizer | None:
    """Our optimizer inside the wrappers, or None. The wrappers are accelerate's ``AcceleratedOptimizer``
    and ``DeepSpeedOptimizerWrapper``, and DeepSpeed's ZeRO optimizer. Each keeps the next one in ``.optimizer``."""
    for _ in range(depth + 1):
        if isinstance(optimizer, StatelessOptimizer) or optimizer is None:
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


class RequireStatelessOptimizer(_callback_base()):
    """A Trainer callback that fails at the start of training if the Trainer will not step one of ours.

    The doors can fail silently. With DeepSpeed the Trainer replaces an ``optimizers=`` optimizer with
    AdamW, or with the JSON's optimizer. A JSON ``"type"`` that is not ours builds DeepSpeed's own
    optimizer. ``TrainingArguments(optim=...)`` without ``optimizer_cls_and_kwargs`` builds AdamW. In
    each case the run would train with the wrong optimizer and look normal. ``expected`` can be a
    class, such as ``SWAN``, or a name, such as ``"swan"``.
    """

    def __init__(self, expected: str | type | None = None):
        self.expected = optimizer_class(expected) if expected is not None else StatelessOptimizer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        ours = find_stateless_optimizer(optimizer)
        if not isinstance(ours, self.expected):
            chain, o = [], optimizer
            for _ in range(5):
                if o is None:
                    break
                chain.append(type(o).__name__)
                o = getattr(o, "optimizer", None)
            hint = (
                " With TrainingArguments(deepspeed=...), optimizers= is discarded: use a JSON \"optimizer\" block of "
                "our type (deepspeed_config) or optimizer_cls_and_kwargs=stateless_optimizer(...)."
                if getattr(args, "deepspeed", None) else ""
            )
            raise RuntimeError(
                f"{PREFIX}the Trainer is about to step {' -> '.join(chain) or None}, not {self.expected.__name__}.{hint}"
            )
        return control


def deepspeed_config(config: str | Path | dict) -> dict:
    """A DeepSpeed config (path or dict) for ``TrainingArguments(deepspeed=...)``, checked now.

    This function registers our JSON types with DeepSpeed by importing
    ``stateless_opt.integrations.deepspeed``. That import must run in every process before the Trainer
    builds the engine. Under ``torchrun`` that happens when each process runs your script and reaches
    this call. It also validates the ``"optimizer"`` block now. A typo in ``"params"`` then names its
    field here, not deep inside ``deepspeed.initialize``. Values still ``"auto"`` are left for the
    Trainer to fill: ``lr`` from ``learning_rate`` (our matrix LR), ``betas`` from ``adam_beta1/2``,
    ``weight_decay`` from ``weight_decay``, and ``eps`` from ``adam_epsilon``. Note that our ``eps``
    guards row and column norms, and the AdamW fallback's epsilon is ``adam_eps``. So keep ``eps``
    concrete.
    """
    import stateless_opt.integrations.deepspeed as sds

    sds.register()
    if isinstance(config, dict):
        raw = json.loads(json.dumps(config))  # a deep copy, which must also be plain JSON
        where = "DeepSpeed config"
    else:
        path = Path(config)
        raw = json.loads(path.read_text())
        where = str(path)
    opt = raw.get("optimizer")
    if isinstance(opt, dict):
        cls = sds.lookup(opt.get("type"))
        if cls is not None:
            concrete = {k: v for k, v in (opt.get("params") or {}).items() if v != "auto"}
            try:
                sds.json_params(cls, concrete, str(opt.get("type")))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    return raw


__all__ = [
    "stateless_optimizer", "StatelessOptimizerFactory", "deepspeed_config", "RequireStatelessOptimizer",
    "find_stateless_optimizer", "optimizer_class",
]
