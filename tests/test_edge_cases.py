"""Edge cases of the single-process optimizers: zero and non-finite gradients, empty groups, params
without gradients, checkpoint/resume bit-for-bit, bf16 stochastic rounding, and the split of a real
(tiny, randomly initialised) transformers LlamaForCausalLM into matrix / fallback rules."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import reference as R
from stateless_opt import SGDSaI, SinkGD, SWAN, param_groups

# (name, constructor) for every optimizer / fallback combination with different state
OPTIMIZERS = {
    "swan-adamw": lambda ps, **kw: SWAN(ps, **{"lr": 0.02, "weight_decay": 0.1, **kw}),
    "swan-stateless": lambda ps, **kw: SWAN(ps, **{"lr": 0.02, "weight_decay": 0.1, "fallback": "stateless", **kw}),
    "sinkgd-adamw": lambda ps, **kw: SinkGD(ps, **{"lr": 0.02, "weight_decay": 0.1, **kw}),
    "sinkgd-stateless": lambda ps, **kw: SinkGD(ps, **{"lr": 0.02, "weight_decay": 0.1, "fallback": "stateless", **kw}),
    "sgdsai": lambda ps, **kw: SGDSaI(ps, **{"lr": 1e-3, "weight_decay": 0.1, **kw}),
}
STATEFUL = {"swan-adamw", "sinkgd-adamw", "sgdsai"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(dtype=torch.float32, seed=0) -> list[nn.Parameter]:
    """A tall matrix, a wide one, a conv weight, a bias and a scalar."""
    g = _gen(seed)
    shapes = [(12, 5), (5, 12), (4, 2, 3, 3), (7,), ()]
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _set_grads(params, seed: int) -> None:
    g = _gen(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) + 0.1).to(p.dtype)


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------ zero gradients
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_all_zero_gradient_is_a_no_op(name):
    # No update, no weight decay, no counter; stateful rules only get their zero-filled template
    # (what torch.distributed.checkpoint loads into), stateless ones get nothing.
    ps = _params()
    opt = OPTIMIZERS[name](ps)
    before = _snapshot(ps)
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert _same(before, _snapshot(ps))
    assert all(g["step"] == 0 and g["skipped_steps"] == 0 for g in opt.param_groups)
    assert opt.skipped_steps == 0
    if name not in STATEFUL:
        assert len(opt.state) == 0
    for p, st in opt.state.items():
        for k, v in st.items():
            if k == "gsnr":
                assert torch.isnan(v).all()
            else:
                assert torch.count_nonzero(v) == 0, k  # moments, momentum and AdamW's step all zero
    if name != "sgdsai":  # the matrix rule itself never has state
        matrix = [p for g in opt.param_groups for p in g["params"] if opt.weight_rule(g, tuple(p.shape)) == "matrix"]
        assert len(matrix) == 3 and not any(p in opt.state for p in matrix)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_gradient_step_does_not_change_later_steps(name):
    # A run with a zero-gradient step inserted (DCP's save/load step, lr 0) equals one without it,
    # bit for bit, in fp32 and bf16 (stochastic rounding is seeded by the step counter).
    for dtype in (torch.float32, torch.bfloat16):
        runs = []
        for insert in (False, True):
            ps = _params(dtype)
            opt = OPTIMIZERS[name](ps)
            if insert:
                for p in ps:
                    p.grad = torch.zeros_like(p)
                for g in opt.param_groups:
                    g["lr"], lr = 0.0, g["lr"]
                opt.step()
                for g in opt.param_groups:
                    g["lr"] = lr
            for t in range(3):
                _set_grads(ps, t)
                opt.step()
            runs.append(_snapshot(ps))
        assert _same(*runs), dtype


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_gradient_weight_next_to_live_ones(name):
    # In one group, the zero-gradient weight is untouched (no weight decay) while the others step
    # and the group's counter advances once.
    ps = _params()
    opt = OPTIMIZERS[name](ps)
    before = _snapshot(ps)
    _set_grads(ps, 0)
    ps[0].grad.zero_()
    ps[3].grad.zero_()
    opt.step()
    after = _snapshot(ps)
    for i in range(len(ps)):
        assert torch.equal(before[i], after[i]) == (i in (0, 3)), i
    assert all(g["step"] == 1 for g in opt.param_groups)
    if name in STATEFUL:
        key = "gsnr" if name == "sgdsai" else None
        if key:
            assert torch.isnan(opt.state[ps[0]]["gsnr"]).all() and not torch.isnan(opt.state[ps[1]]["gsnr"]).any()
        else:
            assert opt.state[ps[3]]["step"].item() == 0 and opt.state[ps[4]]["step"].item() == 1


# ------------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 2, 3, 4])  # matrix, conv, 1-D, 0-D
@pytest.mark.parametrize("name", ["swan-adamw", "sinkgd-stateless", "sgdsai"])
def test_non_finite_gradient_skips_whole_step(name, where, bad):
    ps = _params()
    opt = OPTIMIZERS[name](ps)
    _set_grads(ps, 0)
    opt.step()  # a real step first, so there is state and a counter to protect
    state_before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    steps_before = [g["step"] for g in opt.param_groups]
    before = _snapshot(ps)
    _set_grads(ps, 1)
    ps[where].grad.view(-1)[0] = bad
    opt.step()
    assert _same(before, _snapshot(ps))
    assert opt.skipped_steps == 1
    assert [g["step"] for g in opt.param_groups] == steps_before
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, state_before[id(p)][k]) or (torch.isnan(v).all() and torch.isnan(state_before[id(p)][k]).all())
    _set_grads(ps, 2)  # training goes on
    opt.step()
    assert opt.skipped_steps == 1
    assert not _same(before, _snapshot(ps))
    assert all(torch.isfinite(p).all() for p in ps)


def test_huge_finite_gradient_is_not_skipped():
    """A finite gradient whose sum of squares overflows fp32 (|g| ~ 1e20, squares ~ 1e40) is a real
    gradient: the step runs (screening looks at each gradient's largest magnitude, not at an
    overflowing sum of squares) and SGD-SaI's update matches the float64 rule."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 6))
    w0 = w.detach().clone()
    opt = SGDSaI([w], lr=1e-3, weight_decay=0.0, fused=False)
    w.grad = torch.randn(4, 6) * 1e20
    g = w.grad.double()
    opt.step()
    assert opt.skipped_steps == 0
    snr = g.norm() / g.std()  # SGD-SaI's g-SNR (std unbiased), float64; momentum starts at g
    expected = w0.double() - 1e-3 * snr * g
    # fp32 rounding of the update (|u| ~ 1e18) dominates: relative 1e-6 of the update's scale
    assert torch.allclose(w.detach().double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_non_finite_first_step_creates_no_state():
    for name in STATEFUL:
        ps = _params()
        opt = OPTIMIZERS[name](ps)
        _set_grads(ps, 0)
        ps[1].grad[0, 0] = float("nan")
        opt.step()
        assert len(opt.state) == 0 and opt.skipped_steps == 1, name


# ------------------------------------------------------------------------------------ groups
@pytest.mark.parametrize("cls", [SWAN, SinkGD, SGDSaI])
def test_empty_parameter_list_raises(cls):
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_empty_group_and_params_without_grads(name):
    ps = _params()
    opt = OPTIMIZERS[name]([{"params": []}, {"params": ps}])
    before = _snapshot(ps)
    opt.step()  # nothing has a gradient: a no-op
    assert _same(before, _snapshot(ps))
    assert all(g["step"] == 0 for g in opt.param_groups) and len(opt.state) == 0
    _set_grads(ps, 0)
    ps[1].grad = None
    ps[4].grad = None
    opt.step()
    after = _snapshot(ps)
    assert torch.equal(before[1], after[1]) and torch.equal(before[4], after[4])
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[3], after[3])
    assert ps[1] not in opt.state and ps[4] not in opt.state
    for g in opt.param_groups:
        assert g["step"] == (1 if g["params"] else 0)


