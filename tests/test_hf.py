"""The HF Trainer doors (``stateless_opt.integrations.hf``, ``launch/hf_trainer.py``) on the CPU, on a tiny LLaMA.

The tests ask two things about each door. Is our optimizer the one the Trainer steps? And is the first step
our rule's update? A ``Recorder`` callback hooks our optimizer's ``step()``. It records, for every weight, the
gradient the optimizer receives and the weight before and after the step. For DeepSpeed these are views
of the ZeRO flat partition, obtained through the layout the integration attached. The step is then checked
against the float64 references in ``tests/reference.py``:

* SinkGD: relative Frobenius error < 1e-3 (measured <= 6e-7).
* SWAN on the non-square MLP weights: < 2e-2, the library's acceptance bound for its default whitening
  against the exact polar factor (test_reference.py). Measured: <= 5e-5 with 12 Newton-Schulz steps, and
  <= 6e-6 with a 7-step fp32 Polar Express. The square attention weights are rank-deficient after
  GradNorm's centring, and Newton-Schulz does not converge on them (errors up to ~40% on v/o_proj at
  init). For those only the scaling step is checked: the update's RMS must equal lr to within 1e-4.
* Fallback (embeddings, LM head, norms): AdamW's step at ``lr * 20``, with max error < 1e-4 of the
  largest update (measured <= 4e-6).

The checks would catch an AdamW step in our place: its first update is ~sign(G), which is 60-120% away
from either reference.

Runs: one optimizer step (the recorder) plus one more, sequences of 32 synthetic tokens, batch 4.
Doors (a) and (c) run in this process. DeepSpeed runs in a one-rank subprocess: the DeepSpeed
accelerator, ``ACCELERATE_USE_DEEPSPEED`` and the process group are process-wide and would leak into
later tests. DDP runs as two gloo ranks under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reference as R
from stateless_opt import SGDSaI, SinkGD, SWAN, SWANConfig
from stateless_opt.integrations import hf

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import launch.hf_trainer as H  # noqa: E402

SEQ, BATCH, STEPS, LR = 32, 4, 2, 1e-3
MATRIX_TOL = {"swan": 2e-2, "sinkgd": 1e-3}
RMS_TOL, FALLBACK_TOL = 1e-4, 1e-4
CHILD_TIMEOUT = 240
FALLBACK_NAMES = {
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
    *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")),
}
N_MATRIX = 14  # 2 blocks x (q, k, v, o, gate, up, down)
# The learning rate given to TrainingArguments in doors (a) and (c). It must NOT be the one used, since the optimizer carries its own.
DECOY_LR = 0.5
CONSTANT = dict(lr_scheduler_type="constant", warmup_steps=0, learning_rate=DECOY_LR)


# =========================================================================================== recorder
def _recorder_cls():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """For the first optimizer step, records each weight's gradient and its value before and after,
        as our optimizer sees them: plain tensors, or DeepSpeed partition views through the attached layout.
        ZeRO-1/2 calls ``step()`` once per param group, with ``param_groups`` narrowed to that group. So each
        call records the weights it sees for the first time, and the hooks come off at the end of the first
        global step."""

        def __init__(self):
            self.rec: dict[str, dict] = {}
            self.opt = None
            self.handles = []

        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            self.opt = hf.find_stateless_optimizer(optimizer)
            assert self.opt is not None, f"not ours: {type(optimizer).__name__}"
            self.names = {id(p): n for n, p in model.named_parameters()}
            self.handles = [self.opt.register_step_pre_hook(self._pre), self.opt.register_step_post_hook(self._post)]

        def on_step_end(self, args, state, control, **kwargs):
            for h in self.handles:
                h.remove()
            self.handles = []

        def _views(self):
            layout = _engine_layout(self.opt)
            for gi, g in enumerate(self.opt.param_groups):
                for pos, t in enumerate(g["params"]):
                    if layout is None:
                        yield self.names[id(t)], g, t.grad, t.data
                    else:
                        for p, sh in zip(layout.params_of(t), layout.shards(t, g, (gi, pos))):
                            yield self.names[id(p)], g, sh.grad.view(sh.shape), sh.param.view(sh.shape)

        def _pre(self, opt, args, kwargs):
            for name, g, grad, w in self._views():
                if name not in self.rec:
                    self.rec[name] = {"rule": g.get("rule"), "lr": g["lr"], "G": grad.detach().clone().cpu(),
                                      "W0": w.detach().clone().cpu()}

        def _post(self, opt, args, kwargs):
            for name, g, grad, w in self._views():
                if "W1" not in self.rec[name]:
                    self.rec[name]["W1"] = w.detach().clone().cpu()

    return Recorder


def _engine_layout(opt):
    """The layout an engine (DeepSpeed) attached in front of the optimizer's own, if any."""
    return next((lay for lay in opt.layouts if hasattr(lay, "params_of")), None)


