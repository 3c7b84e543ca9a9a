"""Validated hyper-parameters: the base every optimizer's pydantic model derives from.

Each optimizer's model (``SWANConfig`` in swan.py, ...) is the single source of truth for its names,
defaults and bounds: the constructor, ``add_param_group``, the DeepSpeed JSON ``"params"`` block and
the training configs all validate through it (found by name in ``registry.py``), so a bad value fails
early and names the field the same way everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class OptimizerConfig(BaseModel):
    """Unknown keys are errors; ints are accepted where floats are expected, strings are not; every float
    must be finite (an lr, weight decay or eps of inf/NaN would make every weight non-finite at the first
    step, so it is refused where it enters)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    capturable: bool | None = Field(
        None,
        description="where a step's decisions are made: True - on the device (NaN/Inf skip, zero-gradient masks, "
        "counters, scales, LR read from device scalars): no host sync, no host-device copy, so the step can be "
        "captured in a CUDA graph (stateless_opt.CUDAGraphOptimizer); False - on the host after one sync (work "
        "skipped for zero-gradient weights); None - on the device on accelerators, on the host on the CPU",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _int_to_float(cls, value: Any, info) -> Any:
        # JSON users write `"weight_decay": 0`; strict mode would reject an int for a float field.
        field = cls.model_fields[info.field_name]
        if field.annotation is float and type(value) is int:
            return float(value)
        return value


class AdamWFallbackConfig(OptimizerConfig):
    """The AdamW fallback's own settings: SWAN and SinkGD's fallback, SGD-SaI's opt-in one."""

    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW fallback betas")
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW fallback epsilon")

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_list(cls, value: Any) -> Any:
        return tuple(float(v) if type(v) is int else v for v in value) if isinstance(value, list) else value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        for i, beta in enumerate(value):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        return value


class MatrixRuleConfig(AdamWFallbackConfig):
    """Shared by SWAN and SinkGD: the matrix rule plus the fallback for embeddings, head, 1-D."""

    lr: float = Field(1e-3, ge=0.0, description="learning rate of the matrix rule")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay (W <- (1 - lr*wd) W)")
    eps: float = Field(1e-8, gt=0.0, description="guards divisions by row/column norms or std")
    fallback: Literal["adamw", "stateless", "rowclip"] = Field(
        "adamw",
        description="rule for embeddings, LM head and 0-/1-D tensors: AdamW (the papers' setup), a "
        "stateless row-wise RMS-normalised SGD, or 'rowclip': the same with each row's norm floored at the "
        "tensor's RMS row norm (rows above it to RMS 1, the others kept relative to it); the last two keep "
        "zero optimizer state end to end",
    )
    fallback_lr_ratio: float = Field(
        20.0,
        gt=0.0,
        description="fallback LR = lr * ratio; the papers use a matrix LR of about 0.05 x the Adam LR",
    )
    chunk_mb: float = Field(
        256.0, gt=0.0, description="upper bound on the fp32 temporaries of one batched chunk (MiB)"
    )
    stochastic_rounding: bool = Field(
        True, description="round low-precision (bf16/fp16) weights stochastically so small updates survive"
    )


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


# Keys a param group may carry besides hyper-parameters.
# ``replicate_group``: the process group (by name, see collectives.group_ref) over which the group's
# gradients are identical (DDP), set by ``param_groups(ddp_model)`` or the ``replicate_group=`` argument.
# ``param_names``: torch's key for the names of ``params`` (``named_parameters()``); ``names`` is the
# older spelling, accepted and renamed.
GROUP_KEYS = {"params", "rule", "batch_dims", "param_names", "names", "step", "skipped_steps", "replicate_group"}

# Keys other libraries write into param groups, accepted and left alone: torch's LR schedulers
# (``initial_lr`` and OneCycleLR / CyclicLR's ``max_lr``, ``min_lr``, ``base_lr``, ``max_momentum``,
# ``base_momentum``), timm (``lr_scale``, ``group_name``) and Lightning's LR monitor (``name``). Any
# other unknown key is refused at construction (a typo such as ``weight_decy`` would otherwise be ignored).
EXTERNAL_GROUP_KEYS = {"initial_lr", "max_lr", "min_lr", "base_lr", "max_momentum", "base_momentum", "lr_scale",
                       "group_name", "name"}


def validate(config_cls: type[OptimizerConfig], values: dict[str, Any], where: str) -> OptimizerConfig:
    """Validate ``values`` and re-raise with a message that names each offending field and ``where``.
    ``lr`` may be a one-element tensor (as in torch.optim, for a captured step that a scheduler fills in
    place): its value is validated; the tensor itself stays in the param group."""
    lr = values.get("lr")
    if _is_tensor(lr):
        if lr.numel() != 1 or not lr.dtype.is_floating_point:
            raise ValueError(f"invalid {where}: lr: Input should be a valid number or a one-element floating-point "
                             f"tensor, got shape {tuple(lr.shape)} and dtype {lr.dtype}")
        values = {**values, "lr": float(lr.detach().reshape(()))}
    try:
        return config_cls(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ValueError(f"invalid {where}: {problems}") from None


def validate_group(config_cls: type[OptimizerConfig], group: dict[str, Any], where: str, *,
                   unknown_keys: bool = False) -> dict[str, Any]:
    """Validate a param group's hyper-parameters (keys of ``config_cls``) and write the validated values
    back into ``group`` (a JSON int becomes a float; a tensor ``lr`` stays the tensor, see ``validate``). ``unknown_keys=False``
    (a group entering the optimizer): any other key must be one of ``GROUP_KEYS`` / ``EXTERNAL_GROUP_KEYS``;
    ``True`` (a group already in it, re-checked before a step): keys a scheduler added are left alone."""
    if unknown_keys:
        hyper = {k: group[k] for k in config_cls.model_fields if k in group}
    else:
        hyper = {k: v for k, v in group.items()
                 if k not in GROUP_KEYS and k not in EXTERNAL_GROUP_KEYS and not k.startswith("_")}
    config = validate(config_cls, hyper, where)
    group.update({k: getattr(config, k) for k in hyper if not (k == "lr" and _is_tensor(hyper[k]))})
    return group