# ------------------------------------------------------------------------------------ checkpoints
def _run(name, dtype, steps, seed0, ps=None, opt=None):
    ps = ps or _params(dtype)
    opt = opt or OPTIMIZERS[name](ps)
    for t in range(steps):
        _set_grads(ps, seed0 + t)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS) + ["sgdsai-max"])
def test_resume_continues_bit_for_bit(name, dtype):
    # 3 steps, checkpoint (torch.save of weights + optimizer.state_dict()), 3 more steps; a fresh
    # model + optimizer loaded from the checkpoint replays the last 3 steps exactly (torch.equal),
    # including AdamW moments, SGD-SaI scales and bf16 stochastic rounding (seeded by the step).
    make = (lambda ps: OPTIMIZERS["sgdsai"](ps, max_normalized_gsnr=True)) if name == "sgdsai-max" else OPTIMIZERS[name]
    ps = _params(dtype)
    opt = make(ps)
    _run(name, dtype, 3, 0, ps, opt)
    buf = io.BytesIO()
    torch.save({"w": _snapshot(ps), "opt": opt.state_dict()}, buf)
    _run(name, dtype, 3, 10, ps, opt)
    expected = _snapshot(ps)

    buf.seek(0)
    ckpt = torch.load(buf)
    ps2 = [nn.Parameter(w.clone()) for w in ckpt["w"]]
    opt2 = make(ps2)
    opt2.load_state_dict(ckpt["opt"])
    for p, q in zip(ps, ps2):  # state dtypes survive (fp32 moments / scales for bf16 weights)
        for k, v in opt.state.get(p, {}).items():
            assert opt2.state[q][k].dtype == v.dtype and opt2.state[q][k].device == v.device, k
    _run(name, dtype, 3, 10, ps2, opt2)
    assert _same(expected, _snapshot(ps2))
    for p, q in zip(ps, ps2):
        for k, v in opt.state.get(p, {}).items():
            assert torch.equal(v, opt2.state[q][k]) or (torch.isnan(v).all() and torch.isnan(opt2.state[q][k]).all()), k
    assert [g["step"] for g in opt.param_groups] == [g["step"] for g in opt2.param_groups]

    # ... and the checkpoint matters: without load_state_dict the continuation differs (except for
    # fp32 stateless rules, which have nothing to carry)
    ps3 = [nn.Parameter(w.clone()) for w in ckpt["w"]]
    _run(name, dtype, 3, 10, ps3, make(ps3))
    carries = name in STATEFUL or name == "sgdsai-max" or dtype == torch.bfloat16
    assert _same(expected, _snapshot(ps3)) != carries


