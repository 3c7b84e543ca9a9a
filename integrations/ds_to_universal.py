"""DeepSpeed universal checkpoints for stateless_opt's optimizers: our ``ds_to_universal``, same flags.

DeepSpeed's converter (``deepspeed/checkpoint/ds_to_universal.py``) assumes Adam: it reads ``exp_avg``
and ``exp_avg_sq`` from every param group's state (``KeyError`` on SWAN/SinkGD's stateless matrix group,
``KeyError: 0`` under ZeRO-3) and per-weight state such as SGD-SaI's g-SNR scales has no place in its
per-parameter files. Its loader also maps partitions through ``_hp_mapping``, which DeepSpeed 0.19 gets
wrong with ``round_robin_gradients``. So, behind the same flags::

    python -m stateless_opt.integrations.ds_to_universal --input_folder ckpt/global_step4 \\
        --output_folder ckpt/global_step4_universal
    # then, at any world size or ZeRO stage: "checkpoint": {"load_universal": true} in the DeepSpeed
    # config and engine.load_checkpoint("ckpt") (the converter wrote ckpt/latest_universal), or
    # engine.load_checkpoint("ckpt", tag="global_step4_universal")

How: when an engine with one of our optimizers saves a ZeRO checkpoint, every rank also records which
piece of which weight (by name) its saved partition holds, and where in its ``*optim_states.pt`` the
fp32 master and each state tensor sit (``stateless_opt_layout.json``, written by rank 0 from every
rank's extents). The converter cuts DeepSpeed's saved partitions along those extents into a portable
checkpoint (``stateless_opt.checkpoint``: safetensors + JSON) and copies the model-states files; with
``load_universal`` the engine loads that portable checkpoint through the layouts of the new run. The
DeepSpeed files are read with ``torch.load(weights_only=True)`` and only DeepSpeed's own bookkeeping
classes allowed (any other pickled object refuses the conversion).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from stateless_opt import checkpoint as ck

LAYOUT_INDEX = "stateless_opt_layout.json"
GROUP_FILE = "stateless_opt_groups.safetensors"
PORTABLE_DIR = "stateless_opt"  # inside a universal checkpoint folder
# The classes DeepSpeed 0.19 pickles into its optimizer files, besides tensors and builtins.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


# ------------------------------------------------------------------------------------ at save time
def write_layout_index(engine, save_dir, tag: str) -> None:
    """Every rank: the extents of each weight its saved partition holds, and where its master and state
    sit in this rank's ``*optim_states.pt``; rank 0 writes ``<save_dir>/<tag>/stateless_opt_layout.json``."""
    from .deepspeed import layout_of

    layout = layout_of(engine)
    module, opt = ck._resolve(engine, None)
    held = ck._described(module, opt)
    p = ck.plan(opt, held)
    rank, _ = ck._rank_world()
    folder = Path(save_dir) / tag
    ds_file = os.path.basename(engine._get_zero_ckpt_name(str(save_dir), tag))
    part = ck.part_of(p, held, ck.rank_file(rank))
    for (_, piece), e in zip(part["pieces"], p.entries):
        weight_path, state_path = layout.saved_paths(e.unit)  # held[k] is the layout's k-th stepped tensor
        path = weight_path if e.source[0] == "weight" else state_path + [e.source[1]]
        piece["src"] = {"file": ds_file, "path": path, "offset": e.offset}
    groups, group_tensors = ck.groups_json(opt)
    if rank == 0 and group_tensors:
        ck.write_rank_file(folder, GROUP_FILE, group_tensors)
    ck.write_gathered(folder, LAYOUT_INDEX, opt, part, groups, GROUP_FILE if group_tensors else None)


# ------------------------------------------------------------------------------------ the converter
def safe_load(path: str | os.PathLike):
    """``torch.load(weights_only=True)`` of a DeepSpeed file, allowing DeepSpeed's bookkeeping classes
    only: a checkpoint carrying any other pickled object is refused, never executed."""
    import importlib

    allowed = {}
    for spec in DEEPSPEED_GLOBALS:
        module, name = spec.split(":")
        try:
            allowed[f"{module}.{name}"] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # pragma: no cover - another DeepSpeed version
            pass
    unknown = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]
    if unknown:
        raise ck.CheckpointError(f"{path} carries pickled objects of {unknown}, which are not DeepSpeed checkpoint "
                                 "data: refusing to load it (loading would run their code)")
    with torch.serialization.safe_globals(list(allowed.values())):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def _at(tree, path: list):
    for k in path:
        tree = tree[k]
    return tree


