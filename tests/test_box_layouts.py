"""Box shards: weights split by columns (tensor parallel ``Shard(1)``) and by rows x columns (a 2 x 2
mesh), through a hand-made layout of about thirty lines, equal the float64 single-process reference.

This is what the tensor-parallel issue builds on: a new backend is one layout (``BoxLayout`` below:
which box of each weight this rank holds, and over which process groups rows and columns are split),
not a second copy of the algorithms. SWAN gathers whole matrices from boxes to their owners, SinkGD
reduces row statistics over the ranks that split columns and column statistics over those that split
rows, SGD-SaI sums its scalar statistics over all holders, and the stateless fallback (rows of a 2-D
box, and a 1-D tensor cut as a flat range next to them) and the AdamW fallback run on the same pieces;
the "rowclip" fallback floors each row at the whole tensor's RMS row norm, which only the sum over
every holder gives (without it the 2 x 2 embedding is off by 0.23 of its path).

Weights (uneven on purpose): matrices 13x16, 11x13, 5x11 and 1x5 (the 1-row head leaves the second row
block of the 2 x 2 mesh empty), a 9x6 embedding and a 7-element bias (fallback rule). Each rank holds
only its boxes (its own local tensors, as tensor parallelism does); the gradients are the same global
ones on every rank, so the reference is the update of the whole weights in float64.

Tolerance: FP32_TOL (1e-5) of the path the reference weights travelled, as tests/test_reference.py:
fp32 arithmetic against float64; the sharded run only adds reordered fp32 sums (~1e-7 relative). A box
whitened alone, a missed row or column reduction, or a piece put back in the wrong place is off by
1e-2 .. 1 (seen by breaking the layout on purpose).

The cases ride in test_fsdp2's spawns (world 2 and 4): no spawn of their own.
"""

from __future__ import annotations

import math

import pytest

import optim_db
from test_fsdp2 import CASES
from test_reference import FP32_TOL

MATRICES = {"w1": (13, 16), "w2": (11, 13), "w3": (5, 11), "head": (1, 5)}
FALLBACK = {"emb": (9, 6), "bias": (7,)}
# matrix rule via owners, via row/col norms, elementwise; rowclip: the fallback whose norm floor is the
# whole tensor's scale (a 2 x 2 box holds a quarter of the embedding: its norm adds up over all holders)
ROWS = ("swan", "sinkgd_stateless", "sgdsai", "sinkgd_rowclip")
STEPS = 3
LR, WD = 0.05, 0.1


def _chunk(size: int, parts: int, i: int) -> tuple[int, int]:
    """torch.chunk's i-th piece of range(size) (ceil-sized, trailing pieces may be empty)."""
    step = -(-size // parts)
    return min(i * step, size), min((i + 1) * step, size)


def _grads(step: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=g) + 0.3 * (step + 1) for n, s in {**MATRICES, **FALLBACK}.items()}


def _weights() -> dict:
    import torch

    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(s, generator=g) for n, s in {**MATRICES, **FALLBACK}.items()}


