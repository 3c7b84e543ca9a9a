"""SGDSaI against the official package (``sgd-sai`` 1.0.3, ``sgd_sai.SGD_sai``), and each deliberate
fix over it (docs/algorithms.md, SGD-SaI): zero first gradients, one-element tensors, fp32 scales
that survive a checkpoint, and the paper's max-normalised variant."""

from __future__ import annotations

import io
import math

import pytest
import torch
from sgd_sai import SGD_sai  # test dependency: pyproject [test] pins sgd-sai==1.0.3
from torch import nn

import reference as R
from stateless_opt import SGDSaI

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(steps: int, seed: int = 1):
    g = _gen(seed)
    return [(torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)) for _ in range(steps)]


def _train(model, opt, batches, snapshot=None):
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if snapshot is not None:
            snapshot.append([p.detach().clone() for p in model.parameters()])


@pytest.mark.parametrize("hp", [
    dict(lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2),  # the official defaults
    dict(lr=3e-3, momentum=0.5, eps=1e-6, weight_decay=0.3),
])
def test_matches_official_on_small_network(hp, capsys):
    # Each optimizer trains its own copy end to end (forward, backward, step) for 6 steps.
    # Tolerance 1e-5 relative to how far each tensor moved, plus 1e-7 of |W| for fp32 storage: both
    # run fp32; the official takes the scale from fp32 norm/std, ours from float64 sums (~1e-7
    # apart), and the difference feeds back through the next forward passes.
    ours_model, theirs_model = _net(), _net()
    start = [p.detach().clone() for p in ours_model.parameters()]
    ours, theirs = SGDSaI(ours_model.parameters(), **hp), SGD_sai(theirs_model.parameters(), **hp)
    a, b = [], []
    batches = _batches(6)
    _train(ours_model, ours, batches, a)
    _train(theirs_model, theirs, batches, b)
    capsys.readouterr()  # the official package prints a banner on its first step
    for step, (pa, pb) in enumerate(zip(a, b)):
        for x, y, s in zip(pa, pb, start):
            moved = (y - s).abs().max().item()
            assert moved > 1e-4
            err = (x - y).abs().max().item()
            assert err < 1e-5 * moved + 1e-7 * y.abs().max().item(), f"step {step}: {err / moved:.2e}"
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        assert math.isclose(ours.state[p]["gsnr"].item(), theirs.state[q]["gsnr"].item(), rel_tol=1e-5)


class LoRALinear(nn.Module):
    """y = W0 x + B A x with B = 0 at init: A's first gradient is exactly zero."""

    def __init__(self):
        super().__init__()
        g = _gen(5)
        self.register_buffer("w0", torch.randn(6, 10, generator=g))
        self.a = nn.Parameter(torch.randn(3, 10, generator=g) * 0.1)
        self.b = nn.Parameter(torch.zeros(6, 3))

    def forward(self, x):
        return x @ self.w0.T + (x @ self.a.T) @ self.b.T


def test_zero_first_gradient_takes_scale_at_first_nonzero(capsys):
    # LoRA A with B = 0: step 1 gives A an all-zero gradient. The official code takes A's scale from
    # it (0 / (0 + eps) = 0) and A never moves again; ours leaves A alone at step 1 (no update, no
    # scale) and takes its scale at step 2, from its first non-zero gradient.
    hp = dict(lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=0.0)
    models = [LoRALinear(), LoRALinear()]
    a0 = models[0].a.detach().clone()
    ours, theirs = SGDSaI(models[0].parameters(), **hp), SGD_sai(models[1].parameters(), **hp)
    g = _gen(6)
    batches = [(torch.randn(16, 10, generator=g), torch.randn(16, 6, generator=g)) for _ in range(4)]
    first_nonzero = None
    for t, (x, y) in enumerate(batches):
        for m, o in zip(models, (ours, theirs)):
            o.zero_grad(set_to_none=True)
            nn.functional.mse_loss(m(x), y).backward()
        if t == 0:
            assert torch.count_nonzero(models[0].a.grad) == 0
            ours.step()
            assert torch.equal(models[0].a.detach(), a0)
            # only the zero-filled template (torch.distributed.checkpoint loads into it): no scale yet
            assert torch.isnan(ours.state[models[0].a]["gsnr"]).all()
            assert torch.count_nonzero(ours.state[models[0].a]["momentum_buffer"]) == 0
        else:
            if first_nonzero is None:
                first_nonzero = models[0].a.grad.clone()
            ours.step()
        theirs.step()
    capsys.readouterr()
    assert theirs.state[models[1].a]["gsnr"].item() == 0.0
    assert torch.equal(models[1].a.detach(), a0)  # official: frozen forever
    assert ours.state[models[0].a]["gsnr"].item() == pytest.approx(R.gsnr(first_nonzero, 1e-8), rel=1e-6)
    assert (models[0].a.detach() - a0).abs().max() > 1e-3  # ours: trains


