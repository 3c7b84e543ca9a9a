"""Dependencies by door: the core imports and steps with torch, pydantic and psutil alone; each door
(DeepSpeed, HF, launch) imported without its extra names the ``pip install`` that brings it; the extras
of pyproject.toml are the ones the doors check; the console scripts work from any directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from stateless_opt.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAME = {"pyyaml": "yaml"}  # distribution -> module, where they differ


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_pyproject_extras_are_the_doors_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = {re.split(r"[<>=;\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert core == {"torch", "pydantic", "psutil", "safetensors"}  # safetensors: the portable checkpoint
    for extra, modules in EXTRAS.items():
        names = {re.split(r"[<>=;\[ ]", d)[0].lower() for d in extras[extra]}
        assert set(modules) <= {IMPORT_NAME.get(n, n) for n in names}, (extra, names)
    assert extras["all"] == ["stateless-opt[deepspeed,hf,launch]"]
    assert {"pytest", "hypothesis", "sgd-sai", "triton"} <= {re.split(r"[<>=;\[ ]", d)[0] for d in extras["test"]}


DOORS = [  # (module, its extra, the door its message names); launch.compare is a checkout's name for the door
    ("stateless_opt.integrations.deepspeed", "deepspeed", "stateless_opt.integrations.deepspeed"),
    ("stateless_opt.integrations.hf", "hf", "stateless_opt.integrations.hf"),
    ("stateless_opt.launch.train", "launch", "stateless_opt.launch"),
    ("launch.compare", "launch", "stateless_opt.launch"),
]


def test_core_needs_no_extra_and_each_door_names_its_extra():
    """In one interpreter with every extra's modules blocked (as if not installed): SWAN steps a model;
    then each door's import fails with the pip command of its extra."""
    blocked = sorted({m for mods in EXTRAS.values() for m in mods} - {"numpy"})  # torch may use numpy
    proc = _python(f"""
        import importlib, sys
        for m in {blocked!r}:
            sys.modules[m] = None
        import torch
        from stateless_opt import SWAN, param_groups
        model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10))
        opt = SWAN(param_groups(model), lr=1e-3)
        model(torch.tensor([1, 2])).sum().backward()
        opt.step()
        print("core ok")
        for door in {[d for d, _, _ in DOORS]!r}:
            try:
                importlib.import_module(door)
                print("imported", door)
            except ImportError as err:
                print("ImportError:", err)
    """)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-3000:]
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ImportError", "imported"))]
    assert len(errors) == len(DOORS), proc.stdout
    for line, (door, extra, says) in zip(errors, DOORS):
        needed = ", ".join(m for m in EXTRAS[extra] if m in blocked)
        assert line == (f"ImportError: {says} needs the '{extra}' extra (not installed: {needed}): "
                        f"pip install 'stateless-opt[{extra}]'"), (door, line)


def test_console_scripts_work_from_any_directory(tmp_path):
    """Installed entry points (pyproject [project.scripts]); the shipped configs are found by name."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"stateless-opt-train", "stateless-opt-compare", "stateless-opt-data"}
    found = {name: shutil.which(name, path=str(Path(sys.executable).parent)) for name in scripts}
    assert all(found.values()), f"console scripts not installed next to {sys.executable}: {found}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for config in ("quickstart.yaml", "configs/quickstart.yaml"):
        out = subprocess.run([found["stateless-opt-train"], "--print-config", "-c", config, "--training.steps=7"],
                             cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and "steps: 7" in out.stdout, out.stderr[-2000:]
    out = subprocess.run([found["stateless-opt-compare"], "runs/nothing"], cwd=tmp_path, capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: runs/nothing: not a run folder"), out.stderr
    out = subprocess.run([found["stateless-opt-train"], "-c", "quickstart.yaml", "--resume", "latest",
                          "--training.steps=3"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "error: --resume latest: no complete checkpoint under runs/quickstart-swan" \
        in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