class BoxLayout:
    """Every 2-D weight as a box: rows cut over ``grid[0]`` row blocks, columns over ``grid[1]`` column
    blocks (rank = row block * grid[1] + column block); 1-D weights as flat ranges over all ranks.
    ``row_groups``: the ranks of this rank's row block (they split its columns); ``col_groups``: those of
    its column block."""

    def __init__(self, grid: tuple[int, int], tensors: dict, shapes: dict):
        import torch.distributed as dist

        from stateless_opt.layouts import Box, FlatRange

        self.grid, self.tensors, self.shapes = grid, tensors, shapes
        rows, cols = grid
        # every rank creates every subgroup, in the same order (a collective call)
        by_row = [dist.new_group([r * cols + c for c in range(cols)]) for r in range(rows)]
        by_col = [dist.new_group([r * cols + c for r in range(rows)]) for c in range(cols)]
        me = dist.get_rank()
        self.row_groups = (by_row[me // cols],) if cols > 1 else ()
        self.col_groups = (by_col[me % cols],) if rows > 1 else ()
        self.extents = {}
        for name, shape in shapes.items():
            if len(shape) == 2:
                self.extents[name] = [Box(*_chunk(shape[0], rows, r // cols), *_chunk(shape[1], cols, r % cols))
                                      for r in range(rows * cols)]
            else:
                self.extents[name] = [FlatRange(*_chunk(shape[0], rows * cols, r)) for r in range(rows * cols)]

    def local(self, name: str, full):
        """This rank's piece of a full tensor, as a contiguous local tensor."""
        import torch.distributed as dist

        e = self.extents[name][dist.get_rank()]
        if len(self.shapes[name]) == 2:
            return full[e.r0:e.r1, e.c0:e.c1].contiguous()
        return full[e.start:e.end].contiguous()

    def shards(self, tensor, group, key):  # the Layout protocol
        import torch.distributed as dist

        from stateless_opt.layouts import WeightShard

        name = self.tensors.get(id(tensor))
        if name is None:
            return None
        flat = len(self.shapes[name]) == 1
        return [WeightShard(key, self.shapes[name], self.extents[name], dist.get_rank(), tensor.grad.view(-1),
                            tensor.data.view(-1), group=None,
                            row_groups=(None,) if flat else self.row_groups,
                            col_groups=(None,) if flat else self.col_groups)]


def box_equivalence(ctx, row: str, grid: tuple[int, int]):
    """``STEPS`` steps of catalogue row ``row`` on this rank's boxes; returns every piece after each step."""
    import torch

    shapes = {**MATRICES, **FALLBACK}
    full = _weights()
    params, tensors = {}, {}
    layout = BoxLayout(grid, tensors, shapes)
    for name, w in full.items():
        params[name] = torch.nn.Parameter(layout.local(name, w))
        tensors[id(params[name])] = name
    info = optim_db.info(row)
    if info.splits_rules:
        groups = [{"params": [params[n] for n in MATRICES], "rule": "matrix"},
                  {"params": [params[n] for n in FALLBACK], "rule": "fallback"}]
        opt = info.make(groups, lr=LR, weight_decay=WD, fallback_lr_ratio=1.0)
    else:
        opt = info.make(list(params.values()), lr=LR, weight_decay=WD)
    opt.add_layout(layout)
    out = []
    for step in range(STEPS):
        grads = _grads(step)
        for name, p in params.items():
            p.grad = layout.local(name, grads[name])
        opt.step()
        out.append({n: (layout.extents[n][ctx.rank], p.detach().clone()) for n, p in params.items()})
    return {"pieces": out, "skipped": opt.skipped_steps, "state": {n: sorted(opt.state[p]) for n, p in params.items()}}


for _row in ROWS:
    CASES.add(f"box_cols_{_row}", box_equivalence, (2,), row=_row, grid=(1, 2))
    CASES.add(f"box_2x2_{_row}", box_equivalence, (4,), row=_row, grid=(2, 2))


# ------------------------------------------------------------------------------------------ parent side
def float64_trajectory(row: str, start: dict, grads: list[dict], rules: dict, lr: float, wd: float) -> list[dict]:
    """The float64 trajectory of whole weights (tests/reference.py) under catalogue row ``row``: by the
    row's matrix reference for ``rules[name] == "matrix"``, the row's fallback rule for the others,
    SGD-SaI's reference for every weight of an elementwise row; one entry per step."""
    import reference as R

    info = optim_db.info(row)
    w = {n: v.double() for n, v in start.items()}
    kw = info.kwargs(lr=lr, weight_decay=wd)
    sai = R.SGDSaIRef(lr, weight_decay=wd) if not info.splits_rules else None
    adam = {n: R.AdamWRef(lr, weight_decay=wd) for n in w if rules[n] == "fallback"}
    out = []
    for g in grads:
        if sai is not None:
            names = list(w)
            w = dict(zip(names, sai.step([w[n] for n in names], [g[n] for n in names])))
        else:
            for n in w:
                if rules[n] == "matrix":
                    w[n] = (1 - lr * wd) * w[n] - lr * info.reference(g[n])
                elif kw.get("fallback", "adamw") == "adamw":
                    w[n] = adam[n].step(w[n], g[n])
                else:
                    rule = {"stateless": R.stateless_fallback_update, "rowclip": R.rowclip_fallback_update}
                    w[n] = (1 - lr * wd) * w[n] - lr * rule[kw["fallback"]](g[n])
        out.append({n: v.clone() for n, v in w.items()})
    return out


def path_error(got: dict, ref: list[dict], start: dict, step: int) -> dict:
    """Per weight: max |W - W_ref| at ``step`` over the path the reference travelled up to it (the
    trajectory error of tests/test_reference.py)."""
    out = {}
    for n, w in got.items():
        path = sum((ref[t][n] - (ref[t - 1][n] if t else start[n].double())).abs().max().item()
                   for t in range(step + 1))
        out[n] = (w.double() - ref[step][n]).abs().max().item() / path
    return out


def _reference(row: str) -> list[dict]:
    rules = {**{n: "matrix" for n in MATRICES}, **{n: "fallback" for n in FALLBACK}}
    return float64_trajectory(row, _weights(), [_grads(t) for t in range(STEPS)], rules, LR, WD)


def _assemble(per_rank: list[dict], step: int) -> dict:
    import torch

    full = {n: torch.full(s, float("nan"), dtype=torch.float64) for n, s in {**MATRICES, **FALLBACK}.items()}
    for res in per_rank:
        for n, (e, piece) in res["pieces"][step].items():
            if len(full[n].shape) == 2:
                full[n][e.r0:e.r1, e.c0:e.c1] = piece.double()
            else:
                full[n][e.start:e.end] = piece.double()
    return full


@pytest.mark.parametrize("layout,world", [("cols", 2), ("2x2", 4)])
@pytest.mark.parametrize("row", ROWS)
def test_box_layout_equals_float64_reference(row, layout, world):
    per_rank = CASES.result(f"box_{layout}_{row}", world)
    ref = _reference(row)
    start = _weights()
    errs = []
    for step in range(STEPS):
        got = _assemble(per_rank, step)
        for n in got:
            assert not got[n].isnan().any(), (n, "the boxes must tile the weight")
        errs += [(e, n, step) for n, e in path_error(got, ref, start, step).items()]
    assert max(errs)[0] < FP32_TOL, max(errs)
    assert all(res["skipped"] == 0 for res in per_rank)
    if row != "sgdsai":  # stateless matrix rule: no state for the matrices on any rank
        assert all(res["state"][n] == [] for res in per_rank for n in MATRICES)
    assert math.isfinite(max(errs)[0])
