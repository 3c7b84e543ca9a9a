"""The optimizer catalogue, like torch's ``optim_db`` (``OptimizerInfo`` in
``torch/testing/_internal/common_optimizers.py``): one row per optimizer variant. The generic tests
iterate it: the float64 references (``test_reference.py``), backend equality (``test_fsdp2.py``,
``test_ddp.py``, ``test_deepspeed.py``), the memory accounting (``test_memory.py``), torch.optim's own
contract (``test_torch_contract.py``, with ``inputs`` and ``error_inputs`` as torch's
``optim_inputs_func`` / ``optim_error_inputs_func``) and the fuzz suite (``test_fuzz.py``). Adding an
optimizer, or a variant worth covering, adds a row; each test file keeps its own hyper-parameters
(learning rates fitted to its model) and states its tolerance rule from the row's properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import colrms  # noqa: F401  (registers the extension optimizer: tests/test_extending.py)
import reference as R
from stateless_opt import registry, sinkgd, swan


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer variant.

    ``name``: the registry name; ``variant``: the keyword arguments that make the variant;
    ``rule``: the algorithm module's single-tensor rule (its readable form, float64) and ``reference``
    the independent float64 reference of ``tests/reference.py`` for the matrix rule, both called as
    ``f(grad)`` (None for elementwise optimizers: ``SGDSaIRef`` covers them); ``amplifies_rounding``:
    an iterative whitening not converged on the small singular values, which grows fp32 reduction-order
    noise about tenfold (the equality tests loosen their tolerance tenfold for it); ``backends``: the
    equality suites it runs in ("fsdp2": FSDP2, HSDP and DDP; "zero": DeepSpeed ZeRO-1/2/3; "tp": tensor
    parallelism and FSDP2 x TP); ``marked_groups``: the variant changes only param groups marked
    ``rule="fallback"`` (``param_groups(model)``) and refuses a plain parameter list, so tests give it
    marked groups."""

    id: str
    name: str
    variant: dict = field(default_factory=dict)
    rule: Callable | None = None
    reference: Callable | None = None
    amplifies_rounding: bool = False
    backends: frozenset = frozenset()
    default: bool = False
    marked_groups: bool = False

    @property
    def spec(self) -> registry.OptimizerSpec:
        return registry.lookup(self.name)

    @property
    def cls(self) -> type:
        return self.spec.cls

    @property
    def splits_rules(self) -> bool:
        return self.spec.splits_rules

    def make(self, params: Any, **hyper):
        """The optimizer of this row over ``params`` with the test's ``hyper``-parameters."""
        return self.cls(params, **self.variant, **hyper)

    def kwargs(self, **hyper) -> dict:
        """The variant and ``hyper`` as one dict (a DeepSpeed JSON ``"params"`` block)."""
        return {**self.variant, **hyper}

    @property
    def dtypes(self) -> frozenset:
        """Weight dtypes a step computes in (others are refused at construction, naming the tensor)."""
        return self.cls.param_dtypes

    @property
    def inputs(self) -> list[dict]:
        """Hyper-parameter sets the contract tests run (torch's ``optim_inputs_func``): the defaults and
        a weight-decay variant, at an lr that moves the toy problems of ``test_torch_contract``."""
        lr = 1e-3 if self.name == "sgdsai" else 1e-2
        return [{"lr": lr}, {"lr": lr, "weight_decay": 0.1}]

    def error_inputs(self) -> list["ErrorInput"]:
        """Inputs that must be refused (torch's ``optim_error_inputs_func``): torch's own for every
        optimizer (``get_error_inputs_for_all_optims``), then a non-finite and (where bounded) a
        negative value of every float hyper-parameter, at construction and written into a group before
        a step (as a scheduler would)."""
        return _generic_error_inputs() + _field_error_inputs(self.cls)


@dataclass(frozen=True)
class ErrorInput:
    """``make(cls)`` must raise ``error`` matching ``match`` (``on="construction"``), or build an
    optimizer whose ``step()`` must (``on="step"``, with no weight changed); a ``Warning`` subclass is
    expected as a warning."""

    desc: str
    make: Callable
    error: type
    match: str
    on: str = "construction"


def _p(*shape) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape))


def _generic_error_inputs() -> list[ErrorInput]:
    """torch's ``get_error_inputs_for_all_optims`` (same descriptions and messages)."""
    a, b = _p(1, 1), _p(1, 1)
    return [
        ErrorInput("invalid param type", lambda cls: cls(a), TypeError,
                   "params argument given to the optimizer should be an iterable of Tensors or dicts"),
        ErrorInput("a param group cannot have duplicate parameters", lambda cls: cls([a, a]), UserWarning,
                   ".*a parameter group with duplicate parameters.*"),
        ErrorInput("duplicate parameters should not occur across param groups either",
                   lambda cls: cls([{"params": a}, {"params": a}]), ValueError,
                   "some parameters appear in more than one parameter group"),
        ErrorInput("Tensor lr must be 1-element", lambda cls: cls([a], lr=torch.tensor([0.001, 0.001])), ValueError,
                   r"lr: Input should be a valid number"),
        ErrorInput("all optimizer params should be with/without names",
                   lambda cls: cls([("weight", a), b]), ValueError,
                   "all optimizer params should be with/without names. Some param names are missing"),
        ErrorInput("all optimizer param groups should be with/without names",
                   lambda cls: cls([{"params": [a], "lr": 1e-2}, {"params": [("weight", b)]}]), ValueError,
                   "all optimizer param groups should be with/without names. "
                   "cannot add param group with names to the optimizer"),
        ErrorInput("an unknown group key (a typo) is named", lambda cls: cls([{"params": [a], "weight_decy": 0.1}]),
                   ValueError, r"param group 0: weight_decy: Extra inputs are not permitted"),
        ErrorInput("complex weights are refused naming the tensor",
                   lambda cls: cls([a, torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))]), TypeError,
                   r"param group 0: tensor 1 \(shape \(2, 2\)\) is torch.complex64; complex weights"),
    ]


