"""``assign_owners``: which rank whitens which matrix (SWAN), balanced by FLOPs and deterministic.

Every rank computes the assignment on its own, without communicating, so it must be a pure function
of the costs: the same on every call, for any sequence object holding the same costs, and in any
process (hash seeds must not matter). Load is checked on the matrices of a 1.3B LLaMA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stateless_opt.owner_compute import assign_owners, load_balance
from stateless_opt.swan import whitening_flops

NS_STEPS = 12  # SWANConfig's default


def llama_1b3_shapes() -> list[tuple[int, int]]:
    """24 layers, hidden 2048, intermediate 5461: q, k, v, o 2048x2048; gate, up 5461x2048; down
    2048x5461 (out x in, as nn.Linear stores them)."""
    shapes = []
    for _ in range(24):
        shapes += [(2048, 2048)] * 4 + [(5461, 2048), (5461, 2048), (2048, 5461)]
    return shapes


def costs() -> list[float]:
    return [whitening_flops(m, n, NS_STEPS) for m, n in llama_1b3_shapes()]


def test_cost_model_orders_shapes():
    # An MLP matrix (2048 x 5461, either orientation) costs more than an attention one, and the cost
    # only depends on the sides, not on which one is stored first.
    assert whitening_flops(5461, 2048, NS_STEPS) == whitening_flops(2048, 5461, NS_STEPS)
    assert whitening_flops(5461, 2048, NS_STEPS) > whitening_flops(2048, 2048, NS_STEPS)


@pytest.mark.parametrize("world", range(2, 9))
def test_llama_1b3_balanced(world):
    c = costs()
    owners = assign_owners(c, world)
    assert len(owners) == len(c) == 24 * 7
    assert set(owners) == set(range(world))  # every rank whitens something, nothing outside the group
    loads = [sum(x for x, o in zip(c, owners) if o == r) for r in range(world)]
    balance = max(loads) / (sum(loads) / world)
    assert balance == pytest.approx(load_balance(c, owners, world))
    assert balance <= 1.1, (world, balance)


@pytest.mark.parametrize("world", range(2, 9))
def test_deterministic_and_independent_of_the_sequence_object(world):
    c = costs()
    first = assign_owners(c, world)
    assert assign_owners(c, world) == first  # same result twice
    assert assign_owners(list(c), world) == first  # a new list object
    assert assign_owners(tuple(c), world) == first  # another sequence type
    assert assign_owners([float(x) for x in c], world) == first  # equal values, new float objects
    assert c == costs()  # the input was not mutated (e.g. sorted in place)


def test_deterministic_across_processes():
    """Two fresh interpreters with different hash seeds give the same owners (every rank computes
    them on its own). ``owner_compute.py`` is loaded by path: its owner assignment needs no torch, so this stays fast."""
    import stateless_opt.owner_compute as mod

    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('owners', {mod.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "c = json.loads(sys.stdin.read())\n"
        "print(json.dumps({w: m.assign_owners(c, w) for w in range(2, 9)}))\n"
    )
    outs = []
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(costs()), capture_output=True,
                              text=True, env=env, timeout=60, check=True)
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1]
    assert outs[0] == {str(w): assign_owners(costs(), w) for w in range(2, 9)}


def test_ties_go_to_the_lowest_rank_and_world_one():
    assert assign_owners([1.0, 1.0, 1.0], 2) == [0, 1, 0]
    assert assign_owners([3.0, 1.0], 1) == [0, 0]
    assert assign_owners([], 4) == []
    with pytest.raises(ValueError):
        assign_owners([1.0], 0)
