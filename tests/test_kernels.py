"""The fused Triton kernels (``stateless_opt/kernels.py``) on the CPU, through Triton's interpreter.

Each kernel against the tensor-op expression it replaces, then SinkGD (stateless fallback, so both
of its fused updates run) and SGD-SaI with the kernels on, under DeepSpeed ZeRO-2 at world 2 (flat
partitions cut mid-row: the offsets the row/column kernel must get right), against the same float64
single-process reference and tolerances as ``test_deepspeed.py``. Everything runs in spawned ranks
with ``TRITON_INTERPRET=1`` set only for them: this process keeps the tensor-op paths the other tests
check. Triton ships with CUDA builds of torch; the CPU CI installs it for this file (``[test]`` extra).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import test_deepspeed as ds_tests  # noqa: E402  (the ZeRO harness: model, engine, reference, checks)
from dist_harness import Registry  # noqa: E402

CASES = Registry(__name__)
WORLD = 2


def _maxdiff(a, b) -> float:
    return float((a - b).abs().amax()) if a.numel() else 0.0


def case_kernels_match_tensor_ops(ctx):
    """Max |kernel - tensor-op expression| over one launch of several tensors (sizes below, at and
    above a block; offsets mid-row; first, later and untouched steps mixed), so every program must find
    its own tensor and read its own flags (interpreter: exact fp32 ops, so 0 up to a contraction into
    fused multiply-adds). Scalars come as numbers or float64 device tensors, flags from device memory."""
    import torch

    from stateless_opt import kernels

    assert kernels.available(torch.device("cpu")), "TRITON_INTERPRET=1 must make the kernels run on the CPU"
    gen = torch.Generator().manual_seed(ctx.rank)
    errs = {}
    items, refs = [], []
    sizes = ((1, 1), (5000, 2), (kernels.BLOCK + 3, 1), (0, 2), (3 * kernels.BLOCK, 0), (7, 2))  # (numel, mode)
    lr, wd, max_scale = 0.1, 0.1, 2.0
    flags = torch.tensor([0.1 * (i + 1) for i in range(len(sizes))] + [float(m) for _, m in sizes])
    for i, (numel, mode) in enumerate(sizes):
        p, g, m = (torch.randn(numel, generator=gen) for _ in range(3))
        m_ref = g.clone() if mode == 1 else m * 0.9 + g * 0.1
        scale = lr * flags[i].item() / max_scale
        refs.append((p * (1 - lr * wd) - scale * m_ref, m_ref) if mode else (p.clone(), m.clone()))
        items.append((p, g, m, kernels.address(flags, i), kernels.address(flags, len(sizes) + i)))
    kernels.sgd_sai_step_(items, lr=torch.tensor(lr, dtype=torch.float64), weight_decay=wd, mu=0.9,
                          max_scale=torch.tensor(max_scale))
    errs["sgd_sai"] = max(max(_maxdiff(p, pr), _maxdiff(m, mr)) for (p, _, m, *_), (pr, mr) in zip(items, refs))
    items, refs = [], []
    keep = torch.tensor([1.0, 0.0])
    for k, (rows, cols, start, end) in enumerate(((37, 53, 0, 37 * 53), (37, 53, 100, 1500), (5, 2100, 2000, 9000),
                                                  (1, 7, 3, 4), (3, 3, 4, 4))):
        G, P = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen)
        r, c = torch.rand(rows, generator=gen) + 0.5, torch.rand(cols, generator=gen) + 0.5
        items.append((P.reshape(-1)[start:end].clone(), G.reshape(-1)[start:end].clone(), r, c, start, cols,
                      kernels.address(keep, k % 2)))
        ref = (P * (1 - 0.1 * 0.2) - 0.1 * (r[:, None] * G * c[None, :])) if k % 2 == 0 else P
        refs.append(ref.reshape(-1)[start:end])
    kernels.row_col_scaled_update_(items, lr=0.1, weight_decay=0.2)
    errs["row_col"] = max(_maxdiff(it[0], ref) for it, ref in zip(items, refs))
    base = torch.randn(9000, generator=gen)
    ps = [torch.randn(n, generator=gen) for n in (1000, kernels.BLOCK + 5, 3)]
    offsets = (0, 3000, 8990)
    refs = [p * (1 - 0.1 * 0.3) - 0.1 * base[o : o + p.numel()] if k != 1 else p.clone()
            for k, (p, o) in enumerate(zip(ps, offsets))]
    kernels.update_from_(base, [(p, o, kernels.address(keep, int(k == 1))) for k, (p, o) in enumerate(zip(ps, offsets))],
                         lr=torch.tensor(0.1, dtype=torch.float64), weight_decay=torch.tensor(0.3, dtype=torch.float64))
    errs["update_from"] = max(_maxdiff(p, r) for p, r in zip(ps, refs))
    return errs


def case_zero2_with_kernels(ctx, kind):
    """``test_deepspeed``'s ZeRO-2 equality run, counting the kernel launches to prove they ran."""
    from stateless_opt import kernels

    calls = {"sgd_sai_step_": 0, "row_col_scaled_update_": 0}  # (kernels.<name> is looked up at each call)
    real = {name: getattr(kernels, name) for name in calls}

    def counting(name):
        def launch(*args, **kw):
            calls[name] += 1
            return real[name](*args, **kw)
        return launch

    for name in calls:
        setattr(kernels, name, counting(name))
    try:
        out = ds_tests._run_equal(ctx, 2, kind)
    finally:
        for name, fn in real.items():
            setattr(kernels, name, fn)
    out["kernel_calls"] = calls
    return out


CASES.add("kernels", case_kernels_match_tensor_ops, (WORLD,))
CASES.add("zero2_sinkgd", case_zero2_with_kernels, (WORLD,), kind="sinkgd")
CASES.add("zero2_sgdsai", case_zero2_with_kernels, (WORLD,), kind="sgdsai")


@pytest.fixture
def interpreted(monkeypatch):
    """TRITON_INTERPRET=1 for the spawned ranks only (they inherit the environment of the spawn)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernels_match_tensor_ops(interpreted):
    for r in CASES.result("kernels", WORLD, timeout=ds_tests.TIMEOUT):
        assert r["sgd_sai"] <= 1e-6 and r["row_col"] <= 1e-6 and r["update_from"] <= 1e-6, r  # O(1): an ulp ~1e-7


@pytest.mark.parametrize("kind", ["sinkgd", "sgdsai"])
def test_zero2_with_kernels_equals_single_process(interpreted, kind):
    per_rank = CASES.result(f"zero2_{kind}", WORLD, timeout=ds_tests.TIMEOUT)
    ds_tests._check_equal(per_rank[0], kind, 2)
    for r in per_rank:  # every rank holds fragments of every kind here, so every rank launched kernels
        if kind == "sgdsai":
            assert r["kernel_calls"]["sgd_sai_step_"] > 0, r["kernel_calls"]
        else:
            assert r["kernel_calls"]["row_col_scaled_update_"] > 0, r["kernel_calls"]
