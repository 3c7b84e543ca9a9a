"""torch.optim's own contract, tested the way PyTorch tests its optimizers.

A port of the device-generic tests of PyTorch's ``test/test_optim.py`` (``TestOptimRenewed``) to the
rows of our catalogue (``optim_db.OPTIM_DB``, torch's ``optim_db``): each ``test_*`` below keeps the
name and the checks of torch's test of the same name, run on the CPU for every row and every input of
``OptimizerInfo.inputs`` (torch's ``optim_inputs_func``); errors come from
``OptimizerInfo.error_inputs()`` (torch's ``optim_error_inputs_func``). Not ported: tests of flags we do
not have (foreach, capturable, differentiable, maximize), of CUDA-only or multi-GPU paths, of sparse
gradients and LBFGS's closures. After them, the parts of the contract users meet outside that file:
``add_param_group``, closures, LR schedulers (per-group lists), the keys schedulers and timm write into
groups, ``GradScaler``, ``torch.compile`` of ``step()``, ``named_parameters()``, deepcopy / pickle.

Where we deliberately differ from torch.optim (the README's "Where we differ from torch.optim"), the
test asserts the clear error instead (``test_complex``, the error inputs).
"""

from __future__ import annotations

import copy
import functools
import io
import math
import pickle
import tempfile
import warnings

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import (
    CyclicLR, LambdaLR, OneCycleLR, ReduceLROnPlateau, StepLR,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import optim_db



class _Marked:
    """A row whose variant changes only param groups marked ``rule="fallback"`` (``marked_groups``:
    SGD-SaI's opt-in AdamW fallback): the contract runs on that path, every group marked, as
    ``param_groups(model)`` marks embeddings, the LM head and norms."""

    def __init__(self, row):
        self.row = row

    def __getattr__(self, name):
        return getattr(self.row, name)

    def make(self, params, **hyper):
        items = list(params)
        if items and isinstance(items[0], dict):
            groups = [{**g, "rule": "fallback"} for g in items]
        else:
            groups = [{"params": items, "rule": "fallback"}]
        return self.row.make(groups, **hyper)


ROWS = [_Marked(r) if r.marked_groups else r for r in optim_db.OPTIM_DB]
IDS = [r.id for r in ROWS]
SCHEDULERS = [[lambda opt: StepLR(opt, gamma=0.9, step_size=10)], [lambda opt: ReduceLROnPlateau(opt)]]


def rows(**kw):
    return pytest.mark.parametrize("row", ROWS, ids=IDS, **kw)


def _same(a, b) -> bool:
    """torch's assertEqual on parameters / state dicts: bitwise here (same inputs, same code path)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b) or (
            torch.is_tensor(b) and a.shape == b.shape and bool(torch.isnan(a).all() and torch.isnan(b).all()))
    return a == b


def _toy(contiguous: bool = True, seed: int = 0):
    """torch's weight (10, 5), bias (10) and input (5); non-contiguous: every other element of a bigger one."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        w, b = torch.randn(10, 5, generator=g), torch.randn(10, generator=g)
    else:
        w, b = torch.randn(10, 5, 2, generator=g)[..., 0], torch.randn(10, 2, generator=g)[..., 0]
    return Parameter(w), Parameter(b), torch.randn(5, generator=g)


# ============================================================================ TestOptimRenewed, ported
@rows()
def test_errors(row):
    failures = []
    for e in row.error_inputs():
        try:
            if e.on == "construction":
                if issubclass(e.error, Warning):
                    with pytest.warns(e.error, match=e.match):
                        e.make(row.cls)
                else:
                    with pytest.raises(e.error, match=e.match):
                        e.make(row.cls)
            else:
                opt = e.make(row.cls)
                before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
                with pytest.raises(e.error, match=e.match):
                    opt.step()
                after = [p.detach() for g in opt.param_groups for p in g["params"]]
                assert _same(before, after), "a weight changed"  # refused before any update, in every group
        except (AssertionError, pytest.fail.Exception) as err:
            failures.append(f"{e.desc}: {str(err).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def _descends(opt, weight, bias, inp, schedulers_c=(), via_closure: bool = False, also=None) -> bool:
    """torch's _test_forloop / with_lrsched loop: 20 steps (closure passed to step() or run before it),
    each scheduler stepped after the optimizer, ``also()`` after each backward; whether the toy loss fell."""
    schedulers = [s(opt) for s in schedulers_c]

    def closure():
        opt.zero_grad()
        loss = (weight.mv(inp) + bias).pow(2).sum()
        loss.backward()
        if also is not None:
            also()
        return loss

    initial = closure().item()
    for _ in range(20):
        if via_closure:
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        for s in schedulers:
            s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()
    return closure().item() < initial


@rows()
@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(row, contiguous, with_lrsched):
    for schedulers_c in SCHEDULERS if with_lrsched else [[]]:
        for kw in row.inputs:
            weight, bias, inp = _toy(contiguous)
            opt = row.make([weight, bias], **kw)
            assert _descends(opt, weight, bias, inp, schedulers_c, via_closure=False), (kw, contiguous)


@rows()
def test_param_group_with_lrscheduler_goes_right_direction(row):
    for schedulers_c in SCHEDULERS:
        weight, bias, inp = _toy()
        lr = row.inputs[0]["lr"]
        opt = row.make([{"params": [weight]}, {"params": [bias], "lr": lr}], lr=lr)
        assert _descends(opt, weight, bias, inp, schedulers_c, via_closure=True)


@rows()
def test_tensor_lr(row):
    # a one-element tensor lr stays the tensor in the group (torch.optim's convention: a scheduler
    # fills it in place and the step reads it, a captured step on the device too), wherever it enters:
    # the constructor, a param group, or written into a group between steps (as a scheduler or user
    # code may). Each run equals the float lr's up to the lr's fp32 rounding (5e-8 relative), which the
    # whitening's iterations amplify to a few fp32 ulps of the weights: torch's default fp32 tolerance,
    # as its test_tensor_lr
    for kw in row.inputs:
        runs = []
        for how in ("float", "constructor", "group", "written"):
            weight, bias, inp = _toy()
            lr = kw["lr"] if how == "float" else torch.tensor(kw["lr"])
            if how == "group":
                opt = row.make([{"params": [weight, bias], "lr": lr}], **kw)
            else:
                opt = row.make([weight, bias], **{**kw, "lr": lr if how == "constructor" else kw["lr"]})
            for _ in range(5):
                if how == "written":
                    lr = opt.param_groups[0]["lr"] = torch.tensor(kw["lr"])
                _fwd_bwd(opt, weight, bias, inp)
                opt.step()
                assert opt.param_groups[0]["lr"] is lr, how
            runs.append((weight.detach(), bias.detach()))
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                torch.testing.assert_close(a, b)


@rows()
def test_complex(row):
    # torch steps complex weights as view_as_real pairs; ours refuse them at construction, naming the
    # tensor (deliberate, README); torch's recipe works: optimise the real view
    params = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True), torch.randn(10, 5, requires_grad=True)]
    with pytest.raises(TypeError, match=r"param group 0: tensor 0 \(shape \(10, 5\)\) is torch.complex64"):
        row.make(params)
    real = torch.view_as_real(params[0].detach()).clone().requires_grad_()
    opt = row.make([real, params[1]])
    real.grad, params[1].grad = torch.randn_like(real), torch.randn_like(params[1])
    before = real.detach().clone()
    opt.step()
    assert not torch.equal(before, real.detach()) and torch.isfinite(real).all()


