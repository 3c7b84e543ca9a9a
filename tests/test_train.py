"""launch/train.py end to end on the CPU: one process, DDP / FSDP2 / DeepSpeed ZeRO-2 on 2 gloo ranks
(torchrun subprocesses), bit-identical resume, crash-safe auto-resume, run folders that are never mixed,
config errors that name the field, shipped configs.

Runs are tiny (the ``tiny`` preset, 4 x 64-token sequences, <= 12 steps, windows from the first 50k
tokens) so each case takes seconds; the multi-process runs are compared with the one-process run on
the same global batch (the data order is a function of the step only).

Crash tests: each backend's 2-rank run is killed three times under ``torchrun --max-restarts 3`` (DDP
through ``launch/multinode.sh``'s MAX_RESTARTS), by tests/faults/sitecustomize.py: SIGKILL in step 6
before the optimizer update (rank 1), while writing checkpoint 8 (rank 0, its file written, nothing
committed), right after checkpoint 8 was committed (rank 1). Each restart runs the same command and
resumes from the newest complete checkpoint (4, 4, 8). The run must end bitwise equal to the
uninterrupted one: every train loss, the validation loss and every tensor of the final checkpoint
(weights, optimizer state, LR schedule, RNG states).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import checkpoint as ckpt
from launch import data as D
from launch import runs as R
from launch import train as T
from launch.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).resolve().parent / "faults"
QUICK = [
    "-c", "configs/quickstart.yaml",
    "--training.steps=12", "--training.warmup_steps=2", "--training.batch_size=4", "--data.seq_len=64",
    "--training.eval_every=0", "--training.eval_batches=2", "--training.progress=off", "--training.log_every=4",
    "--data.max_train_tokens=50000", "--run.plot=false", "--checkpoint.every=0", "--training.threads=1",
]
TWO_RANKS = ["--training.eval_every=6", "--checkpoint.every=4", "--checkpoint.keep=3"]  # checkpoints 4, 8, 12
CRASH_PLAN = "0:mid_step:6:1;1:mid_write:8:0;2:after_write:8:1"
TORCHRUN_TIMEOUT = 600


@pytest.fixture(scope="module", autouse=True)
def corpus():
    return D.prepare("kjv", 4096, 0.05, verbose=False)  # once, before any subprocess needs it


def run_single(tmp: Path, *extra: str) -> dict:
    return T.main([*QUICK, f"--run.dir={tmp}", *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_command(backend: str) -> list[str]:
    """The README's torchrun line for ``backend`` (its "Backends" block, run here as the reference runs)."""
    import shlex

    from test_readme import blocks

    block = next(code for marker, _, code in blocks() if marker == "readme: run by tests/test_train.py")
    line = next(ln for ln in block.splitlines() if ln.endswith(f"--backend {backend}"))
    cmd = shlex.split(line)
    assert cmd[0] == "torchrun" and "--nproc-per-node" in cmd, line
    return [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]