def _float_fields(cls) -> list[tuple[str, Any]]:
    """(name, pydantic field) of every float hyper-parameter of ``cls``'s config."""
    return [(n, f) for n, f in cls.config_cls.model_fields.items() if f.annotation is float]


def _field_error_inputs(cls) -> list[ErrorInput]:
    out = []
    for name, f in _float_fields(cls):
        bounded = any(getattr(m, "ge", None) is not None or getattr(m, "gt", None) is not None for m in f.metadata)
        bad = [(math.inf, "finite number"), (-math.inf, "finite number"), (math.nan, "finite number")]
        if bounded:
            bad.append((-1.0, "greater than"))
        for value, msg in bad:
            out.append(ErrorInput(f"{name}={value} at construction", lambda c, n=name, v=value: c([_p(3, 4)], **{n: v}),
                                  ValueError, rf"arguments: {name}: Input should be (a )?{msg}"))
            out.append(ErrorInput(
                f"{name}={value} in a group added later", lambda c, n=name, v=value: c([_p(3, 4)]).add_param_group(
                    {"params": [_p(2, 2)], n: v}), ValueError, rf"param group 1: {name}: Input should be (a )?{msg}"))
            out.append(ErrorInput(f"{name}={value} written into a group before a step",
                                  lambda c, n=name, v=value: _written(c, n, v), ValueError,
                                  rf"param group 1 \(before step 1\): {name}: Input should be (a )?{msg}", on="step"))
    return out


def _written(cls, name: str, value: float):
    """An optimizer of two groups with gradients, ``value`` written into group 1 as a scheduler would."""
    ps = [_p(3, 4), _p(4), _p(2, 3)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = cls([{"params": ps[:2]}, {"params": ps[2:]}])
    opt.param_groups[1][name] = value
    return opt


ALL = frozenset({"fsdp2", "zero", "tp"})
OPTIM_DB: list[OptimizerInfo] = [
    OptimizerInfo("swan", "swan", rule=swan.swan_update, reference=R.swan_update, amplifies_rounding=True,
                  backends=ALL, default=True),
    OptimizerInfo("swan_eigh", "swan", {"whitening": "eigh"}, swan.swan_update, R.swan_update,
                  backends=frozenset({"fsdp2", "zero"})),
    OptimizerInfo("swan_ns", "swan", {"whitening": "newton_schulz"}, swan.swan_update, R.swan_update,
                  amplifies_rounding=True),
    OptimizerInfo("swan_stateless", "swan", {"fallback": "stateless"}, swan.swan_update, R.swan_update,
                  amplifies_rounding=True),
    OptimizerInfo("swan_rowclip", "swan", {"fallback": "rowclip"}, swan.swan_update, R.swan_update,
                  amplifies_rounding=True),
    OptimizerInfo("sinkgd", "sinkgd", rule=sinkgd.sinkgd_update, reference=R.sinkgd_update,
                  backends=frozenset({"fsdp2", "tp"}), default=True),
    OptimizerInfo("sinkgd_stateless", "sinkgd", {"fallback": "stateless"}, sinkgd.sinkgd_update, R.sinkgd_update,
                  backends=frozenset({"zero", "tp"})),
    OptimizerInfo("sinkgd_rowclip", "sinkgd", {"fallback": "rowclip"}, sinkgd.sinkgd_update, R.sinkgd_update,
                  backends=frozenset({"tp"})),
    OptimizerInfo("sgdsai", "sgdsai", backends=ALL, default=True),
    OptimizerInfo("sgdsai_unfused", "sgdsai", {"fused": False}),
    OptimizerInfo("sgdsai_max", "sgdsai", {"max_normalized_gsnr": True}),
    # not the paper: embeddings, LM head and norms (the marked fallback groups) on AdamW at 10x the LR
    OptimizerInfo("sgdsai_adamw", "sgdsai", {"fallback": "adamw", "fallback_lr_ratio": 10.0}, marked_groups=True),
    OptimizerInfo("colrms", "colrms", rule=colrms.colrms_update, reference=colrms.colrms_update),
]
BY_ID = {info.id: info for info in OPTIM_DB}


def info(row: str) -> OptimizerInfo:
    return BY_ID[row]


def rows(backend: str | None = None, *, matrix_rule: bool | None = None,
         marked_groups: bool | None = None) -> list[OptimizerInfo]:
    """The rows an equality suite runs (``backend``), that have a matrix rule, or that need marked groups."""
    out = [r for r in OPTIM_DB if backend is None or backend in r.backends]
    if matrix_rule is not None:
        out = [r for r in out if (r.reference is not None) == matrix_rule]
    if marked_groups is not None:
        out = [r for r in out if r.marked_groups == marked_groups]
    return out