# ------------------------------------------------------------------------------------ bf16 rounding
def _small_lr_case(kind: str, stochastic: bool, dtype=torch.bfloat16):
    """Pure-bf16 (fp16) weights at 1.0 whose exact update is -1e-4 per entry per step: ~1/40 of a bf16
    ulp below 1.0 (2^-8; fp16: ~1/5 of 2^-11), so round-to-nearest drops it. Returns (mean change after
    8 steps, expected)."""
    steps = 8
    if kind == "sinkgd":  # a constant gradient: every entry of the SinkGD direction is exactly 1
        w = nn.Parameter(torch.ones(256, 256, dtype=dtype))
        opt = SinkGD([w], lr=1e-4, stochastic_rounding=stochastic)
        grad = torch.ones(256, 256, dtype=dtype)
    elif kind == "adamw":  # AdamW fallback: a constant gradient moves each entry by lr * ratio
        w = nn.Parameter(torch.ones(65536, dtype=dtype))
        opt = SWAN([w], lr=1e-4 / 20, fallback_lr_ratio=20.0, stochastic_rounding=stochastic)
        grad = torch.ones(65536, dtype=dtype)
    else:  # SGD-SaI, momentum 0.9 of a constant +-1 gradient, scale ||g|| / std
        w = nn.Parameter(torch.ones(65536, dtype=dtype))
        grad = torch.where(torch.arange(65536) % 2 == 0, 1.0, -1.0).to(dtype)
        scale = math.sqrt(65536) / 1.0  # ||g|| = 256, unbiased std of +-1 (zero mean) = sqrt(N/(N-1)) ~ 1
        opt = SGDSaI([w], lr=1e-4 / scale, weight_decay=0.0, stochastic_rounding=stochastic)
    for _ in range(steps):
        w.grad = grad.clone()
        opt.step()
    change = w.detach().double() - 1.0
    if kind == "sgdsai":
        change = change * grad.double()  # align signs
    return change.mean().item(), -1e-4 * steps


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sinkgd", "adamw", "sgdsai"])
def test_bf16_stochastic_rounding_keeps_small_updates(kind, dtype):
    mean, expected = _small_lr_case(kind, stochastic=True, dtype=dtype)
    # the mean over 65536 entries of an unbiased rounding: std ~ 2e-6 of a -8e-4 expectation
    assert mean == pytest.approx(expected, rel=0.05), mean
    mean_rn, _ = _small_lr_case(kind, stochastic=False, dtype=dtype)
    assert mean_rn == 0.0  # round-to-nearest loses every update