@rows()
def test_param_groups_weight_decay(row):
    for kw in row.inputs:
        weight, bias, inp = _toy()
        opt = row.make([dict(params=[weight], **kw), dict(params=[bias], **{**kw, "weight_decay": 0.0})])
        assert _descends(opt, weight, bias, inp)


@rows()
def test_param_groups_lr(row):
    for kw in row.inputs:
        weight, bias, inp = _toy()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.detach().clone()
        opt = row.make([dict(params=[weight, bias], **kw), dict(params=[irrelevant])], lr=1e-28)

        def irrelevant_grad():
            irrelevant.grad = torch.rand_like(irrelevant)

        assert _descends(opt, weight, bias, inp, also=irrelevant_grad)
        assert torch.equal(irrelevant.detach(), irrelevant_clone)  # lr was almost 0


@rows()
def test_step_is_noop_when_params_have_no_grad(row):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    for kw in row.inputs:
        row.make(params, **kw).step(lambda: torch.tensor([1.0]))
        assert _same(old, params)


@rows()
def test_step_is_noop_for_zero_grads(row):
    # torch skips its weight-decay inputs here (they decay on a zero gradient); ours leave a weight with a
    # zero gradient alone, weight decay included, so every input is checked
    param = torch.randn((5, 1), requires_grad=True)
    old = param.detach().clone()
    for kw in row.inputs:
        opt = row.make([param], **kw)
        param.grad = torch.zeros_like(param)
        opt.step(lambda: torch.tensor([1.0]))
        assert torch.equal(old, param.detach())


