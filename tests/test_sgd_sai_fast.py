"""SGD-SaI's fused fp32 step (``torch._fused_sgd_``, one call per weight fragment) against the
float64 reference, and the generic path that still serves what it does not cover (bf16 weights,
momentum 0).

Tolerance: FP32_TOL (1e-5) of the path the reference weights travelled, as tests/test_reference.py:
fp32 arithmetic rounds ~6e-8 per operation, a few operations per entry and step. lr 1e-2 with weights
~1: the one-element tensor (scale 1) moves ~1e-2 a step, so fp32 storage of W (6e-8) stays far below.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference as R
import stateless_opt.sgd_sai as S
from stateless_opt import SGDSaI
from test_reference import FP32_TOL, _grads, _weight, traj_error

F64 = torch.float64
SHAPES = [(24, 10), (13,), (6, 3, 3, 3), (10, 6), (1,)]
ZERO_FIRST = 3  # this weight's first gradient is all zeros (LoRA A with B = 0): scale and m_1 at step 1


def _spy(monkeypatch) -> list[tuple[int, bool]]:
    """Record (data_ptr of the weight, is_first_step) of every fused call, then run the real kernel."""
    calls, real = [], torch._fused_sgd_

    def spy(params, grads, bufs, **kw):
        calls.extend((p.data_ptr(), kw["is_first_step"]) for p in params)
        return real(params, grads, bufs, **kw)

    monkeypatch.setattr(torch, "_fused_sgd_", spy)
    return calls


def _grad_lists(shapes, steps, seed):
    grads = [_grads(s, steps, seed + 10 * i) for i, s in enumerate(shapes)]
    grads[ZERO_FIRST][0] = torch.zeros(shapes[ZERO_FIRST])
    return grads


@pytest.mark.parametrize("max_normalized", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_fused_fp32_path_matches_reference(monkeypatch, wd, max_normalized):
    # max-normalised scales are <= 1, so lr 1e-1 (as tests/test_reference.py) keeps the smallest
    # movement (~1e-4 a step) well above fp32 storage of W ~ 1
    steps, lr, mu = 5, (1e-1 if max_normalized else 1e-2), 0.9
    ws = [_weight(s, i) for i, s in enumerate(SHAPES)]
    w0 = [w.detach().clone() for w in ws]
    grads = _grad_lists(SHAPES, steps, 0)
    opt = SGDSaI(ws, lr=lr, momentum=mu, weight_decay=wd, max_normalized_gsnr=max_normalized)
    ref = R.SGDSaIRef(lr, mu, 1e-8, wd, max_normalized)
    calls = _spy(monkeypatch)
    cur = [w.to(F64) for w in w0]
    traj, refs = [[] for _ in ws], [[] for _ in ws]
    for t in range(steps):
        calls.clear()
        for i, w in enumerate(ws):
            w.grad = grads[i][t].clone()
        opt.step()
        cur = ref.step(cur, [grads[i][t] for i in range(len(ws))])
        # every live weight went through the kernel once; is_first_step exactly at its first live step
        live = [i for i in range(len(ws)) if not (i == ZERO_FIRST and t == 0)]
        first = {i for i in live if t == (1 if i == ZERO_FIRST else 0)}
        assert sorted(calls) == sorted((ws[i].data_ptr(), i in first) for i in live)
        for i, w in enumerate(ws):
            traj[i].append(w.detach().clone())
            refs[i].append(cur[i].clone())
    if max_normalized:  # the zero-first weight's late scale must not be the max, or nothing changes
        assert max(ref.scale.values()) > ref.scale[ZERO_FIRST]
    assert torch.equal(traj[ZERO_FIRST][0], w0[ZERO_FIRST])  # an all-zero gradient: no step, no decay
    traj[ZERO_FIRST], refs[ZERO_FIRST] = traj[ZERO_FIRST][1:], refs[ZERO_FIRST][1:]
    for i, w in enumerate(ws):
        assert traj_error(traj[i], refs[i], w0[i]) < FP32_TOL, i
        # the buffer: relative to its size, a few fp32 roundings per step
        buf = opt.state[w]["momentum_buffer"].to(F64)
        assert (buf - ref.buf[i]).abs().max().item() < 1e-6 * ref.buf[i].abs().max().item(), i
        assert math.isclose(opt.state[w]["gsnr"].item(), ref.scale[i], rel_tol=1e-6)


def _mixed_run(steps=4):
    """fp32, bf16, fp32 weights in one group (bf16 with stochastic rounding, seeded by the step)."""
    dtypes = [torch.float32, torch.bfloat16, torch.float32]
    shapes = [(24, 10), (9, 7), (13,)]
    ws = [_weight(s, 70 + i, dt, scale=0.02 if dt == torch.bfloat16 else 1.0)
          for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    w0 = [w.detach().clone() for w in ws]
    grads = [[g.to(dt) for g in _grads(s, steps, 80 + i)] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
    opt = SGDSaI(ws, lr=1e-2, weight_decay=0.1)
    traj = [[] for _ in ws]
    for t in range(steps):
        for w, g in zip(ws, grads):
            w.grad = g[t].clone()
        opt.step()
        for i, w in enumerate(ws):
            traj[i].append(w.detach().clone())
    return ws, w0, grads, traj


def test_mixed_group_bf16_weight_keeps_generic_path(monkeypatch):
    calls = _spy(monkeypatch)
    ws, w0, grads, traj = _mixed_run()
    assert {ptr for ptr, _ in calls} == {ws[0].data_ptr(), ws[2].data_ptr()}  # never the bf16 weight
    # the fp32 weights against the float64 reference (the bf16 one is tests/test_reference.py's)
    ref, cur, refs = R.SGDSaIRef(1e-2, 0.9, 1e-8, 0.1), [w0[0].to(F64), w0[2].to(F64)], [[], []]
    for t in range(len(traj[0])):
        cur = ref.step(cur, [grads[0][t], grads[2][t]])
        for k in range(2):
            refs[k].append(cur[k].clone())
    assert traj_error(traj[0], refs[0], w0[0]) < FP32_TOL
    assert traj_error(traj[2], refs[1], w0[2]) < FP32_TOL
    # the bf16 weight: bit for bit what the generic path alone gives (same math, same rounding noise)
    monkeypatch.setattr(S, "_fusable", lambda *a: False)
    calls.clear()
    _, _, _, generic = _mixed_run()
    assert not calls
    assert all(torch.equal(a, b) for a, b in zip(traj[1], generic[1]))


def test_zero_momentum_takes_generic_path(monkeypatch):
    # The kernel keeps no buffer without momentum: SGD-SaI's m = g must stay in the state.
    calls = _spy(monkeypatch)
    ws, steps = [_weight((24, 10), 0), _weight((13,), 1)], 3
    w0 = [w.detach().clone() for w in ws]
    grads = [_grads(w.shape, steps, 10 * i) for i, w in enumerate(ws)]
    opt, ref = SGDSaI(ws, lr=1e-2, momentum=0.0, weight_decay=0.5), R.SGDSaIRef(1e-2, 0.0, 1e-8, 0.5)
    cur, traj, refs = [w.to(F64) for w in w0], [[], []], [[], []]
    for t in range(steps):
        for w, g in zip(ws, grads):
            w.grad = g[t].clone()
        opt.step()
        cur = ref.step(cur, [g[t] for g in grads])
        for i, w in enumerate(ws):
            traj[i].append(w.detach().clone())
            refs[i].append(cur[i].clone())
    assert not calls
    for i, w in enumerate(ws):
        assert traj_error(traj[i], refs[i], w0[i]) < FP32_TOL
        assert torch.equal(opt.state[w]["momentum_buffer"], grads[i][-1])
