"""Validated hyper-parameters of the three optimizers.

One pydantic model per optimizer is the single source of truth for names, defaults and bounds: the
constructors, the DeepSpeed JSON ``"params"`` block and the training configs all validate through
these models, so a bad value fails early and names the field the same way everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .polar import PE_LOWER


class _Strict(BaseModel):
    """Unknown keys are errors; ints are accepted where floats are expected, strings are not."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _int_to_float(cls, value: Any, info) -> Any:
        # JSON users write `"weight_decay": 0`; strict mode would reject an int for a float field.
        field = cls.model_fields[info.field_name]
        if field.annotation is float and type(value) is int:
            return float(value)
        return value


class _MatrixRuleConfig(_Strict):
    """Shared by SWAN and SinkGD: the matrix rule plus the fallback for embeddings, head, 1-D."""

    lr: float = Field(1e-3, ge=0.0, description="learning rate of the matrix rule")
    weight_decay: float = Field(0.0, ge=0.0, description="decoupled weight decay (W <- (1 - lr*wd) W)")
    eps: float = Field(1e-8, gt=0.0, description="guards divisions by row/column norms or std")
    fallback: Literal["adamw", "stateless"] = Field(
        "adamw",
        description="rule for embeddings, LM head and 0-/1-D tensors: AdamW (the papers' setup) or a "
        "stateless row-wise RMS-normalised SGD (zero optimizer state end to end)",
    )
    fallback_lr_ratio: float = Field(
        20.0,
        gt=0.0,
        description="fallback LR = lr * ratio; the papers use a matrix LR of about 0.05 x the Adam LR",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW fallback betas")
    adam_eps: float = Field(1e-8, gt=0.0, description="AdamW fallback epsilon")
    chunk_mb: float = Field(
        256.0, gt=0.0, description="upper bound on the fp32 temporaries of one batched chunk (MiB)"
    )
    stochastic_rounding: bool = Field(
        True, description="round low-precision (bf16/fp16) weights stochastically so small updates survive"
    )

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


class SWANConfig(_MatrixRuleConfig):
    """SWAN (arXiv 2412.13148): GradNorm then GradWhitening, no state."""

    whitening: Literal["polar_express", "newton_schulz", "eigh"] = Field(
        "polar_express",
        description="how the polar factor (G G^T)^-1/2 G is computed: a Polar Express schedule of optimal "
        "odd quintics (default), coupled Newton-Schulz on the Gram matrix (stateless_opt 0.1), or an exact "
        "fp64 eigh",
    )
    ns_steps: int | None = Field(
        None,
        ge=1,
        le=100,
        description="iterations of the chosen whitening method (ignored by eigh); None: the method's default "
        "(polar_express: 5 with bf16 matmuls, 7 with fp32; newton_schulz: 12)",
    )
    whitening_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="matmul precision of polar_express: bfloat16 operands/results with fp32 accumulation "
        "(statistics and output fp32) or float32; auto = bfloat16 on CUDA, float32 elsewhere. "
        "newton_schulz and eigh always run in fp32/fp64",
    )
    pe_lower_bound: float = Field(
        PE_LOWER,
        ge=1e-7,
        le=0.5,
        description="polar_express: smallest singular value, relative to the spectral upper bound, that the "
        "schedule is designed to converge (smaller: more robust to ill-conditioning, slower convergence)",
    )
    gradnorm_axis: Literal["oriented", "stored_rows"] = Field(
        "oriented",
        description="GradNorm standardises the rows of the oriented matrix (m <= n, the paper's setting) "
        "or the rows as stored",
    )
    chunk_mb: float = Field(512.0, gt=0.0, description="per-rank bound on gathered matrices of one chunk (MiB)")
    whiten_batch_mb: float = Field(
        1024.0,
        gt=0.0,
        description="bound on the temporaries of one batched whitening call (MiB, estimated as for fp32 "
        "Newton-Schulz): larger batches run the bf16 matmuls more efficiently at the cost of that much more "
        "peak memory (1.3B on an H100: 128 -> 208 ms a step, 1024 -> 158 ms and +0.28 GiB, 4096 -> 148 ms "
        "and +1.0 GiB)",
    )

    @model_validator(mode="after")
    def _bf16_needs_polar_express(self) -> "SWANConfig":
        if self.whitening_dtype == "bfloat16" and self.whitening != "polar_express":
            raise ValueError(f"whitening_dtype='bfloat16' needs whitening='polar_express', got {self.whitening!r}")
        return self


class SinkGDConfig(_MatrixRuleConfig):
    """SinkGD (arXiv 2502.06742): alternating row/column l2 normalisation, no state."""

    chunk_mb: float = Field(
        1024.0, gt=0.0,
        description="upper bound on the temporaries of one batched chunk (MiB, counted as fp32): fewer, "
        "larger chunks issue fewer launches (1.3B on an H100: 256 -> 88 ms a step, 1024 -> 41 ms, +0.02 GiB)",
    )

    iterations: int = Field(5, ge=1, le=100, description="row/column normalisation rounds (L)")
    stats_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="dtype of the squared gradients the rounds read: auto = bfloat16 on CUDA (half the "
        "traffic, ~1e-4 relative on the norms; sums stay fp32), float32 elsewhere",
    )
    fused: bool = Field(
        True,
        description="write r*G*c into fp32 weights with a fused Triton kernel on CUDA (one launch a chunk, "
        "where Triton imports); False: the tensor-op path",
    )


class SGDSaIConfig(_Strict):
    """SGD-SaI (arXiv 2412.11768): momentum SGD with each tensor's LR scaled once by its g-SNR."""

    lr: float = Field(1e-2, ge=0.0, description="learning rate (the official default is a ViT setting)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA coefficient of the momentum buffer")
    eps: float = Field(1e-8, gt=0.0, description="added to std(g) in g-SNR = ||g|| / (std(g) + eps)")
    weight_decay: float = Field(1e-2, ge=0.0, description="decoupled weight decay, not scaled by g-SNR")
    max_normalized_gsnr: bool = Field(
        False, description="the paper's Alg. 1 variant: divide every g-SNR by the max over all tensors"
    )
    fused: bool = Field(
        True,
        description="fp32 weights: fused kernels (on CUDA one Triton launch for all weights, decay "
        "included; elsewhere torch's fused SGD kernel per weight plus a decay pass); False: the tensor-op path",
    )
    stochastic_rounding: bool = Field(
        True, description="round low-precision (bf16/fp16) weights stochastically so small updates survive"
    )


CONFIGS: dict[str, type[_Strict]] = {"swan": SWANConfig, "sinkgd": SinkGDConfig, "sgdsai": SGDSaIConfig}

# Keys a param group may carry besides hyper-parameters.
GROUP_KEYS = {"params", "rule", "batch_dims", "names", "step", "skipped_steps"}


def validate(config_cls: type[_Strict], values: dict[str, Any], where: str) -> _Strict:
    """Validate ``values`` and re-raise with a message that names each offending field and ``where``."""
    try:
        return config_cls(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ValueError(f"invalid {where}: {problems}") from None


def validate_group(config_cls: type[_Strict], group: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate a param group's hyper-parameters (keys of ``config_cls``); other keys must be known."""
    hyper = {k: v for k, v in group.items() if k not in GROUP_KEYS and not k.startswith("_")}
    validate(config_cls, hyper, where)
    return group