def test_bf16_statistics_are_fp32():
    # A bf16 gradient with rows whose scale spans 1e-3..1e3: bf16 sums of squares (8-bit mantissa)
    # would put SinkGD's column norms ~1% off; fp32 ones are exact to ~1e-6 before the final cast.
    g = (torch.randn(32, 64, generator=_gen(0)) * torch.logspace(-3, 3, 32)[:, None]).to(torch.bfloat16)
    w = nn.Parameter(torch.zeros(32, 64, dtype=torch.bfloat16))
    w.grad = g
    SinkGD([w], lr=1.0, iterations=3, stochastic_rounding=False).step()
    ref = R.sinkgd_update(g.double(), iterations=3)
    err = (-w.detach().double() - ref).abs() / R.bf16_ulp(ref)
    assert err.max() <= 0.5 + 1e-3  # each entry is the round-to-nearest of the float64 value


# ------------------------------------------------------------------------------------ Llama
def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_param_groups_and_rule_counts(tied):
    model = _llama(tied)
    groups = param_groups(model, fallback_weight_decay=0.0)
    by_rule = {g["rule"]: g for g in groups}
    matrix_names = set(by_rule["matrix"]["param_names"])
    fallback_names = set(by_rule["fallback"]["param_names"])
    projections = {f"model.layers.{i}.{blk}.{p}_proj.weight" for i in range(2)
                   for blk, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in ps}
    assert matrix_names == projections
    norms = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    expected_fallback = {"model.embed_tokens.weight", "model.norm.weight", *norms}
    if not tied:
        expected_fallback.add("lm_head.weight")
    assert fallback_names == expected_fallback
    assert by_rule["fallback"]["weight_decay"] == 0.0
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    per_layer = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32  # q, k, v (2 kv heads), o, gate/up/down
    fallback_params = 64 * 32 * (1 if tied else 2) + 5 * 32
    expected = {"matrix": {"tensors": 14, "params": 2 * per_layer},
                "fallback": {"tensors": 6 if tied else 7, "params": fallback_params}}
    for cls in (SWAN, SinkGD):
        assert cls(groups, lr=1e-3).rule_counts() == expected
    total = sum(p.numel() for p in model.parameters())  # parameters() counts the tied weight once
    assert SGDSaI(groups).rule_counts() == {"elementwise": {"tensors": 20 if tied else 21, "params": total}}
    # a plain parameter list splits by shape only: the embedding (2-D) would land in the matrix rule
    assert SWAN(model.parameters()).rule_counts()["matrix"]["tensors"] == 14 + (1 if tied else 2)


def test_llama_trains_a_few_steps():
    # End to end on the tiny Llama: finite loss that goes down, fallback AdamW state only for the
    # fallback weights, none for the projections.
    model = _llama(False)
    opt = SWAN(param_groups(model), lr=2e-3)
    ids = torch.randint(0, 64, (4, 16), generator=_gen(0))
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    matrix = opt.param_groups[0]["params"]
    assert opt.param_groups[0]["rule"] == "matrix" and not any(p in opt.state for p in matrix)
    assert len(opt.state) == 7


# ------------------------------------------------------------------------------------ issue 16's families
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_low_precision_weights_with_any_group_structure(name, dtype):
    # A pure low-precision Linear-ReLU-Linear MLP, built the ways users do: one group per layer and the
    # decay / no-decay split (an earlier group holding as many tensors as this one, with the same values,
    # crashed the rounding generator, found by list.index comparing the groups' tensors), and the model
    # cast after the optimizer was built (model.half()). Every weight moves, all finite, none skipped.
    for how in ("layers", "split", "cast_after"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        if how == "layers":
            model.to(dtype)
            opt = OPTIMIZERS[name]([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
        elif how == "split":
            model.to(dtype)
            ps = list(model.parameters())
            opt = OPTIMIZERS[name]([{"params": [p for p in ps if p.ndim >= 2]},
                                    {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}])
        else:
            opt = OPTIMIZERS[name](model.parameters())
            model.to(dtype)
        before = _snapshot(model.parameters())
        for i in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8, generator=_gen(i)).to(dtype)).square().mean().backward()
            opt.step()
        after = list(model.parameters())
        assert all(torch.isfinite(p).all() for p in after) and opt.skipped_steps == 0, how
        assert all(not torch.equal(a, b) for a, b in zip(before, after)), how


NUMERIC_OPTS = {**OPTIMIZERS, "swan-ns": lambda ps, **kw: SWAN(ps, lr=0.02, whitening="newton_schulz", **kw)}


@pytest.mark.parametrize("rms", [1e-30, 1e-20, 1.0, 1e30])
@pytest.mark.parametrize("name", list(NUMERIC_OPTS))
def test_finite_gradients_give_finite_steps(name, rms):
    # Any finite gradient gives a finite update and no skipped step: RMS 1e-30..1e30 (SinkGD's row
    # scales overflowed when squared below ~1e-19), constant rows (SWAN Newton-Schulz: 0/0), a rank-one
    # gradient, 1x1 (NS: 0/0; SWAN's default froze it: GradNorm of one element is 0), 1xN, Nx1.
    g = _gen(0)
    grads = [torch.randn(6, 4, generator=g), torch.ones(6, 1) * torch.randn(1, 4, generator=g),
             torch.randn(6, 1, generator=g) @ torch.randn(1, 4, generator=g), torch.full((1, 1), 0.7),
             torch.randn(1, 5, generator=g), torch.randn(5, 1, generator=g), torch.randn(7, generator=g)]
    ps = [nn.Parameter(torch.randn(t.shape, generator=g)) for t in grads]
    opt = NUMERIC_OPTS[name](ps, weight_decay=0.0)
    before = _snapshot(ps)
    for _ in range(2):
        for p, t in zip(ps, grads):
            p.grad = t * rms
        opt.step()
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in ps)
    moved = [not torch.equal(a, b) for a, b in zip(before, ps)]
    # the matrix rules and the stateless fallback are scale-invariant: the generic matrix and the 1x1
    # move at every scale; SGD-SaI's step is proportional to the gradient and AdamW's eps (1e-8) and
    # fp32 range bound it like torch.optim.AdamW's, so those move only at ordinary scales
    assert moved[0] or (name == "sgdsai" and rms != 1.0), moved
    assert moved[3] or (rms != 1.0 and name not in ("swan-stateless", "sinkgd-stateless")), moved