def torchrun(tmp: Path, backend: str, *extra: str, nproc: int = 2, via_script: bool = False,
             crash_plan: str | None = None, readme: bool = False) -> subprocess.CompletedProcess:
    """A 2-rank run; with ``crash_plan``, killed at its points and restarted by torchrun each time; with
    ``readme``, the README's command for the backend with the tiny-run flags after it."""
    args = [*QUICK, f"--run.dir={tmp}", f"--backend={backend}", f"--training.batch_size={4 // nproc}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    restarts = "0"
    if crash_plan:
        restarts = str(crash_plan.count(";") + 1)
        env.update(STATELESS_OPT_CRASH_PLAN=crash_plan,
                   PYTHONPATH=os.pathsep.join([str(FAULTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if readme:
        cmd = [*readme_command(backend), *args]
    elif via_script:  # launch/multinode.sh, one node, static rendezvous on a free port
        env.update(NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                   NPROC_PER_NODE=str(nproc), PYTHON=sys.executable, MAX_RESTARTS=restarts)
        cmd = ["bash", "launch/multinode.sh", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={restarts}", "-m", "launch.train", *args]
    proc = run_group(cmd, env, TORCHRUN_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_group(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session; on timeout the whole session (torchrun's workers too) is killed."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_learns(summary: dict) -> None:
    losses = summary["train_losses"]
    assert losses[0] > 8.0  # ~ln(4096) at init
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses


def assert_close_losses(a: list[float], b: list[float], tol: float) -> None:
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst < tol, (worst, a, b)


def checkpoint_tensors(path: Path) -> dict[str, object]:
    """Every value in every .pt file of a checkpoint (DeepSpeed's included), by file and key path."""
    out: dict[str, object] = {}

    def walk(obj, key: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")
        elif hasattr(obj, "__dict__") and not torch.is_tensor(obj):  # DeepSpeed's loss scaler
            walk(vars(obj), f"{key}:{type(obj).__name__}")
        else:
            out[key] = obj

    for f in sorted(path.rglob("*.pt")):
        walk(ckpt.safe_load(f, ckpt._deepspeed_safe_globals()), str(f.relative_to(path)))
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 20
    for k, va in ta.items():
        vb = tb[k]
        same = torch.equal(va, vb) if torch.is_tensor(va) else va == vb
        assert same, (k, va, vb)


@pytest.fixture(scope="module")
def single_reference(tmp_path_factory) -> dict:
    """One process, global batch 4: what every 2-rank run (batch 2 each) must reproduce."""
    return run_single(tmp_path_factory.mktemp("single"), "--training.eval_every=6")


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """The uninterrupted 2-rank run of each backend: the README's command (started once, shared below)."""
    done: dict[str, Path] = {}

    def get(backend: str) -> Path:
        if backend not in done:
            out = tmp_path_factory.mktemp(f"ref_{backend}")
            torchrun(out, backend, *TWO_RANKS, readme=True)
            done[backend] = out
        return done[backend]

    return get


# --------------------------------------------------------------------------------------- one process
def test_single_process_learns(single_reference):
    s = single_reference
    assert_learns(s)
    assert s["backend"] == "single" and s["world_size"] == 1 and s["steps_this_run"] == 12
    assert s["final_val_loss"] < s["unigram_entropy"] + 1.0
    mem = s["memory"][0]
    # the report runs in the last step before zero_grad: the gradients are measured, not assumed
    assert mem["param_bytes"] == s["params"]["total"] * 4 == mem["grad_bytes"]
    # SWAN: no state for the block matrices; two fp32 AdamW moments (+ a step scalar) per fallback tensor
    fallback = s["params"]["embedding_and_head"] + 128 * 9  # + 9 RMSNorm weights of width 128
    assert 8 * fallback <= mem["optimizer_state_bytes"] <= 8 * fallback + 4 * 11
    assert mem["peak_rss_bytes"] > 0


def test_outputs_and_resolved_config(tmp_path):
    s = run_single(tmp_path, "--training.steps=4", "--training.eval_every=2", "--optimizer", "sinkgd",
                   "--run.plot=true")
    records = R.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 and r["time_s"] > 0 for r in records if "train_loss" in r)
    resolved = load_config(tmp_path / "config.yaml")  # the saved config is itself a valid config
    assert resolved.optimizer.name == "sinkgd" and resolved.training.steps == 4
    assert json.loads((tmp_path / "summary.json").read_text())["final_val_loss"] == s["final_val_loss"]
    assert (tmp_path / "loss.png").stat().st_size > 10_000  # the plot is drawn by default
    assert json.loads((tmp_path / "memory_report.json").read_text())["ranks"][0]["grads"] > 0


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
    assert_same_checkpoint(tmp_path / "full/checkpoints/step_00000008", tmp_path / "resumed/checkpoints/step_00000008")


def test_relaunch_resumes_and_run_folders_are_never_mixed(tmp_path, monkeypatch, capsys):
    """Default folders runs/<name>-<optimizer>; a relaunch resumes (``--resume auto``) or says the run is
    complete; whatever would mix two runs or overwrite checkpoints is an ``error:`` line, exit code 2."""
    monkeypatch.chdir(tmp_path)
    base = [a for a in QUICK if a != "--checkpoint.every=0"] + ["--training.steps=6", "--checkpoint.every=3",
                                                                "--checkpoint.keep=1"]
    first = T.main(base)
    swan = tmp_path / "runs" / "quickstart-swan"
    assert first["steps_this_run"] == 6 and (swan / "checkpoints" / "step_00000006").is_dir()
    assert not (swan / "checkpoints" / "step_00000003").exists()  # keep=1
    again = T.main(base)  # the same command: resumes from step 6, nothing left to do
    assert again["steps_this_run"] == 0 and again["final_val_loss"] == first["final_val_loss"]
    assert "complete: the newest checkpoint is the last step" in capsys.readouterr().out
    records = R.read_metrics(swan / "metrics.jsonl")
    assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [s["step"] for s in R.read_starts(swan / "metrics.jsonl")] == [0, 6]  # appended, never truncated

    other = T.main([*base, "--optimizer", "sinkgd"])  # another optimizer: its own folder
    assert other["optimizer"] == "sinkgd" and (tmp_path / "runs" / "quickstart-sinkgd" / "summary.json").exists()

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            T.main([*base, *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        return err

    err = refused("--optimizer", "adamw", f"--run.dir={swan}")
    assert "optimizer.name: 'swan' -> 'adamw'" in err and "--checkpoint.allow_changes" in err
    err = refused("--training.seed=1")
    assert "training.seed: 0 -> 1" in err
    assert "--resume never would overwrite them" in refused("--resume", "never")
    assert "no complete checkpoint under" in refused("--resume", "latest", "--run.name=fresh")
    assert "no complete checkpoint there" in refused(f"--checkpoint.resume={tmp_path / 'nowhere'}")
    assert "no '/'" in refused("--run.name=a/b")
    # an older checkpoint of the same folder would be overwritten by the continuation
    older = T.main([*base, "--run.name=branch", "--checkpoint.keep=2"])
    assert older["steps_this_run"] == 6
    old = tmp_path / "runs" / "branch-swan" / "checkpoints" / "step_00000003"
    assert "is older than" in refused("--run.name=branch", f"--checkpoint.resume={old}")

    # told otherwise: AdamW continues from SWAN's weights at step 6 (12 steps now), with its own LRs
    moved = T.main([*base, "--optimizer", "adamw", f"--run.dir={swan}", "--checkpoint.allow_changes=true",
                    "--training.steps=8"])
    assert moved["steps_this_run"] == 2 and moved["optimizer"] == "adamw"
    out = capsys.readouterr().out
    assert "weights only: it was written by swan" in out and "checkpoint.allow_changes: this config differs" in out
    # run.overwrite deletes the folder's results and starts over
    fresh = T.main([*base, "--run.overwrite=true"])
    assert fresh["steps_this_run"] == 6 and fresh["train_losses"] == first["train_losses"]
    assert [s["step"] for s in R.read_starts(swan / "metrics.jsonl")] == [0]


def test_allow_changes_uses_this_configs_schedule(tmp_path):
    """Extending a finished run with ``allow_changes``: the LR at the resumed step is this config's
    schedule (a fresh cosine over 10 steps), not the checkpoint's (over 6)."""
    base = [a for a in QUICK if a != "--checkpoint.every=0"] + ["--checkpoint.every=3", f"--run.dir={tmp_path}"]
    T.main([*base, "--training.steps=6"])
    T.main([*base, "--training.steps=10", "--checkpoint.allow_changes=true"])
    cfg = load_config("configs/quickstart.yaml", {"training.steps": 10, "training.warmup_steps": 2})
    lrs = {r["step"]: r["lr"] for r in R.read_metrics(tmp_path / "metrics.jsonl") if "lr" in r}
    assert lrs[7] == pytest.approx(cfg.optimizer.swan.lr * T.lr_lambda(cfg)(6), rel=1e-12)
    # ...while the optimizer's own counters carry on from the checkpoint (9 steps, not 3)
    groups = torch.load(tmp_path / "checkpoints" / "step_00000009" / "state.pt")["optimizer"]["param_groups"]
    assert [g["step"] for g in groups] == [9, 9]


class _RunsCode:
    """A pickled object whose reconstruction would run code (here: create a file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, capsys):
    """Loading a checkpoint runs no code: every file goes through torch.load(weights_only=True)."""
    run = tmp_path / "run"
    T.main([*QUICK, f"--run.dir={run}", "--training.steps=2", "--checkpoint.final=true"])
    step = run / "checkpoints" / "step_00000002"
    state = torch.load(step / "state.pt", weights_only=True)
    marker = tmp_path / "code_ran"
    state["scheduler"]["extra"] = _RunsCode(str(marker))
    torch.save(state, step / "state.pt")
    pickle.loads(pickle.dumps(_RunsCode(str(tmp_path / "probe"))))  # the payload works when unpickled freely
    assert (tmp_path / "probe").exists()
    with pytest.raises(SystemExit) as exc:
        T.main([*QUICK, f"--run.dir={tmp_path / 'other'}", "--training.steps=2", f"--checkpoint.resume={step}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "state.pt: refused" in err and "could run code" in err, err
    assert not marker.exists()


def test_interrupt_prints_where_it_stopped(tmp_path):
    """Ctrl-C (SIGINT to the process group): one line saying the step and how to resume, exit 130."""
    cmd = [sys.executable, "-m", "launch.train", *QUICK, f"--run.dir={tmp_path}", "--training.steps=400",
           "--checkpoint.every=2", "--training.log_every=1"]
    err = _interrupt(cmd, "step      3/")
    assert_interrupt_line(err)
    assert "Traceback" not in err, err


def test_interrupt_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "launch.train",
           *QUICK, f"--run.dir={tmp_path}", "--backend=ddp", "--training.batch_size=2", "--training.steps=400",
           "--checkpoint.every=2", "--training.log_every=1"]
    err = _interrupt(cmd, "step      3/")
    assert err.count("interrupted at step") == 1, err
    assert_interrupt_line(err)
    # our workers print no traceback (torchrun's agent prints its own SignalException)
    assert "KeyboardInterrupt" not in err and "launch/train.py" not in err, err


def assert_interrupt_line(err: str) -> None:
    m = re.search(r"interrupted at step (\d+) of 400; rerun the same command to resume from the checkpoint at "
                  r"step (\d+)", err)
    assert m and int(m[2]) <= int(m[1]) and int(m[2]) % 2 == 0 and int(m[2]) >= 2, err


def _interrupt(cmd: list[str], after: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        for line in p.stdout:
            if line.startswith(after):
                os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
                break
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode in (130, 1), (p.returncode, err)  # torchrun itself exits 1 on SIGINT
    return err


# --------------------------------------------------------------------------------------- 2 gloo ranks
def test_ddp_two_ranks_matches_one_process(single_reference, reference_runs):
    s = summary(reference_runs("ddp"))
    assert s["world_size"] == 2 and len(s["memory"]) == 2
    assert_learns(s)
    assert_close_losses(s["train_losses"], single_reference["train_losses"], 2e-3)
    assert abs(s["final_val_loss"] - single_reference["final_val_loss"]) < 2e-3


def test_fsdp2_two_ranks_matches_one_process(single_reference, reference_runs):
    full = summary(reference_runs("fsdp2"))
    assert_learns(full)
    assert_close_losses(full["train_losses"], single_reference["train_losses"], 2e-3)
    # FSDP2 shards parameters and the fallback's AdamW moments: each rank holds about half
    total = full["params"]["total"] * 4
    assert all(0.3 * total < m["param_bytes"] < 0.7 * total for m in full["memory"])


def test_deepspeed_zero2_two_ranks(single_reference, reference_runs):
    s = summary(reference_runs("deepspeed"))  # configs/ds_zero2_swan.json, picked by default
    assert_learns(s)
    assert_close_losses(s["train_losses"], single_reference["train_losses"], 2e-3)


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "deepspeed"])
def test_killed_three_times_ends_bitwise_equal(backend, reference_runs, tmp_path):
    ref = reference_runs(backend)
    proc = torchrun(tmp_path, backend, *TWO_RANKS, via_script=backend == "ddp", crash_plan=CRASH_PLAN)
    log = proc.stdout + proc.stderr
    assert log.count("[crash plan]") == 3, log[-3000:]  # the three kills happened
    s, r = summary(tmp_path), summary(ref)
    assert s["steps_this_run"] == 4  # the last attempt resumed from checkpoint 8
    train = [x["train_loss"] for x in R.read_metrics(tmp_path / "metrics.jsonl") if "train_loss" in x]
    assert train == r["train_losses"]  # bitwise, every step, across the four attempts
    assert s["final_val_loss"] == r["final_val_loss"]
    assert_same_checkpoint(tmp_path / "checkpoints" / "step_00000012", ref / "checkpoints" / "step_00000012")
    starts = [s["step"] for s in R.read_starts(tmp_path / "metrics.jsonl")]
    assert starts == [0, 4, 4, 8]  # every attempt appended; the lost steps 5-6 and 5-8 are superseded
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000008", "step_00000012"]  # no partial write left, keep=3


def test_deepspeed_guard_when_the_extra_is_missing(monkeypatch):
    cfg = load_config("configs/quickstart.yaml", {"backend.name": "deepspeed"})
    monkeypatch.delitem(sys.modules, "stateless_opt.integrations.deepspeed", raising=False)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
    with pytest.raises(T.UserError, match=r"pip install 'stateless-opt\[deepspeed\]'"):
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


@pytest.mark.parametrize("optimizer", ["swan", "sinkgd", "sgdsai", "adamw"])
def test_deepspeed_picks_the_matching_json(optimizer):
    cfg = load_config("configs/quickstart.yaml", {"backend.name": "deepspeed", "optimizer.name": optimizer})
    ds = T.deepspeed_json(cfg, world=2)
    assert ds["zero_optimization"]["stage"] == 2
    if optimizer == "adamw":
        assert "optimizer" not in ds  # ZeRO-2 wraps the AdamW built from optimizer.adamw
    else:
        assert ds["optimizer"]["type"].lower() == optimizer and "auto" not in json.dumps(ds)


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
        (["--backend=deepspeed", "--backend.deepspeed_config=nope.json"], "backend.deepspeed_config"),
    ],
)
def test_bad_config_fails_naming_the_field(args, field, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["-c", "configs/quickstart.yaml", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field.lstrip("-").split(".")[0] in err, err


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
    with pytest.raises(SystemExit):
        T.main(["-c", "nope.yaml"])
    assert "config file: nope.yaml not found (shipped configs: " in capsys.readouterr().err


def test_cli_override_forms_agree():
    a = load_config("configs/quickstart.yaml", ["training.steps=50", "optimizer.swan.lr=1e-3"])
    _, overrides, _ = T.parse_cli(["--training.steps", "50", "--set", "optimizer.swan.lr=1e-3"])
    b = load_config("configs/quickstart.yaml", dict(overrides))
    assert a == b and a.training.steps == 50 and a.optimizer.swan.lr == 1e-3  # 1e-3 is a float, not a string


def test_short_runs_need_no_warmup_override():
    cfg = load_config("configs/quickstart.yaml", {"training.steps": 10})
    assert cfg.training.warmup == 1
    assert load_config("configs/quickstart.yaml").training.warmup == 30  # 10% of 300, as before


@pytest.mark.parametrize("path", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(path):
    cfg = load_config(ROOT / "configs" / path)
    assert cfg.optimizer.selected().lr > 0
    for name in ("swan", "sinkgd", "sgdsai", "adamw"):  # every optimizer switch gives a valid config
        load_config(ROOT / "configs" / path, {"optimizer.name": name})


def test_print_config_and_help(capsys):
    assert T.main(["-c", "configs/quickstart.yaml", "--print-config", "--training.steps=70"]) is None
    out = capsys.readouterr().out
    assert "steps: 70" in out and "preset: tiny" in out
    T.main(["--help"])
    out = capsys.readouterr().out
    assert "training.grad_clip" in out and "optimizer.swan.ns_steps" in out
    assert "optimizer.name = 'swan' (one of: swan, sinkgd, sgdsai, adamw)" in out
    assert "backend.name = 'single' (one of: single, ddp, fsdp2, deepspeed)" in out
    assert "model.preset = 'tiny' (one of: tiny, 60m, 130m, 350m, 1.3b)" in out


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
    assert "--max-restarts 0" in static and "--max-restarts 5" in dry(NNODES="2", NODE_RANK="0", MAX_RESTARTS="5")
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


# --------------------------------------------------------------------------------------- checkpoint files
def test_checkpoint_write_is_atomic_and_retention_keeps_newer(tmp_path):
    """One process: a killed write leaves a .partial folder that is never taken for a checkpoint and is
    cleaned; retention never deletes a checkpoint newer than the one just written."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = ckpt.Parts(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), "single", 0, 1)
    root = tmp_path / "ck"
    for step in (2, 4, 6):
        ckpt.save(root, step, parts, {"optimizer": "sgd"}, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000004", "step_00000006"]
    (root / ".step_00000008.partial").mkdir()  # what a kill mid-write leaves
    (root / ".step_00000008.partial" / "rank00000.pt").write_bytes(b"half")
    assert ckpt.resolve("auto", root).name == "step_00000006"
    R.clean_partials(root)
    assert not (root / ".step_00000008.partial").exists()
    ckpt.save(root, 5, parts, {"optimizer": "sgd"}, keep=1)  # an older step: the newer ones stay
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000005", "step_00000006"]
    assert ckpt.load(root / "step_00000006", parts) == 6
