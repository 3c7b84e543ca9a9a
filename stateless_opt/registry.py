"""The one table of optimizers: name and aliases -> class, its pydantic config, its state model.

Every door reads it: the DeepSpeed JSON ``"type"`` (``integrations/deepspeed``), the HF Trainer factory
(``integrations/hf``), the training configs (``launch/``), the memory report (``memory.py``) and the
tests. Adding an optimizer is one module (its rule, config and class) plus one ``register`` call::

    register(OptimizerSpec("colrms", ColRMS, aliases=("col_rms",)))

Names are matched case-insensitively; aliases are the spellings people write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .optimizer import StatelessOptimizer
from .sgd_sai import SGDSaI
from .sinkgd import SinkGD
from .swan import SWAN


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: its canonical (lower-case) ``name``, ``aliases``, and the class. The class holds
    the rest: ``config_cls`` (hyper-parameters), ``state_size`` (the memory report's state model) and
    ``uses_rules`` (whether groups split into matrix rule and fallback)."""

    name: str
    cls: type[StatelessOptimizer]
    aliases: tuple[str, ...] = ()

    @property
    def config(self) -> type:
        return self.cls.config_cls

    @property
    def splits_rules(self) -> bool:
        return self.cls.uses_rules

    @property
    def state_size(self):
        return self.cls.state_size


OPTIMIZERS: dict[str, OptimizerSpec] = {}
_BY_NAME: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> OptimizerSpec:
    """Add ``spec`` (idempotent for the same spec; a name or alias taken by another one is an error)."""
    keys = [spec.name.lower(), *(a.lower() for a in spec.aliases)]
    for key in keys:
        other = _BY_NAME.get(key)
        if other is not None and other != spec:
            raise ValueError(f"optimizer name {key!r} is already registered for {other.cls.__name__}")
    if not issubclass(spec.cls, StatelessOptimizer):
        raise TypeError(f"{spec.cls.__name__} must subclass stateless_opt.optimizer.StatelessOptimizer")
    OPTIMIZERS[spec.name.lower()] = spec
    for key in keys:
        _BY_NAME[key] = spec
    return spec


def find(name: Any) -> OptimizerSpec | None:
    """The spec for a name or alias (any case), or for one of the registered classes; else None."""
    if isinstance(name, type):
        return next((s for s in OPTIMIZERS.values() if s.cls is name), None)
    return _BY_NAME.get(name.lower()) if isinstance(name, str) else None


def lookup(name: Any) -> OptimizerSpec:
    """``find``, raising a ``ValueError`` that lists the known names."""
    spec = find(name)
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return spec


def spec_of(optimizer: Any) -> OptimizerSpec | None:
    """The spec of an optimizer instance (its class or the nearest registered base class)."""
    for cls in type(optimizer).__mro__:
        spec = find(cls)
        if spec is not None:
            return spec
    return None


register(OptimizerSpec("swan", SWAN))
register(OptimizerSpec("sinkgd", SinkGD))
register(OptimizerSpec("sgdsai", SGDSaI, aliases=("sgd_sai", "sgd-sai")))