def summary(trainer, recorder) -> dict:
    """What the tests assert on; picklable, so the subprocesses return the same thing."""
    opt = hf.find_stateless_optimizer(trainer.optimizer)
    engine = trainer.model_wrapped
    return {
        "chain": _chain(trainer.optimizer),
        "basic": type(getattr(engine, "basic_optimizer", None)).__name__,
        "opt": type(opt).__name__ if opt is not None else None,
        "hyper": {k: v for k, v in opt.param_groups[0].items() if k in ("iterations", "whitening", "fallback_lr_ratio")},
        "rule_counts": opt.rule_counts(),
        "fallback_names": sorted(n for g in opt.param_groups if g.get("rule") == "fallback" for n in g["param_names"]),
        "layout": type(_engine_layout(opt)).__name__ if _engine_layout(opt) is not None else None,
        "bytes_sent": opt.bytes_sent(),
        "record": recorder.rec,
        "steps": trainer.state.global_step,
    }


def _chain(o) -> list[str]:
    out = []
    while o is not None and len(out) < 5:
        out.append(type(o).__name__)
        o = getattr(o, "optimizer", None)
    return out


def run_door(door: str, tmp, optimizer: str, *, callbacks=(), **kw):
    train_set, vocab = H.dataset("synthetic", count=64, seq_len=SEQ)
    model = H.tiny_llama(vocab, SEQ)
    rec = _recorder_cls()()
    trainer = H.DOOR_FNS[door](model, train_set, tmp, optimizer=optimizer, lr=LR, steps=STEPS, batch_size=BATCH,
                               callbacks=[rec, *callbacks], **kw)
    trainer.train()
    return summary(trainer, rec)


# =========================================================================================== checks
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double())).item()


def check_first_step(s: dict, rule: str, lr: float = LR, *, ratio: float = 20.0, **rule_kw) -> dict:
    """Assert the recorded step is ``rule``'s (swan / sinkgd) with ``lr``, and AdamW at lr * ratio in the fallback."""
    rec = s["record"]
    assert set(rec) == FALLBACK_NAMES | {n for n, r in rec.items() if r["rule"] == "matrix"}
    assert sum(r["rule"] == "matrix" for r in rec.values()) == N_MATRIX
    assert {n for n, r in rec.items() if r["rule"] == "fallback"} == FALLBACK_NAMES
    errors = {}
    for name, r in rec.items():
        assert "W1" in r, f"{name}: no post-step record"
        delta = r["W1"].double() - r["W0"].double()
        if r["rule"] == "matrix":
            assert r["lr"] == pytest.approx(lr, rel=1e-12), (name, r["lr"])
            square = r["G"].shape[0] == r["G"].shape[1]
            if rule == "swan" and square:  # rank-deficient: Newton-Schulz unconverged; check the RMS only
                rms = delta.square().mean().sqrt().item()
                errors[name] = abs(rms / lr - 1)
                assert errors[name] < RMS_TOL, (name, rms, lr)
            else:
                ref_fn = R.swan_update if rule == "swan" else R.sinkgd_update
                errors[name] = rel(delta, -lr * ref_fn(r["G"], **rule_kw))
                assert errors[name] < MATRIX_TOL[rule], (name, errors[name])
        else:
            want = R.AdamWRef(lr * ratio).step(r["W0"], r["G"]) - r["W0"].double()
            errors[name] = ((delta - want).abs().max() / want.abs().max()).item()
            assert errors[name] < FALLBACK_TOL, (name, errors[name])
    return errors


