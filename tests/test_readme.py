"""Every README command runs as pasted, on the CPU.

Each fenced block of README.md follows a marker: ``<!-- ci:setup -->`` / ``<!-- ci:test -->`` (.ci/run
runs those two), ``<!-- readme: run -->`` (shell commands, run here), ``<!-- readme: run by
tests/test_train.py -->`` (the torchrun backend lines: test_train runs each as its 2-rank reference run),
``<!-- readme: python ... -->`` (a Python snippet), or ``<!-- readme: not ... (why) -->``. A block without a marker fails the first test, so a new
command is either run here or excluded with its reason.

The shell blocks run in order, as a reader would paste them, with bash in a scratch folder that looks
like the repository root (``configs`` and ``launch`` link to the checkout; ``runs/`` is written there).
Two changes keep the test short, neither touching what the command means: every training command gets
flags appended that make the run tiny (the CLI's last value wins, so every flag of the pasted command is
still parsed and checked), and fixed rendezvous ports become free ones (other jobs share this machine).
The set-up block's training command runs the same way (its ``pip install`` is CI's own step).

Python snippets run in fresh interpreters, with a prelude that defines only the names the README leaves
to the reader (``MyTransformer``, ``loader``, ``model``; a one-rank gloo process group for the
FSDP2/DDP block) and skips DeepSpeed's one-minute shared-memory op build, as every DeepSpeed test does.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import run_group

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY_TRAIN = ("--training.steps=4 --training.batch_size=2 --data.seq_len=64 --data.max_train_tokens=50000 "
              "--training.eval_every=2 --training.eval_batches=1 --training.threads=1 --training.progress=off")
TINY_HF = "--steps 3 --batch-size 4 --seq-len 32"
TIMEOUT = 900


def blocks() -> list[tuple[str, str, str]]:
    """(marker, language, code) of every fenced block, in order; marker "" when there is none."""
    out = []
    lines = README.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if m:
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            prev = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
            marker = re.match(r"<!--\s*(.*?)\s*-->", prev.strip())
            out.append((marker[1] if marker else "", m[1], "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shorten(block: str) -> str:
    """Append the tiny-run flags to each training / HF-door command; fixed ports -> free ones."""
    out, ports = [], {}
    for line in block.splitlines():
        code, hash_, comment = line.partition("  #")
        is_train = re.search(r"stateless-opt-train |stateless_opt\.launch\.train |launch/multinode\.sh ", code)
        if is_train or "stateless_opt.launch.hf_trainer" in code:
            flags = TINY_TRAIN if is_train else TINY_HF
            code = re.sub(r"(\s*(;\s*wait|&))?\s*$", lambda m: f" {flags}{m.group(0)}", code.rstrip(), count=1)
        code = re.sub(r"MASTER_PORT=(\d+)", lambda m: f"MASTER_PORT={ports.setdefault(m[1], _free_port())}", code)
        out.append(code + (hash_ + comment if hash_ else ""))
    return "\n".join(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    for name in ("configs", "launch"):
        (d / name).symlink_to(ROOT / name)
    return d


def env() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # python, stateless-opt-* and torchrun of this environment
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def run_shell(code: str, cwd: Path) -> str:
    proc = run_group(["bash", "-euo", "pipefail", "-c", code], env(), TIMEOUT, cwd=cwd)
    assert proc.returncode == 0, f"{code}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr, proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_every_block_is_marked():
    unmarked = [code.splitlines()[0] for marker, _, code in blocks() if not marker]
    assert not unmarked, f"README blocks without a <!-- readme: ... --> marker: {unmarked}"
    kinds = {marker.split(" ")[0] for marker, _, _ in blocks()}
    assert kinds <= {"ci:setup", "ci:test", "readme:"}, kinds


def test_shell_blocks_run_as_pasted(workdir):
    """The set-up's training command, then every ``readme: run`` block, in README order."""
    setup = next(code for marker, _, code in blocks() if marker == "ci:setup")
    assert setup.startswith("pip install -e \".[all,test]\" && ")
    train = setup.split("&&", 1)[1].strip()
    out = run_shell(shorten(train), workdir)
    assert (workdir / "runs" / "quickstart-swan" / "loss.png").exists(), out[-2000:]
    ran = [code for marker, _, code in blocks() if marker == "readme: run"]
    assert len(ran) >= 3
    for code in ran:
        out = run_shell(shorten(code), workdir)
        if "stateless-opt-compare" in code:
            assert "quickstart-sinkgd" in out and "val loss" in out and (workdir / "runs" / "compare.png").exists()
    for run in ("quickstart-swan", "quickstart-sinkgd", "quickstart-adamw", "two_nodes"):
        assert (workdir / "runs" / run / "summary.json").exists(), run


PRELUDE = '''
import os, types, torch, torch.nn.functional as F
import deepspeed.comm.torch
deepspeed.comm.torch.build_shm_op = lambda: None   # the test skips DeepSpeed's 1-min CPU op build

class MyTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(64, 32)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(2))
        self.head = torch.nn.Linear(32, 64, bias=False)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        logits = self.head(h)
        return types.SimpleNamespace(loss=F.cross_entropy(logits.flatten(0, 1), labels.flatten()))

ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
loader = [dict(input_ids=ids, labels=ids)] * 3
model = MyTransformer()
from stateless_opt import SWAN, SinkGD, SGDSaI, param_groups
'''
PROCESS_GROUP = '''
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
'''


@pytest.mark.parametrize("index", [i for i, (m, _, _) in enumerate(blocks()) if m.startswith("readme: python")])
def test_python_snippets_run(index, tmp_path):
    marker, lang, code = blocks()[index]
    assert lang == "python"
    script = PRELUDE
    if "process group" in marker:
        script += PROCESS_GROUP
    script += "\n# --- README\n" + code + "\n# --- end\n"
    script += textwrap.dedent('''
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        print("snippet ok")
    ''')
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "snippet.py").write_text(script)
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0 and "snippet ok" in proc.stdout, f"{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