def test_zero_first_gradient_matches_reference():
    # Same fix on plain tensors against the float64 reference (which skips all-zero gradients and
    # starts momentum at the first non-zero one).
    shapes = [(5, 7), (9,)]
    ws = [nn.Parameter(torch.randn(s, generator=_gen(i))) for i, s in enumerate(shapes)]
    w0 = [w.detach().to(F64).clone() for w in ws]
    opt = SGDSaI(ws, lr=1e-2, weight_decay=0.1)
    ref = R.SGDSaIRef(lr=1e-2, weight_decay=0.1)
    cur = w0
    g = _gen(9)
    for t in range(4):
        grads = [torch.randn(s, generator=g) + 0.5 for s in shapes]
        if t < 2:
            grads[0] = torch.zeros(shapes[0])
        for w, gr in zip(ws, grads):
            w.grad = gr
        opt.step()
        cur = ref.step(cur, grads)
        for w, c in zip(ws, cur):
            assert (w.detach().to(F64) - c).abs().max() < 1e-6
    assert opt.state[ws[0]]["gsnr"].item() == pytest.approx(ref.scale[0], rel=1e-6)


@pytest.mark.filterwarnings(r"ignore:std\(\)")  # the official code's std of one number
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_one_element_tensor_gets_scale_one(shape, capsys):
    # A single number has no spread: ours uses scale 1, so the first step is exactly lr * g; the
    # official gives |g| / (0 + eps), a step 1e8 times larger.
    lr = 1e-2
    ours_p = nn.Parameter(torch.full(shape, 0.5))
    theirs_p = nn.Parameter(torch.full(shape, 0.5))
    ours, theirs = SGDSaI([ours_p], lr=lr, weight_decay=0.0), SGD_sai([theirs_p], lr=lr, weight_decay=0.0)
    for p in (ours_p, theirs_p):
        p.grad = torch.full(shape, 0.25)
    ours.step()
    theirs.step()
    capsys.readouterr()
    assert ours.state[ours_p]["gsnr"].item() == 1.0
    assert torch.isfinite(ours_p).all()
    assert ours_p.detach().item() == pytest.approx(0.5 - lr * 0.25, rel=1e-7)
    assert abs(theirs_p.detach().item() - 0.5) > 1e5 * abs(ours_p.detach().item() - 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scales_are_fp32_cpu_and_survive_checkpoint(dtype, capsys):
    # The scale is fp32 CPU state in state_dict(); after loading into a fresh optimizer it is still
    # fp32 (torch would cast it to a bf16 parameter's dtype) and is NOT recomputed from the next
    # gradient. The official package recomputes it after a resume.
    def make():
        torch.manual_seed(0)
        return nn.Linear(12, 6).to(dtype)

    model = make()
    opt = SGDSaI(model.parameters(), lr=1e-3)
    x = torch.randn(8, 12, generator=_gen(1)).to(dtype)
    model(x).square().sum().backward()
    opt.step()
    scales = {n: opt.state[p]["gsnr"].clone() for n, p in model.named_parameters()}
    for s in scales.values():
        assert s.dtype == torch.float32 and s.device.type == "cpu" and s.numel() == 1
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)

    resumed = make()
    resumed.load_state_dict(ckpt["model"])
    opt2 = SGDSaI(resumed.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["opt"])
    for n, p in resumed.named_parameters():
        assert opt2.state[p]["gsnr"].dtype == torch.float32 and opt2.state[p]["gsnr"].device.type == "cpu"
        assert torch.equal(opt2.state[p]["gsnr"], scales[n])
        assert opt2.state[p]["momentum_buffer"].dtype == dtype
    # a very different gradient (constant plus tiny noise: huge SNR) does not change the scales
    for p in resumed.parameters():
        p.grad = (torch.ones_like(p, dtype=torch.float32) + 1e-3 * torch.randn(p.shape, generator=_gen(2))).to(dtype)
    opt2.step()
    for n, p in resumed.named_parameters():
        assert torch.equal(opt2.state[p]["gsnr"], scales[n])

    if dtype == torch.float32:  # the official package loses the scale on resume
        off_model = make()
        off = SGD_sai(off_model.parameters(), lr=1e-3)
        off_model(x).square().sum().backward()
        off.step()
        before = {n: off.state[p]["gsnr"].item() for n, p in off_model.named_parameters()}
        off2 = SGD_sai(off_model.parameters(), lr=1e-3)
        off2.load_state_dict(off.state_dict())
        for p in off_model.parameters():
            p.grad = torch.ones_like(p) + 1e-3 * torch.randn(p.shape, generator=_gen(2))
        off2.step()
        capsys.readouterr()
        after = {n: off2.state[p]["gsnr"].item() for n, p in off_model.named_parameters()}
        assert all(abs(after[n] / before[n] - 1) > 0.5 for n in before)