@rows()
def test_optimizer_can_be_printed(row):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for kw in row.inputs:
        assert type(row.cls).__name__ and row.cls.__name__ in repr(row.make(params, **kw))


def _fwd_bwd(opt, w, b, i):
    opt.zero_grad()
    loss = (w.mv(i) + b).pow(2).sum()
    loss.backward()
    return loss


def _named(params, named: bool):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_param_names(sd):
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g.pop("param_names", None)
    return sd


def _small(row, kw, named: bool):
    """torch's state-dict fixture: weight (2, 3), bias (2), input (3), the optimizer (named or not) and
    its forward-backward closure."""
    weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
    inp = torch.randn(3)
    opt = row.make(_named([weight, bias], named), **kw)
    return opt, weight, bias, inp, functools.partial(_fwd_bwd, opt, weight, bias, inp)


@rows()
@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
def test_state_dict_deterministic(row, is_named_optim0, is_named_optim1):
    for kw in row.inputs:
        opt, weight, bias, inp, closure = _small(row, kw, is_named_optim0)
        for _ in range(10):
            closure()
            opt.step()
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        opt_c = row.make(_named([weight_c, bias_c], is_named_optim1), **kw)
        closure_c = functools.partial(_fwd_bwd, opt_c, weight_c, bias_c, inp)
        opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(10):
            closure()
            closure_c()
            opt.step()
            opt_c.step()
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
        # deterministic with equal (not identical) parameters; param names are optional
        assert _same(_without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict()))
        # repeated parameters have identical representation (torch #36831)
        opt_c.param_groups.extend(opt_c.param_groups)
        assert _same(_without_param_names(opt.state_dict())["param_groups"][-1],
                     _without_param_names(opt_c.state_dict())["param_groups"][-1])


def _conv_bn(seed=1):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def _model_step(opt, model, inp):
    opt.zero_grad()
    model(inp).sum().backward()
    opt.step()


@rows()
def test_can_load_older_state_dict(row):
    # keys added to our param groups after the first release: a state dict without them still loads
    for kw in row.inputs:
        model, inp = _conv_bn()
        opt = row.make(model.parameters(), **kw)
        for _ in range(3):
            _model_step(opt, model, inp)
        old = copy.deepcopy(opt.state_dict())
        for g in old["param_groups"]:
            for flag in ("replicate_group", "step", "skipped_steps", "rule", "batch_dims"):
                g.pop(flag, None)
        opt.load_state_dict(old)
        _model_step(opt, model, inp)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        model(inp).sum().backward()
        model[0].weight.grad[0, 0] = math.nan  # the skip counter the old dict lacked still counts
        opt.step()
        assert opt.skipped_steps == 1 and _same(before, [p.detach() for p in model.parameters()])


@rows()
@pytest.mark.parametrize("is_named_optim1", [True, False])
@pytest.mark.parametrize("is_named_optim0", [True, False])
def test_can_load_from_to_named_state_dict(row, is_named_optim0, is_named_optim1):
    for kw in row.inputs:
        model, inp = _conv_bn()
        opt = row.make(model.named_parameters() if is_named_optim0 else model.parameters(), **kw)
        for _ in range(3):
            _model_step(opt, model, inp)
        old = copy.deepcopy(opt.state_dict())
        opt2 = row.make(model.named_parameters() if is_named_optim1 else model.parameters(), **kw)
        opt2.load_state_dict(old)
        _model_step(opt2, model, inp)
        if is_named_optim0 or is_named_optim1:
            assert opt2.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]


@rows()
@pytest.mark.parametrize("is_named_optim", [True, False])
def test_save_load_equality_with_weights_only(row, is_named_optim):
    for kw in row.inputs:
        opt, weight, bias, inp, closure = _small(row, kw, is_named_optim)
        for _ in range(3):
            opt.step(closure)
        sd = opt.state_dict()
        with tempfile.TemporaryFile() as f:
            torch.save(sd, f)
            f.seek(0)
            assert _same(torch.load(f), sd)
            f.seek(0)
            assert _same(torch.load(f, weights_only=True), sd)