def test_moe_expert_stacks_are_independent_matrices():
    # param_groups(model, batch_dims=1) on stacked experts (E, out, in) beside 2-D attention weights:
    # each expert is whitened as its own matrix (equal to SWAN on that expert alone), the 2-D weight
    # stays on the matrix rule, the norm on the fallback
    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Linear(8, 8, bias=False)
            self.experts = nn.Parameter(torch.randn(3, 6, 8))
            self.norm = nn.LayerNorm(8)

    torch.manual_seed(0)
    model = MoE()
    experts0 = model.experts.detach().clone()
    opt = SWAN(param_groups(model, batch_dims=1), lr=0.02, weight_decay=0.0)
    assert opt.rule_counts()["matrix"]["tensors"] == 2 and opt.rule_counts()["fallback"]["tensors"] == 2
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=_gen(1))
    grads = model.experts.grad.clone()
    attn0 = model.attn.weight.detach().clone()
    opt.step()
    for e in range(3):
        alone = nn.Parameter(experts0[e].clone())
        alone.grad = grads[e].clone()
        SWAN([alone], lr=0.02, weight_decay=0.0).step()
        torch.testing.assert_close(model.experts[e].detach(), alone.detach())  # fp32: same ops, batched
    single = nn.Parameter(attn0)
    single.grad = model.attn.weight.grad.clone()
    SWAN([single], lr=0.02, weight_decay=0.0).step()
    torch.testing.assert_close(model.attn.weight.detach(), single.detach())


def test_memory_report_with_swapped_arguments_names_them():
    from stateless_opt import memory_report

    model = nn.Linear(4, 4)
    opt = SWAN(model.parameters(), lr=0.02)
    with pytest.raises(TypeError, match="model"):
        memory_report(opt, model, print_table=False)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_float64_weights_stepped_in_float64_or_refused_by_name(name):
    # SGD-SaI is elementwise: an fp64 weight steps in fp64 (its float64 reference: test_reference);
    # SWAN / SinkGD compute in fp32 and refuse fp64 weights at construction, and before a step when the
    # model was cast after the optimizer was built, naming the tensor
    ps = [nn.Parameter(torch.randn(6, 4, dtype=torch.float64)), nn.Parameter(torch.randn(4, dtype=torch.float64))]
    if name == "sgdsai":
        opt = OPTIMIZERS[name](ps)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in ps)
        assert opt.state[ps[0]]["momentum_buffer"].dtype == torch.float64
        return
    with pytest.raises(TypeError, match=r"param group 0: tensor 0 \(shape \(6, 4\)\) is torch.float64; .*model.float\(\)"):
        OPTIMIZERS[name](ps)
    model = nn.Linear(4, 6)
    opt = OPTIMIZERS[name](model.named_parameters())
    model.double()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = _snapshot(model.parameters())
    with pytest.raises(TypeError, match=r"param group 0 \(before step 1\): tensor 0 'weight' \(shape \(6, 4\)\) is torch.float64"):
        opt.step()
    assert _same(before, _snapshot(model.parameters()))
