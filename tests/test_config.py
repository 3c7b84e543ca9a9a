"""Hyper-parameter validation: bad values fail at construction with a ValueError that names the
field (constructor arguments and per-group values alike); good JSON-style values are accepted."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from stateless_opt import SGDSaI, SGDSaIConfig, SinkGD, SinkGDConfig, SWAN, SWANConfig

ROOT = Path(__file__).resolve().parents[1]


def _ps():
    return [nn.Parameter(torch.zeros(4, 6)), nn.Parameter(torch.zeros(6))]


# (optimizer, field, bad value, what the message must mention besides the field)
BAD = [
    (SWAN, "lr", -1e-3, "greater than or equal to 0"),
    (SinkGD, "lr", -1.0, "greater than or equal to 0"),
    (SGDSaI, "lr", -0.1, "greater than or equal to 0"),
    (SWAN, "lr", "1e-3", "valid number"),  # strings are not coerced
    (SGDSaI, "lr", "1e-2", "valid number"),
    (SWAN, "lr", None, "valid number"),
    (SWAN, "lr", True, "valid number"),  # bools are not numbers here
    (SinkGD, "iterations", 0, "greater than or equal to 1"),
    (SinkGD, "iterations", 2.5, "valid integer"),
    (SinkGD, "iterations", "5", "valid integer"),
    (SWAN, "ns_steps", 0, "greater than or equal to 1"),
    (SWAN, "whitening", "svd", "newton_schulz"),
    (SWAN, "gradnorm_axis", "columns", "oriented"),
    (SWAN, "fallback", "sgd", "adamw"),
    (SinkGD, "fallback_lr_ratio", 0.0, "greater than 0"),
    (SWAN, "weight_decay", -0.1, "greater than or equal to 0"),
    (SWAN, "eps", 0.0, "greater than 0"),
    (SWAN, "adam_eps", -1e-8, "greater than 0"),
    (SinkGD, "chunk_mb", 0, "greater than 0"),
    (SWAN, "betas", (1.0, 0.999), "betas[0] must be in [0, 1)"),
    (SinkGD, "betas", (0.9, -0.1), "betas[1] must be in [0, 1)"),
    (SWAN, "betas", [0.9, 1.5], "betas[1] must be in [0, 1)"),
    (SWAN, "betas", (0.9,), "betas"),
    (SGDSaI, "momentum", 1.0, "less than 1"),
    (SGDSaI, "momentum", -0.5, "greater than or equal to 0"),
    (SGDSaI, "eps", 0.0, "greater than 0"),
    (SGDSaI, "weight_decay", -1e-2, "greater than or equal to 0"),
    (SGDSaI, "max_normalized_gsnr", "yes", "valid boolean"),
    (SGDSaI, "fallback", "stateless", "sgdsai"),
    (SGDSaI, "fallback_lr_ratio", 0.0, "greater than 0"),
    (SGDSaI, "betas", (0.9, 1.0), "betas[1] must be in [0, 1)"),
    (SWAN, "stochastic_rounding", 1, "valid boolean"),
]


def _named(msg: str, field: str) -> bool:
    return re.search(rf"(^|[\s;:]){re.escape(field)}(\.\d+)?:", msg) is not None


@pytest.mark.parametrize("cls,field,value,hint", BAD, ids=[f"{c.__name__}-{f}-{v!r}" for c, f, v, _ in BAD])
def test_bad_argument_raises_naming_field(cls, field, value, hint):
    with pytest.raises(ValueError) as err:
        cls(_ps(), **{field: value})
    msg = str(err.value)
    assert _named(msg, field), msg
    assert hint in msg, msg
    assert f"{cls.__name__} arguments" in msg


@pytest.mark.parametrize("cls,field,value,hint", BAD[:12], ids=[f"{c.__name__}-{f}" for c, f, _, _ in BAD[:12]])
def test_bad_group_value_raises_naming_field_and_group(cls, field, value, hint):
    good = {"params": _ps()[:1]}
    with pytest.raises(ValueError) as err:
        cls([good, {"params": _ps()[1:], field: value}])
    msg = str(err.value)
    assert _named(msg, field) and hint in msg and "param group 1" in msg, msg


@pytest.mark.parametrize("cls,key", [
    (SWAN, "iterations"),  # SinkGD's, not SWAN's
    (SinkGD, "ns_steps"),
    (SGDSaI, "iterations"),
    (SGDSaI, "whitening"),
    (SWAN, "momentum"),
    (SWAN, "learning_rate"),
])
def test_unknown_key_raises(cls, key):
    with pytest.raises(ValueError, match=rf"{key}: Extra inputs are not permitted"):
        cls(_ps(), **{key: 1})
    with pytest.raises(ValueError, match=rf"param group 0: {key}: Extra inputs are not permitted"):
        cls([{"params": _ps(), key: 1}])


def test_several_bad_fields_are_all_named():
    with pytest.raises(ValueError) as err:
        SinkGD(_ps(), lr=-1.0, iterations=0, bogus=3)
    msg = str(err.value)
    assert all(_named(msg, f) for f in ("lr", "iterations", "bogus")), msg


@pytest.mark.parametrize("cls", [SWAN, SinkGD])
def test_rule_matrix_on_1d_raises(cls):
    vec = nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=r"rule='matrix' needs tensors with >= 2 dims, got shape \(5,\)"):
        cls([{"params": [vec], "rule": "matrix"}])
    with pytest.raises(ValueError, match="rule='matrix'"):
        cls([{"params": [nn.Parameter(torch.zeros(()))], "rule": "matrix"}])
    with pytest.raises(ValueError, match="rule must be 'auto', 'matrix' or 'fallback'"):
        cls([{"params": [vec], "rule": "adam"}])
    with pytest.raises(ValueError, match="batch_dims must be a non-negative int"):
        cls([{"params": [vec], "batch_dims": -1}])
    with pytest.raises(ValueError, match="batch_dims must be a non-negative int"):
        cls([{"params": [vec], "batch_dims": "1"}])
    # fallback on a matrix is allowed (embeddings, LM head)
    assert cls([{"params": [nn.Parameter(torch.zeros(3, 4))], "rule": "fallback"}]).param_groups[0]["rule"] == "fallback"


def test_json_style_values_are_accepted():
    # JSON writes `0` for a float and lists for tuples: ints become floats, lists become tuples.
    opt = SWAN(_ps(), lr=1, weight_decay=0, betas=[0.9, 0.95], fallback_lr_ratio=10)
    d = opt.defaults
    assert d["lr"] == 1.0 and type(d["lr"]) is float and type(d["weight_decay"]) is float
    assert d["betas"] == (0.9, 0.95)
    assert SinkGD(_ps(), iterations=3).defaults["iterations"] == 3
    assert SGDSaI(_ps(), lr=0, momentum=0).defaults["momentum"] == 0.0


def test_defaults_come_from_the_config_models():
    for cls, cfg in ((SWAN, SWANConfig), (SinkGD, SinkGDConfig), (SGDSaI, SGDSaIConfig)):
        defaults = cls(_ps()).defaults
        for name, field in cfg.model_fields.items():
            assert defaults[name] == field.default, (cls.__name__, name)
    assert SGDSaI(_ps()).defaults["lr"] == 1e-2 and SWAN(_ps()).defaults["lr"] == 1e-3
    assert SinkGDConfig().iterations == 5 and SWANConfig().fallback == "adamw"


def test_config_models_reject_bad_values_directly():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SWANConfig(lr=-1.0)
    with pytest.raises(ValidationError):
        SinkGDConfig(iterations=0)
    with pytest.raises(ValidationError):
        SGDSaIConfig(unknown=1)


def test_group_bookkeeping_keys_are_allowed():
    # names / step / skipped_steps travel in param groups (param_groups(), state_dict()) and are
    # not hyper-parameters; "names" (the older key) becomes torch's "param_names"
    ps = _ps()
    opt = SWAN([{"params": ps, "names": ["w", "b"], "step": 0, "skipped_steps": 0}])
    assert sorted(n for g in opt.param_groups for n in g["param_names"]) == ["b", "w"]


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", ["swan", "sinkgd", "sgdsai"])
def test_non_finite_floats_are_refused_where_configs_enter(name, value):
    # the DeepSpeed JSON door and the launch YAML / CLI refuse inf / NaN naming the field (they made
    # every weight non-finite at the first step); the constructor, add_param_group and values written
    # between steps: test_torch_contract.test_errors
    pytest.importorskip("deepspeed")
    import stateless_opt.integrations.deepspeed as sds
    from launch.config import ConfigError, load_config

    cls = sds.lookup(name)
    floats = [k for k, f in cls.config_cls.model_fields.items() if f.annotation is float]
    for field in floats:
        with pytest.raises(ValueError, match=rf'"params".*{field}: Input should be a finite number'):
            sds.json_params(cls, {"lr": 1e-3, field: value}, name)
    with pytest.raises(ConfigError, match=rf"optimizer\.{name}\.lr: Input should be a finite number"):
        load_config(ROOT / "configs" / "quickstart.yaml", {f"optimizer.{name}.lr": value})
    with pytest.raises(ConfigError, match=r"model\.init_std: Input should be (a finite number|greater than 0)"):
        load_config(ROOT / "configs" / "quickstart.yaml", {"model.init_std": value})