@rows()
def test_load_nontensor_step(row):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)] + [Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.rand_like(p)
    for kw in row.inputs:
        opt = row.make(params, **kw)
        for _ in range(3):
            opt.step()
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].item()
        opt.load_state_dict(sd)
        opt.step()
        assert all(torch.isfinite(p).all() for p in params)


def _state_dict_pre_hook(optimizer: Optimizer) -> None:
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer: Optimizer, state_dict: dict) -> dict:
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer: Optimizer, state_dict: dict) -> None:
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer: Optimizer, state_dict: dict) -> dict:
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer: Optimizer) -> None:
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@rows()
def test_state_dict_hooks(row):
    # torch's test_state_dict_pre_hook, _post_hook and _pre_post_hook
    for kw in row.inputs:
        param = torch.rand(2, 3, requires_grad=True)
        opt = row.make([param], **kw)
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1
        opt = row.make([param], **kw)
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        assert opt.state_dict()["ran_state_dict_pre_hook"] is False
        opt = row.make([param], **kw)
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        sd = opt.state_dict()
        assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"]


@rows()
def test_load_state_dict_hooks(row):
    # torch's test_load_state_dict_pre_hook_and_prepend, _post_hook and _pre_post_hook
    for kw in row.inputs:
        param = torch.rand(2, 3, requires_grad=True)
        opt = row.make([param], **kw)
        sd = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002  # prepended: the other hook overrides
        opt = row.make([param], **kw)
        opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert not opt.state["ran_load_state_dict_pre_hook2"] and opt.state["ran_load_state_dict_post_hook"]
        opt = row.make([param], **kw)
        opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
        opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"] and opt.state["ran_load_state_dict_post_hook"]


@rows()
def test_step_hooks(row):
    # torch's test_step_post_hook, test_step_pre_hook and test_step_all_hooks
    params = [torch.tensor([1.0, 1.0])]
    for kw in row.inputs:
        data = []
        opt = row.make(params, **kw)
        pre = opt.register_step_pre_hook(lambda o, a, k: data.append("pre"))
        post = opt.register_step_post_hook(lambda o, a, k: data.append("post"))
        opt.step()
        opt.step()
        pre.remove()
        post.remove()
        opt.step()
        assert data == ["pre", "post", "pre", "post"]

        data = []
        opt2 = SGD(params)
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
                   register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
                   opt.register_step_pre_hook(lambda o, a, k: data.append(1)),
                   opt.register_step_post_hook(lambda o, a, k: data.append(2)),
                   opt2.register_step_pre_hook(lambda o, a, k: data.append(1)),
                   opt2.register_step_post_hook(lambda o, a, k: data.append(2))]
        opt.step()
        assert data == [0, 1, 2, 5]
        opt2.step()
        opt.step()
        assert data == [0, 1, 2, 5] * 3
        for h in handles:
            h.remove()
        opt.step()
        opt2.step()
        assert data == [0, 1, 2, 5] * 3