def convert(input_folder: str | os.PathLike, output_folder: str | os.PathLike) -> Path:
    """A DeepSpeed ZeRO checkpoint of one of our optimizers (``<save_dir>/<tag>``) -> a universal one
    (``output_folder``) that ``"load_universal": true`` loads at any world size and stage."""
    src, out = Path(input_folder), Path(output_folder)
    if not (src / LAYOUT_INDEX).exists():
        raise ck.CheckpointError(
            f"{src} has no {LAYOUT_INDEX}: it was not saved by a DeepSpeed engine running a stateless_opt optimizer "
            "with stateless_opt.integrations.deepspeed imported (for Adam and other DeepSpeed optimizers use "
            "DeepSpeed's own ds_to_universal)"
        )
    index = json.loads((src / LAYOUT_INDEX).read_text())  # a portable index whose pieces point into DeepSpeed's files
    portable = out / PORTABLE_DIR
    portable.mkdir(parents=True, exist_ok=True)
    (portable / ck.INDEX).unlink(missing_ok=True)
    by_rank: dict[str, list[tuple[str, dict]]] = {}
    for name, t in index["tensors"].items():
        for piece in t["pieces"]:
            by_rank.setdefault(piece["file"], []).append((name, piece))
    for file, pieces in sorted(by_rank.items()):
        saved: dict = {}  # one rank's DeepSpeed file at a time
        data = {}
        for name, piece in pieces:
            ds_file = piece["src"]["file"]
            if ds_file not in saved:
                saved = {ds_file: safe_load(src / ds_file)}
            value = _at(saved[ds_file], piece["src"]["path"])
            value = value if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
            flat, offset = value.reshape(-1), piece["src"]["offset"]
            if "rows" in piece:
                r = piece["rows"][1] - piece["rows"][0]
                c = piece["cols"][1] - piece["cols"][0]
                data[piece["key"]] = flat[offset : offset + r * c].reshape(r, c).clone()
            else:
                data[piece["key"]] = (flat[offset] if offset >= 0 else value.reshape(())).clone()
        ck.write_rank_file(portable, file, data)
    if index.get("group_file"):
        shutil.copy2(src / index["group_file"], portable / index["group_file"])
    for t in index["tensors"].values():
        for piece in t["pieces"]:
            piece.pop("src")
    _copy_model_states(src, out)
    ck.write_index(portable, index)
    (out.parent / "latest_universal").write_text(out.name)
    return out


def _copy_model_states(src: Path, out: Path) -> None:
    """DeepSpeed's engine state (steps, LR scheduler, client state) for the new run, under the names both
    a ZeRO-1/2 engine (``mp_rank_00_model_states.pt``) and a ZeRO-3 one (``zero_pp_rank_0_...``) look
    for when loading a universal checkpoint, so the stage may change. The module weights they hold are
    not read (the portable checkpoint has them)."""
    files = sorted(glob.glob(str(src / "*model_states.pt")))
    if not files:
        raise ck.CheckpointError(f"{src}: no *model_states.pt (not a DeepSpeed checkpoint folder)")
    for f in files:
        shutil.copy2(f, out / os.path.basename(f))
    for mp in sorted({f.rsplit("mp_rank_", 1)[1][:2] for f in files}):
        first = next(f for f in files if f.endswith(f"mp_rank_{mp}_model_states.pt"))
        for alias in (f"mp_rank_{mp}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp}_model_states.pt"):
            if not (out / alias).exists():
                shutil.copy2(first, out / alias)


def load_universal(engine_ref, checkpoint_folder, load_optimizer_states=True, load_from_fp32_weights=True) -> None:
    """``"load_universal": true``: the ZeRO wrapper's ``_load_universal_checkpoint``, replaced by
    ``stateless_opt.integrations.deepspeed.attach`` for our optimizers."""
    engine = engine_ref()
    folder = Path(checkpoint_folder) / PORTABLE_DIR
    if not (folder / ck.INDEX).exists():
        raise ck.CheckpointError(
            f"{checkpoint_folder} is not a universal checkpoint of a stateless_opt optimizer (no {PORTABLE_DIR}/"
            f"{ck.INDEX}); DeepSpeed's own ds_to_universal assumes Adam's state. Convert the ZeRO checkpoint with "
            "`python -m stateless_opt.integrations.ds_to_universal --input_folder <save_dir>/<tag> --output_folder "
            "<save_dir>/<tag>_universal`"
        )
    ck.load_portable(engine, None, folder, optimizer_state=load_optimizer_states)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_folder", required=True, help="DeepSpeed checkpoint folder (<save_dir>/<tag>)")
    parser.add_argument("--output_folder", required=True, help="universal checkpoint folder to write")
    # DeepSpeed's converter's other flags, accepted so the same command line works (nothing to tune here)
    parser.add_argument("--num_extract_workers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--num_merge_workers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--keep_temp_folder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no_strict", dest="strict", action="store_false", help=argparse.SUPPRESS)
    parser.add_argument("--inject_missing_state", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = convert(args.input_folder, args.output_folder)
    print(f"stateless_opt: universal checkpoint written to {out} (load with \"load_universal\": true)", file=sys.stderr)


if __name__ == "__main__":
    main()