def check_counts(s: dict, vocab: int = H.SYNTHETIC_VOCAB, hidden: int = 64) -> None:
    counts = s["rule_counts"]
    assert counts["matrix"]["tensors"] == N_MATRIX
    assert counts["fallback"] == {"tensors": 7, "params": 2 * vocab * hidden + 5 * hidden}
    assert set(s["fallback_names"]) == FALLBACK_NAMES


# =========================================================================================== (a) optimizers=
def test_optimizers_door_steps_swan(tmp_path):
    s = run_door("optimizers", tmp_path, "swan", args_overrides=CONSTANT)
    assert s["chain"] == ["AcceleratedOptimizer", "SWAN"] and s["steps"] == STEPS
    check_counts(s)
    check_first_step(s, "swan")


# =========================================================================================== (c) factory
def test_factory_door_steps_sinkgd_with_its_own_lr_and_hyper(tmp_path):
    s = run_door("factory", tmp_path, "sinkgd", args_overrides=CONSTANT, iterations=3)
    assert s["chain"] == ["AcceleratedOptimizer", "SinkGD"] and s["hyper"]["iterations"] == 3
    check_counts(s)
    check_first_step(s, "sinkgd", iterations=3)  # lr 1e-3 from the factory, not the Trainer's 0.5


@pytest.mark.parametrize("name, cls", [("swan", SWAN), ("SinkGD", SinkGD), ("sgd-sai", SGDSaI)])
def test_factory_builds_from_the_model(name, cls):
    model = H.tiny_llama(H.SYNTHETIC_VOCAB, SEQ)
    factory_cls, kwargs = hf.stateless_optimizer(name, lr=3e-3, fallback_weight_decay=0.0, weight_decay=0.1)
    assert not issubclass(factory_cls, torch.optim.Optimizer)  # transformers then calls factory_cls()(model, **kw)
    from transformers.trainer_optimizer import is_optimizer_factory

    assert is_optimizer_factory(factory_cls)
    opt = factory_cls()(model, **kwargs)
    assert type(opt) is cls and opt.replicate_group is True
    by_rule = {g["rule"]: g for g in opt.param_groups}
    assert set(by_rule["fallback"]["param_names"]) == FALLBACK_NAMES
    assert by_rule["fallback"]["weight_decay"] == 0.0 and by_rule["matrix"]["weight_decay"] == 0.1
    assert all(g["lr"] == 3e-3 for g in opt.param_groups)


@pytest.mark.parametrize(
    "name, kwargs, field",
    [
        ("swan", {"ns_steps": 0}, "ns_steps"),
        ("swan", {"nssteps": 12}, "nssteps"),
        ("sinkgd", {"iterations": "five"}, "iterations"),
        ("sinkgd", {"betas": (0.9, 1.5)}, "betas"),
        ("sgdsai", {"momentum": 1.0}, "momentum"),
        ("swan", {"fallback": "adam"}, "fallback"),
    ],
)
def test_factory_arguments_fail_naming_the_field(name, kwargs, field):
    with pytest.raises(ValueError, match=rf"stateless_optimizer\('{name}'\) arguments: {field}"):
        hf.stateless_optimizer(name, lr=1e-3, **kwargs)
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'.*swan, sinkgd, sgdsai"):
        hf.stateless_optimizer("adamw", lr=1e-3)
    with pytest.raises(ValueError, match=r"lr: Input should be greater than or equal to 0"):
        hf.stateless_optimizer(name, lr=-1.0)