@rows()
def test_deepcopy_copies_all_public_attrs(row):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)] + [Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.rand_like(p)
    public = lambda obj: {k for k in obj.__dict__ if not k.startswith("_")}  # noqa: E731
    for kw in row.inputs:
        opt = row.make(params, **kw)
        for _ in range(3):
            opt.step()
        assert public(opt) == public(copy.deepcopy(opt))


@rows()
def test_non_empty_state(row):
    # torch: every state entry is non-empty after a step; ours also: matrix-rule weights have none
    model = torch.nn.Linear(5, 5)
    for kw in row.inputs:
        opt = row.make(model.parameters(), **kw)
        opt.zero_grad()
        model(torch.rand(2, 5)).sum().backward()
        opt.step()
        assert all(len(st) > 0 for st in opt.state.values())
        if row.splits_rules:
            assert model.weight not in opt.state and (model.bias in opt.state) == (opt.defaults["fallback"] == "adamw")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fused_matches_forloop(dtype):
    # torch's _test_derived_optimizers for flag "fused" (SGD-SaI's fused kernels vs its tensor-op path):
    # an MLP plus a 0-d parameter, grads set to None at iteration 2, a layer frozen for iterations 3-4;
    # params and state compared at every iteration. Tolerance: the fused kernels round W once per
    # operation like the tensor ops do, so fp32 agrees to a few ulps of the weights (torch's default
    # fp32 tolerance, rtol 1.3e-6, atol 1e-5); other dtypes take the same (tensor-op) path: exact.
    inp = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    models, opts = [], []
    for fused in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1),
                                    torch.nn.Sigmoid()).to(dtype)
        empty = torch.empty((), dtype=dtype, requires_grad=True)
        empty.grad = torch.rand_like(empty)
        models.append(model)
        opts.append(optim_db.info("sgdsai").make(list(model.parameters()) + [empty], lr=1e-2, fused=fused))
    tol = {"rtol": 1.3e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    for i in range(7):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            if i == 3:
                model[2].requires_grad_(False)
            if i == 5:
                model[2].requires_grad_(True)
            if i != 2:
                model(inp).sum().backward()
            opt.step()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q, **tol)
            for k, v in opts[0].state.get(p, {}).items():
                torch.testing.assert_close(v, opts[1].state[q][k], equal_nan=True, **tol)


# ============================================================================ the rest of the contract
def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).to(dtype)


def _train(opt, model, steps=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=g).to(dtype)).square().mean().backward()
        opt.step()


