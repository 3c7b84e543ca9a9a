"""launch/train.py end to end on the CPU: one process, DDP / FSDP2 / DeepSpeed ZeRO-2 on 2 gloo ranks
(torchrun subprocesses), bit-identical resume, config errors that name the field, shipped configs.

Runs are tiny (the ``tiny`` preset, 4 x 64-token sequences, <= 12 steps, windows from the first 50k
tokens) so each case takes seconds; the multi-process runs are compared with the one-process run on
the same global batch (the data order is a function of the step only).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt
from launch import data as D
from launch import train as T
from launch.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "-c", "configs/quickstart.yaml",
    "--training.steps=12", "--training.warmup_steps=2", "--training.batch_size=4", "--data.seq_len=64",
    "--training.eval_every=0", "--training.eval_batches=2", "--training.progress=off", "--training.log_every=4",
    "--data.max_train_tokens=50000", "--run.plot=false", "--checkpoint.every=0", "--training.threads=1",
]
TORCHRUN_TIMEOUT = 300


@pytest.fixture(scope="module", autouse=True)
def corpus():
    return D.prepare("kjv", 4096, 0.05, verbose=False)  # once, before any subprocess needs it


def run_single(tmp: Path, *extra: str) -> dict:
    return T.main([*QUICK, f"--run.dir={tmp}", *extra])


def torchrun(tmp: Path, backend: str, *extra: str, nproc: int = 2, via_script: bool = False) -> dict:
    args = [*QUICK, f"--run.dir={tmp}", f"--backend={backend}", f"--training.batch_size={4 // nproc}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if via_script:  # launch/multinode.sh, one node, static rendezvous on a free port
        env.update(NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   NPROC_PER_NODE=str(nproc), PYTHON=sys.executable)
        cmd = ["bash", "launch/multinode.sh", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launch.train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return json.loads((tmp / "summary.json").read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_learns(summary: dict) -> None:
    losses = summary["train_losses"]
    assert losses[0] > 8.0  # ~ln(4096) at init
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


def assert_close_losses(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst < tol, (worst, a, b)


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory) -> dict:
    """One process, global batch 4: what every 2-rank run (batch 2 each) must reproduce."""
    return run_single(tmp_path_factory.mktemp("single"), "--training.eval_every=6")


# --------------------------------------------------------------------------------------- one process
def test_single_process_learns(single_reference):
    s = single_reference
    assert_learns(s)
    assert s["backend"] == "single" and s["world_size"] == 1 and s["steps_this_run"] == 12
    assert s["final_val_loss"] < s["unigram_entropy"] + 1.0
    mem = s["memory"][0]
    assert mem["param_bytes"] == s["params"]["total"] * 4 == mem["grad_bytes"]
    # SWAN: no state for the block matrices; two fp32 AdamW moments (+ a step scalar) per fallback tensor
    fallback = s["params"]["embedding_and_head"] + 128 * 9  # + 9 RMSNorm weights of width 128
    assert 8 * fallback <= mem["optimizer_state_bytes"] <= 8 * fallback + 4 * 11
    assert mem["peak_rss_bytes"] > 0


def test_outputs_and_resolved_config(tmp_path):
    s = run_single(tmp_path, "--training.steps=4", "--training.eval_every=2", "--optimizer", "sinkgd")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records if "train_loss" in r)
    resolved = load_config(tmp_path / "config.yaml")  # the saved config is itself a valid config
    assert resolved.optimizer.name == "sinkgd" and resolved.training.steps == 4
    assert json.loads((tmp_path / "summary.json").read_text())["final_val_loss"] == s["final_val_loss"]


@pytest.mark.parametrize("optimizer", ["swan", "sinkgd", "sgdsai", "adamw"])
def test_resume_reproduces_the_uninterrupted_run(optimizer, tmp_path):
    common = ["--training.steps=8", f"--optimizer={optimizer}", "--checkpoint.keep=2", "--checkpoint.final=true",
              "--training.eval_every=4"]
    full = run_single(tmp_path / "full", *common, "--checkpoint.every=4")
    half = tmp_path / "full" / "checkpoints" / "step_00000004"
    resumed = run_single(tmp_path / "resumed", *common, f"--checkpoint.resume={half}")
    assert resumed["steps_this_run"] == 4
    assert resumed["train_losses"] == full["train_losses"][4:]  # bit-identical
    assert resumed["final_val_loss"] == full["final_val_loss"]
    a = torch.load(tmp_path / "full/checkpoints/step_00000008/state.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed/checkpoints/step_00000008/state.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["scheduler"] == b["scheduler"]


def test_resume_latest_in_the_same_run_dir(tmp_path):
    first = run_single(tmp_path, "--training.steps=6", "--checkpoint.every=3", "--training.eval_every=3")
    again = T.main([*QUICK, f"--run.dir={tmp_path}", "--training.steps=6", "--training.eval_every=3", "--resume"])
    assert again["steps_this_run"] == 0  # the newest checkpoint is the last step: nothing left to do
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(6) == 2  # train + val records of step 6 kept once, not duplicated
    assert first["final_val_loss"] == again["final_val_loss"]
    assert ckpt.resolve("latest", tmp_path / "checkpoints").name == "step_00000006"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve("latest", tmp_path / "nothing")


# --------------------------------------------------------------------------------------- 2 gloo ranks
def test_ddp_two_ranks_matches_one_process(single_reference, tmp_path):
    s = torchrun(tmp_path, "ddp", "--training.eval_every=6", via_script=True)  # through launch/multinode.sh
    assert s["world_size"] == 2 and len(s["memory"]) == 2
    assert_learns(s)
    assert_close_losses(s["train_losses"], single_reference["train_losses"], 2e-3)
    assert abs(s["final_val_loss"] - single_reference["final_val_loss"]) < 2e-3


def test_fsdp2_two_ranks_matches_one_process_and_resumes(single_reference, tmp_path):
    full = torchrun(tmp_path / "full", "fsdp2", "--training.eval_every=6", "--checkpoint.every=6",
                    "--checkpoint.keep=2")
    assert_learns(full)
    assert_close_losses(full["train_losses"], single_reference["train_losses"], 2e-3)
    # FSDP2 shards parameters and the fallback's AdamW moments: each rank holds about half
    total = full["params"]["total"] * 4
    assert all(0.3 * total < m["param_bytes"] < 0.7 * total for m in full["memory"])
    resumed = torchrun(tmp_path / "resumed", "fsdp2", "--training.eval_every=6",
                       f"--checkpoint.resume={tmp_path / 'full/checkpoints/step_00000006'}")
    assert resumed["train_losses"] == full["train_losses"][6:]
    assert resumed["final_val_loss"] == full["final_val_loss"]


def test_deepspeed_zero2_two_ranks(single_reference, tmp_path):
    s = torchrun(tmp_path, "deepspeed", "--backend.deepspeed_config=configs/ds_zero2_swan.json",
                 "--training.eval_every=6")
    assert_learns(s)
    assert_close_losses(s["train_losses"], single_reference["train_losses"], 2e-3)


def test_deepspeed_guard_when_the_integration_is_missing(monkeypatch):
    cfg = load_config("configs/quickstart.yaml", {"backend.name": "deepspeed",
                                                  "backend.deepspeed_config": "configs/ds_zero2_swan.json"})
    monkeypatch.setitem(sys.modules, "stateless_opt.integrations.deepspeed", None)  # import now fails
    with pytest.raises(RuntimeError, match=r"stateless_opt\.integrations\.deepspeed.*pip install -e"):
        T.apply_deepspeed(torch.nn.Linear(2, 2), cfg, None, None, None)


def test_deepspeed_json_autos_filled_and_contradictions_named(tmp_path):
    raw = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2},
        "optimizer": {"type": "SWAN", "params": {"lr": "auto", "weight_decay": "auto", "gradnorm_axis": "oriented"}},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    cfg = load_config("configs/quickstart.yaml", {"backend.name": "deepspeed", "backend.deepspeed_config": str(path)})
    ds = T.deepspeed_json(cfg, world=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {"lr": 2e-3, "weight_decay": 0.0, "gradnorm_axis": "oriented"}
    path.write_text(json.dumps({**raw, "train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=3 contradicts"):
        T.deepspeed_json(cfg, world=2)
    path.write_text(json.dumps({**raw, "optimizer": {"type": "SinkGD", "params": {}}}))
    with pytest.raises(ConfigError, match="--optimizer sinkgd"):
        T.deepspeed_json(cfg, world=2)


# --------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "args, field",
    [
        (["--training.stepz=5"], "training.stepz"),
        (["--training.steps=abc"], "training.steps"),
        (["--optimizer.swan.ns_steps=0"], "optimizer.swan.ns_steps"),
        (["--optimizer.swan.lr=fast"], "optimizer.swan.lr"),
        (["--optimizer", "lion"], "optimizer.name"),
        (["--model.preset=7b"], "model.preset"),
        (["--training.warmup_steps=500"], "training.warmup_steps"),
        (["--data.seq_len=4096"], "data.seq_len"),
        (["--backend=deepspeed"], "backend.deepspeed_config"),
    ],
)
def test_bad_config_fails_naming_the_field(args, field, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["-c", "configs/quickstart.yaml", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert field in err, err


def test_bad_config_file_names_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  steps: 10\n  learning_rate: 0.1\nmodel:\n  preset: tiny\n")
    with pytest.raises(ConfigError, match=r"training\.learning_rate: Extra inputs are not permitted"):
        load_config(bad)
    with pytest.raises(SystemExit):
        T.main(["-c", str(bad)])
    assert "training.learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["-c", "configs/quickstart.yaml", "--bogus"])
    assert "unknown argument '--bogus'" in capsys.readouterr().err


def test_cli_override_forms_agree():
    a = load_config("configs/quickstart.yaml", ["training.steps=50", "optimizer.swan.lr=1e-3"])
    _, overrides, _ = T.parse_cli(["--training.steps", "50", "--set", "optimizer.swan.lr=1e-3"])
    b = load_config("configs/quickstart.yaml", dict(overrides))
    assert a == b and a.training.steps == 50 and a.optimizer.swan.lr == 1e-3  # 1e-3 is a float, not a string


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(path):
    cfg = load_config(ROOT / "configs" / path)
    assert cfg.optimizer.selected().lr > 0
    if cfg.backend.deepspeed_config:
        assert (ROOT / cfg.backend.deepspeed_config).exists()
    for name in ("swan", "sinkgd", "sgdsai", "adamw"):  # every optimizer switch gives a valid config
        load_config(ROOT / "configs" / path, {"optimizer.name": name})


def test_print_config_and_help(capsys):
    assert T.main(["-c", "configs/quickstart.yaml", "--print-config", "--training.steps=70"]) is None
    out = capsys.readouterr().out
    assert "steps: 70" in out and "preset: tiny" in out
    T.main(["--help"])
    out = capsys.readouterr().out
    assert "training.grad_clip" in out and "optimizer.swan.ns_steps" in out


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config("configs/quickstart.yaml", {"training.steps": 110, "training.warmup_steps": 10,
                                                  "training.min_lr_ratio": 0.1})
    f = T.lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 110))


def test_multinode_script_commands():
    def dry(**env):
        out = subprocess.run(["bash", "launch/multinode.sh", "-c", "configs/quickstart.yaml", "--backend", "fsdp2"],
                             cwd=ROOT, env={**os.environ, "DRY_RUN": "1", "NPROC_PER_NODE": "8", **env},
                             capture_output=True, text=True, check=True)
        return out.stdout

    static = dry(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29600")
    assert "--nnodes 2" in static and "--node-rank 1" in static and "--master-addr 10.0.0.1" in static
    assert "--master-port 29600" in static and "-m launch.train -c configs/quickstart.yaml --backend fsdp2" in static
    elastic = dry(NNODES="4", RDZV_ENDPOINT="head:29400", RDZV_ID="job7")
    assert "--rdzv-backend c10d --rdzv-endpoint head:29400 --rdzv-id job7" in elastic and "--node-rank" not in elastic
    ds = dry(LAUNCHER="deepspeed", NNODES="2", HOSTFILE="hosts", MASTER_ADDR="10.0.0.1")
    assert ds.startswith("deepspeed --num_nodes 2 --num_gpus 8") and "--hostfile hosts" in ds
    assert "--no_local_rank --module launch.train" in ds


def test_adamw_fallback_lr_ratio_gives_the_fallback_group_its_own_lr():
    # optimizer.adamw.fallback_lr_ratio: embeddings, LM head and norms (param_groups' fallback group)
    # at lr * ratio, matrices at lr; the warm-up + cosine schedule scales both, so the ratio holds at
    # every step; 1 (the default) is one LR for every tensor. A non-positive ratio is a config error.
    from launch.config import ConfigError, load_config
    from launch.model import build_model
    from launch.train import build_optimizer, make_scheduler

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", {
        "optimizer.name": "adamw", "optimizer.adamw.lr": 1e-3, "optimizer.adamw.fallback_lr_ratio": 7.0,
        "model.num_layers": 1, "training.steps": 20, "training.warmup_steps": 4})
    model = build_model(cfg.model, 512)
    opt = build_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    rules = [g["rule"] for g in opt.param_groups]
    assert rules == ["matrix", "fallback"]
    assert any("embed_tokens" in n for n in opt.param_groups[1]["names"])
    for _ in range(10):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[1] == pytest.approx(7.0 * lrs[0]) and lrs[0] > 0
        opt.step()
        sched.step()
    one = build_optimizer(load_config(ROOT / "configs" / "quickstart.yaml", {"optimizer.name": "adamw"}), model)
    assert len({g["lr"] for g in one.param_groups}) == 1
    with pytest.raises(ConfigError, match="optimizer.adamw.fallback_lr_ratio"):
        load_config(overrides={"optimizer.adamw.fallback_lr_ratio": 0})