def test_factory_refuses_fsdp1():
    from torch.distributed.fsdp import FullyShardedDataParallel

    from stateless_opt import param_groups

    class Flat(FullyShardedDataParallel):
        """FSDP1 as the factory sees it (use_orig_params=False): one 1-D flat parameter. No process group is needed."""

        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in module.parameters()]))

        def __getattr__(self, name):
            return torch.nn.Module.__getattr__(self, name)

        def named_parameters(self, *args, **kwargs):
            return torch.nn.Module.named_parameters(self, *args, **kwargs)

    model = Flat(torch.nn.Linear(8, 4))
    assert [g["rule"] for g in param_groups(model)] == ["fallback"]  # what would silently happen
    factory_cls, kwargs = hf.stateless_optimizer("swan", lr=1e-3)
    with pytest.raises(ValueError, match=r"FSDP1.*fsdp_config=\{'version': 2\}"):
        factory_cls()(model, **kwargs)


def test_guard_stops_a_run_that_would_step_adamw(tmp_path):
    from transformers import Trainer

    train_set, vocab = H.dataset("synthetic", count=16, seq_len=SEQ)
    args = H.training_args(tmp_path, steps=1, lr=1e-3, batch_size=BATCH)
    trainer = Trainer(model=H.tiny_llama(vocab, SEQ), args=args, train_dataset=train_set,
                      callbacks=[hf.RequireStatelessOptimizer("swan")])  # no optimizer given: AdamW
    with pytest.raises(RuntimeError, match=r"about to step AcceleratedOptimizer -> AdamW, not SWAN"):
        trainer.train()
    assert trainer.state.global_step == 0


# =========================================================================================== (b) DeepSpeed
def _no_optimizer_json(tmp: Path) -> str:
    cfg = json.loads((ROOT / "configs" / "ds_zero2_swan.json").read_text())
    del cfg["optimizer"]
    path = tmp / "ds_zero2_no_optimizer.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def child_deepspeed(out: str) -> None:
    """One DeepSpeed rank: (b) the shipped ZeRO-2 SWAN JSON. Then (c) the factory with a JSON without an
    optimizer block, where ZeRO wraps ours. Then (a) ``optimizers=``, which DeepSpeed discards; the guard catches that."""
    H.cpu_deepspeed_env()
    out_dir = Path(out).parent
    results = {"json": run_door("deepspeed", out_dir / "b", "swan", args_overrides=CONSTANT)}
    no_opt = _no_optimizer_json(out_dir)
    results["factory"] = run_door("factory", out_dir / "c", "sinkgd", args_overrides={**CONSTANT, "deepspeed": no_opt})
    try:
        run_door("optimizers", out_dir / "a", "swan", args_overrides={**CONSTANT, "deepspeed": no_opt})
        results["discarded"] = "no error"
    except RuntimeError as err:
        results["discarded"] = str(err)
    torch.save(results, out)
    H.close_process_group()  # a gloo group alive at exit can abort the process (launch/hf_trainer.py)


def run_child(kind: str, tmp: Path, nproc: int = 1) -> dict:
    out = tmp / "result.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "test_hf", kind, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "test_hf", kind, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=False) if nproc == 1 else {}