@rows()
def test_add_param_group_is_validated_then_steps(row):
    model = _mlp()
    opt = row.make([model[0].weight, model[0].bias], **row.inputs[0])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param group 1: lr: Input should be a finite number"):
        opt.add_param_group({"params": [model[2].weight], "lr": math.inf})
    with pytest.raises(ValueError, match=r"param group 1: weight_decay: Input should be greater than or equal to 0"):
        opt.add_param_group({"params": [model[2].weight], "weight_decay": -1.0})
    with pytest.raises(TypeError, match=r"param group 1: tensor 1 \(shape \(2,\)\) is torch.complex64"):
        opt.add_param_group({"params": [model[2].weight, Parameter(torch.zeros(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1  # a refused group leaves nothing behind
    opt.add_param_group({"params": [model[2].weight, model[2].bias], "lr": row.inputs[0]["lr"] / 2})
    _train(opt, model, steps=2)
    after = list(model.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))  # both groups stepped
    assert [g["step"] for g in opt.param_groups] == [2, 2]
    assert opt.param_groups[1]["lr"] == row.inputs[0]["lr"] / 2


@rows()
def test_closure_is_run_with_grad_and_its_loss_returned(row):
    model = _mlp()
    opt = row.make(model.parameters(), **row.inputs[0])
    x = torch.randn(4, 8)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0]


@rows()
def test_plain_list_is_one_group_so_per_group_schedulers_work(row):
    # A plain parameter list comes back as ONE param group (the matrix rule and the fallback are chosen
    # per weight inside it), so per-group scheduler lists have the length the user expects
    model = _mlp()
    opt = row.make(model.parameters(), **row.inputs[0])
    assert len(opt.param_groups) == 1
    sched = OneCycleLR(opt, max_lr=[0.01], total_steps=10)
    for _ in range(3):
        _train(opt, model, steps=1)
        sched.step()
    assert opt.param_groups[0]["max_lr"] == 0.01 and 0 < opt.param_groups[0]["lr"] <= 0.01
    model = _mlp()
    opt = row.make([{"params": [model[0].weight, model[0].bias]}, {"params": model[2].parameters()}])
    lambdas = LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5 ** s])
    cyclic = CyclicLR(opt, base_lr=[1e-4, 2e-4], max_lr=[1e-3, 2e-3], step_size_up=2, cycle_momentum=False)
    for _ in range(3):
        _train(opt, model, steps=1)
        lambdas.step()
        cyclic.step()
    assert all(math.isfinite(g["lr"]) and g["lr"] > 0 for g in opt.param_groups)


MATRIX_ROWS = [r for r in ROWS if r.splits_rules]


@pytest.mark.parametrize("row", MATRIX_ROWS, ids=[r.id for r in MATRIX_ROWS])
def test_fallback_keeps_its_ratio_under_a_scheduler(row):
    # inside one group the fallback steps at lr * fallback_lr_ratio: a scheduler writing one lr keeps it.
    # A constant gradient moves each entry by exactly the lr on the first step (AdamW: m_hat / sqrt(v_hat)
    # = 1; the stateless rule: the RMS-1 direction)
    w = Parameter(torch.ones(16))
    opt = row.make([w], lr=1e-3, fallback_lr_ratio=5.0, weight_decay=0.0)
    sched = LambdaLR(opt, lambda s: 0.5)
    sched.step()  # lr 5e-4 -> fallback 2.5e-3
    w.grad = torch.ones(16)
    opt.step()
    assert torch.allclose(1.0 - w.detach(), torch.full((16,), 2.5e-3), rtol=1e-4)


@rows()
def test_keys_schedulers_and_timm_write_are_accepted(row):
    extra = {"initial_lr": 0.1, "max_lr": 0.1, "min_lr": 0.0, "base_lr": 0.01, "max_momentum": 0.95,
             "base_momentum": 0.85, "lr_scale": 0.5, "group_name": "decay", "name": "blocks"}
    model = _mlp()
    opt = row.make([{"params": list(model.parameters()), "param_names": [n for n, _ in model.named_parameters()],
                     **extra}], **row.inputs[0])
    assert all(opt.param_groups[0][k] == v for k, v in extra.items())
    _train(opt, model, steps=1)
    with pytest.raises(ValueError, match=r"param group 0: momentun: Extra inputs are not permitted"):
        row.make([{"params": list(model.parameters()), "momentun": 0.9}])


@rows()
def test_named_parameters_wherever_torch_accepts_them(row):
    model = _mlp()
    opt = row.make(model.named_parameters(), **row.inputs[0])
    assert opt.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    _train(opt, model, steps=1)
    named = list(model.named_parameters())
    opt = row.make([{"params": named[:2]}], **row.inputs[0])
    opt.add_param_group({"params": named[2:], "lr": 1e-4})
    _train(opt, model, steps=1)
    assert [g["param_names"] for g in opt.param_groups] == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    sd = opt.state_dict()
    assert sd["param_groups"][1]["param_names"] == ["2.weight", "2.bias"]


@rows()
def test_deepcopy_and_pickle_step_like_the_original(row):
    runs = []
    for how in ("original", "deepcopy", "pickle"):
        model = _mlp()
        opt = row.make(model.parameters(), **row.inputs[0])
        _train(opt, model, steps=2)
        if how == "deepcopy":
            model, opt = copy.deepcopy((model, opt))
        elif how == "pickle":
            model, opt = pickle.loads(pickle.dumps((model, opt)))
        _train(opt, model, steps=2, seed=1)
        runs.append([p.detach() for p in model.parameters()])
    assert _same(runs[0], runs[1]) and _same(runs[0], runs[2])


@rows()
def test_grad_scaler(row):
    # torch.amp.GradScaler (CPU): scaled backward, unscale_ before our step, clipping in between; the
    # weights equal an unscaled run (the scale is a power of two: unscaling is exact); an inf in the
    # scaled gradients makes the scaler skip the step (and halve its scale) without calling ours
    runs = []
    for scaled in (False, True):
        model = _mlp()
        opt = row.make(model.parameters(), **row.inputs[0])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(model(torch.randn(4, 8, generator=g)).square().mean()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt)
            scaler.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert _same(runs[0], runs[1])
    model = _mlp()
    opt = row.make(model.parameters(), **row.inputs[0])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(model(torch.full((4, 8), 1e30)).square().mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert _same(before, [p.detach() for p in model.parameters()]) and scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("row", [r for r in ROWS if r.default], ids=[r.id for r in ROWS if r.default])
def test_compile_step(row):
    # torch.compile(opt.step) traces every default through fake tensors ("aot_eager": the tracing that
    # found aten::_fused_sgd_ without a fake kernel, without inductor's C++ build) and gives the eager
    # step's weights, for a matrix and a bias (the fallback), two steps (the second with state). The
    # compiled graph may reorder fp32 operations: torch's default fp32 tolerance (rtol 1.3e-6, atol 1e-5).
    # One Linear: tracing our host-side step costs seconds per traced op sequence, not per element.
    import torch._dynamo

    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        opt = row.make(model.parameters(), **row.inputs[0])
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 8, generator=g)).square().mean().backward()
            step()
        runs.append([p.detach().clone() for p in model.parameters()])
    torch._dynamo.reset()
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)