def test_max_normalized_gsnr_divides_by_max():
    # Paper's Alg. 1 variant: the largest-scale tensor moves by exactly lr * g on its first step,
    # every other one by lr * (scale / max) * g. The default (official) does not divide.
    g = _gen(11)
    shapes = [(16, 16), (40,), (3, 5)]
    grads = [torch.randn(s, generator=g) + (0.5 if i == 0 else 0.0) for i, s in enumerate(shapes)]
    scales = [R.gsnr(gr, 1e-8) for gr in grads]
    top = max(scales)
    assert top / min(scales) > 1.5
    for normalized in (True, False):
        ws = [nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = SGDSaI(ws, lr=1e-2, weight_decay=0.0, max_normalized_gsnr=normalized)
        for w, gr in zip(ws, grads):
            w.grad = gr.clone()
        opt.step()
        for w, gr, sc in zip(ws, grads, scales):
            expect = -1e-2 * (sc / top if normalized else sc) * gr.to(F64)
            assert (w.detach().to(F64) - expect).abs().max() < 1e-6 * expect.abs().max()
            assert opt.state[w]["gsnr"].item() == pytest.approx(sc, rel=1e-6)  # stored unnormalised


def test_official_reference_agrees_with_our_float64_reference(capsys):
    # Ties reference.SGDSaIRef to the official code on non-degenerate gradients (fed identical
    # gradients, 5 steps): fp32 official vs float64 reference, 1e-5 of the movement.
    shapes = [(6, 9), (11,), (2, 3, 4)]
    ws = [nn.Parameter(torch.randn(s, generator=_gen(20 + i))) for i, s in enumerate(shapes)]
    w0 = [w.detach().to(F64).clone() for w in ws]
    off = SGD_sai(ws, lr=1e-2, momentum=0.8, eps=1e-8, weight_decay=0.2)
    ref = R.SGDSaIRef(lr=1e-2, momentum=0.8, eps=1e-8, weight_decay=0.2)
    cur = w0
    g = _gen(21)
    for _ in range(5):
        grads = [torch.randn(s, generator=g) + 0.2 for s in shapes]
        for w, gr in zip(ws, grads):
            w.grad = gr
        off.step()
        cur = ref.step(cur, grads)
    capsys.readouterr()
    for w, c, s in zip(ws, cur, w0):
        assert (w.detach().to(F64) - c).abs().max() < 1e-5 * (c - s).abs().max()


def test_official_hyperparameter_defaults_are_ours():
    ours = SGDSaI([nn.Parameter(torch.zeros(2))]).defaults
    theirs = SGD_sai([nn.Parameter(torch.zeros(2))]).defaults
    for k, v in theirs.items():
        assert ours[k] == v, k
