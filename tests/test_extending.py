"""Adding an optimizer is one module plus one registry row (docs/extending.md): ``tests/colrms.py``
writes ColRMS (every column of each matrix gradient to RMS 1, no state) from the library's public
pieces, registers it, and it then runs, unchanged, through

* the single-process float64 reference (its own rule, ``colrms_update``), every matrix shape;
* FSDP2 at 2 gloo ranks, rows cut unevenly (13, 11, 5, 1 rows), against the single-process run;
* DeepSpeed ZeRO-2 at 2 gloo ranks built from the JSON ``"type": "ColRMS"`` (flat partitions cut
  mid-row), against the single-process run and the feed check;
* the HF Trainer factory and the memory report (``test_memory``'s catalogue test).

Nothing else in the library or the other tests names it. The distributed cases ride in the existing
spawns of test_fsdp2 (world 2) and test_deepspeed (ZeRO-2, world 2). Tolerances are those files'
rules for a well-conditioned rule (fp32 reduction order only): 1e-4 relative (FSDP2), 1e-5 absolute
and 1e-6 on the feed (ZeRO).
"""

from __future__ import annotations

import pytest
import torch

import colrms
import optim_db
import test_deepspeed as ds_tests
import test_fsdp2 as fsdp_tests
from test_reference import FP32_TOL, MATRIX_SHAPES, matrix_run_fp32


def case_zero2_json(ctx):
    """ZeRO-2 through the JSON door: ``"optimizer": {"type": "ColRMS", "params": {...}}``."""
    return ds_tests._run_equal(ctx, 2, "colrms", door="json")


fsdp_tests.CASES.add("fsdp_colrms", fsdp_tests.equivalence, (2,), opt="colrms")
ds_tests.REG[2].add("json_colrms", case_zero2_json, (2,))


@pytest.mark.parametrize("shape", list(MATRIX_SHAPES))
def test_single_process_equals_its_rule(shape):
    err = matrix_run_fp32(colrms.ColRMS, MATRIX_SHAPES[shape], colrms.colrms_update)
    assert err < FP32_TOL, err


def test_every_column_has_rms_one():
    w = torch.nn.Parameter(torch.zeros(10, 24))
    w.grad = torch.randn(10, 24) * torch.logspace(-3, 3, 24)
    colrms.ColRMS([w], lr=1.0).step()
    assert torch.allclose(w.detach().square().mean(dim=0).sqrt(), torch.ones(24), rtol=1e-5)


def test_fsdp2_two_ranks_uneven_rows():
    for r, res in enumerate(fsdp_tests.CASES.result("fsdp_colrms", 2)):
        assert res["err"]["init_equal"] and res["skipped"] == 0
        assert res["err"]["rel"] < fsdp_tests.REL_TOL["colrms"], (r, res["err"]["per_param"])
    assert [res["rows"]["l1.weight"] for res in fsdp_tests.CASES.result("fsdp_colrms", 2)] == [7, 6]


def test_zero2_json_type_mid_row_partitions():
    r = ds_tests._r0(2, 2, "json_colrms")
    assert r["base"] == "ColRMS" and r["wrapper"] == "DeepSpeedZeroOptimizer"
    ds_tests._check_equal(r, "colrms", 2)


def test_registry_finds_it_by_any_spelling():
    from stateless_opt import registry

    assert registry.lookup("ColRMS").cls is colrms.ColRMS and registry.lookup("col_rms").cls is colrms.ColRMS
    assert optim_db.info("colrms").cls is colrms.ColRMS


def test_hf_factory_builds_it():
    from stateless_opt.integrations import hf

    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 5))
    factory, kwargs = hf.stateless_optimizer("colrms", lr=1e-3)
    opt = factory()(model, **kwargs)
    assert type(opt) is colrms.ColRMS and [g["rule"] for g in opt.param_groups] == ["matrix", "fallback"]
