"""The optimizer catalogue, like torch's ``optim_db`` (``OptimizerInfo`` in
``torch/testing/_internal/common_optimizers.py``): one row per optimizer variant. The generic tests
iterate it: the float64 references (``test_reference.py``), backend equality (``test_fsdp2.py``,
``test_ddp.py``, ``test_deepspeed.py``) and the memory accounting (``test_memory.py``). Adding an
optimizer, or a variant worth covering, adds a row; each test file keeps its own hyper-parameters
(learning rates fitted to its model) and states its tolerance rule from the row's properties.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

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


ALL = frozenset({"fsdp2", "zero", "tp"})
OPTIM_DB: list[OptimizerInfo] = [
    OptimizerInfo("swan", "swan", rule=swan.swan_update, reference=R.swan_update, amplifies_rounding=True,
                  backends=ALL),
    OptimizerInfo("swan_eigh", "swan", {"whitening": "eigh"}, swan.swan_update, R.swan_update,
                  backends=frozenset({"fsdp2", "zero"})),
    OptimizerInfo("swan_ns", "swan", {"whitening": "newton_schulz"}, swan.swan_update, R.swan_update,
                  amplifies_rounding=True),
    OptimizerInfo("swan_stateless", "swan", {"fallback": "stateless"}, swan.swan_update, R.swan_update,
                  amplifies_rounding=True),
    OptimizerInfo("swan_rowclip", "swan", {"fallback": "rowclip"}, swan.swan_update, R.swan_update,
                  amplifies_rounding=True),
    OptimizerInfo("sinkgd", "sinkgd", rule=sinkgd.sinkgd_update, reference=R.sinkgd_update,
                  backends=frozenset({"fsdp2", "tp"})),
    OptimizerInfo("sinkgd_stateless", "sinkgd", {"fallback": "stateless"}, sinkgd.sinkgd_update, R.sinkgd_update,
                  backends=frozenset({"zero", "tp"})),
    OptimizerInfo("sinkgd_rowclip", "sinkgd", {"fallback": "rowclip"}, sinkgd.sinkgd_update, R.sinkgd_update),
    OptimizerInfo("sgdsai", "sgdsai", backends=ALL),
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