def test_deepspeed_doors(tmp_path):
    r = run_child("deepspeed", tmp_path)
    s = r["json"]  # (b): the Trainer filled "lr": "auto" with learning_rate (the decoy, here the real LR)
    assert s["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "SWAN"] and s["basic"] == "SWAN"
    assert s["layout"] == "DeepSpeedLayout" and s["steps"] == STEPS
    shipped = json.loads((ROOT / "configs" / "ds_zero2_swan.json").read_text())["optimizer"]["params"]
    assert s["hyper"]["fallback_lr_ratio"] == shipped["fallback_lr_ratio"]
    assert s["hyper"]["whitening"] == shipped.get("whitening", SWANConfig().whitening)
    check_counts(s)
    check_first_step(s, "swan", lr=DECOY_LR)
    s = r["factory"]  # (c) under DeepSpeed: a client optimizer that ZeRO wraps, with the factory's lr
    assert s["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "SinkGD"] and s["basic"] == "SinkGD"
    assert s["layout"] == "DeepSpeedLayout"
    check_counts(s)
    check_first_step(s, "sinkgd")
    # (a) under DeepSpeed: the Trainer threw our SWAN away and built AdamW; the guard stopped it
    assert "about to step DeepSpeedOptimizerWrapper -> DeepSpeedZeroOptimizer -> AdamW, not SWAN" in r["discarded"]
    assert "optimizers= is discarded" in r["discarded"]


def test_deepspeed_config_registers_and_validates(tmp_path):
    import stateless_opt.integrations.deepspeed as sds

    sds.unregister()
    try:
        cfg = hf.deepspeed_config(ROOT / "configs" / "ds_zero2_swan.json")
        assert sds.is_registered() and cfg["optimizer"]["type"] == "SWAN" and cfg["optimizer"]["params"]["lr"] == "auto"
    finally:
        sds.register()
    bad = json.loads((ROOT / "configs" / "ds_zero1_sinkgd.json").read_text())
    bad["optimizer"]["params"]["iterations"] = 0
    with pytest.raises(ValueError, match=r"DeepSpeed config: .*iterations: Input should be greater than or equal to 1"):
        hf.deepspeed_config(bad)
    bad["optimizer"]["params"].pop("iterations")
    bad["optimizer"]["params"]["ns_steps"] = 5  # a SWAN key on SinkGD
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{path}: .*ns_steps: Extra inputs are not permitted"):
        hf.deepspeed_config(path)


# =========================================================================================== DDP
def child_ddp(out: str) -> None:
    """One of two torchrun ranks: the factory door under DDP (MULTI_CPU, gloo)."""
    rank = int(os.environ["RANK"])
    s = run_door("factory", Path(out).parent / "ddp", "swan",
                 args_overrides={**CONSTANT, "ddp_backend": "gloo"})
    s["world"] = int(os.environ["WORLD_SIZE"])
    torch.save(s, Path(out).with_suffix(f".rank{rank}.pt"))
    H.close_process_group()


def test_factory_door_under_ddp_splits_the_whitening(tmp_path):
    run_child("ddp", tmp_path, nproc=2)
    r0, r1 = (torch.load(tmp_path / f"result.rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["chain"] == ["AcceleratedOptimizer", "SWAN"] and r0["layout"] is None
    # replicate_group=True: each rank whitens about half the matrices and sends them to the other rank.
    # An optimizer not told about DDP sends nothing.
    assert r0["bytes_sent"] > 0 and r1["bytes_sent"] > 0
    for name, a in r0["record"].items():
        b = r1["record"][name]
        assert torch.equal(a["G"], b["G"]), name  # DDP-averaged gradients
        assert torch.equal(a["W1"], b["W1"]), name  # the replicas stay identical after the split step
    check_counts(r0)
    check_first_step(r0, "swan")


def test_door_script_destroys_the_process_group(tmp_path):
    """The Trainer and accelerate leave their gloo group alive; at interpreter exit gloo's worker thread
    can then free a finished collective's tensors after finalisation began, which aborts the process
    ("terminate called without an active exception", SIGABRT, ~1 run in 7 of a plain 4-rank gloo
    script on torch 2.13). The door script destroys the group before it returns."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch.distributed as dist; "
            "import launch.hf_trainer as H; "
            f"H.main(['--door', 'deepspeed', '--steps', '2', '--data', 'synthetic', '--output-dir', {str(tmp_path)!r}]); "
            "print('process group alive after main:', dist.is_initialized())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "process group alive after main: False" in proc.stdout, proc.stdout[-2000:]


if __name__ == "__main__":  # the subprocesses: python -m test_hf <kind> <out>
    {"deepspeed": child_deepspeed, "ddp": child_ddp}[sys.argv[1]](sys.argv[2])
