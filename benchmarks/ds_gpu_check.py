"""GPU check of the DeepSpeed path: ZeRO-2 and ZeRO-3 with world size 1 on CUDA against the plain
single-process run of the same optimizer (same model, data and steps). Writes a JSON of max errors.

    python benchmarks/ds_gpu_check.py --out benchmarks/results/ds_gpu_check_<device>.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os

import torch

import stateless_opt.integrations.deepspeed  # noqa: F401  (registers the JSON types)
from stateless_opt import SGDSaI, SinkGD, SWAN

OPTIMIZERS = {
    "SWAN": (SWAN, dict(lr=1e-2, whitening="eigh")),
    "SWAN_default": (SWAN, dict(lr=1e-2)),
    "SinkGD": (SinkGD, dict(lr=1e-2)),
    "SGDSaI": (SGDSaI, dict(lr=1e-3, weight_decay=0.0)),
}


def model_factory(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(37, 61), torch.nn.GELU(), torch.nn.Linear(61, 29), torch.nn.GELU(), torch.nn.Linear(29, 7)
    )


def batches(device, steps: int = 4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 37, generator=g).to(device), torch.randn(16, 7, generator=g).to(device)) for _ in range(steps)]


def plain_run(cls, kw, device):
    model = model_factory().to(device)
    opt = cls(model.parameters(), **kw)
    for x, y in batches(device):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().double().cpu() for p in model.parameters()]


def ds_run(name, kw, stage, device):
    import deepspeed

    model = model_factory().to(device)
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": name.split("_")[0], "params": kw},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    for x, y in batches(device):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    if stage == 3:
        from deepspeed.runtime.zero import GatheredParameters

        with GatheredParameters(list(engine.module.parameters())):
            out = [p.detach().double().cpu().clone() for p in engine.module.parameters()]
    else:
        out = [p.detach().double().cpu() for p in engine.module.parameters()]
    engine.destroy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533").items():
        os.environ.setdefault(k, v)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    results = {}
    for name, (cls, kw) in OPTIMIZERS.items():
        ref = plain_run(cls, kw, device)
        for stage in (2, 3):
            got = ds_run(name, kw, stage, device)
            err = max(float((a - b).abs().max()) for a, b in zip(got, ref))
            scale = max(float(b.abs().max()) for b in ref)
            results[f"{name}/zero{stage}"] = {"max_abs_err": err, "max_abs_weight": scale}
            print(f"{name:>14} ZeRO-{stage}: max |W_ds - W_plain| = {err:.3e} (max |W| {scale:.2f})", flush=True)
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "world_size": 1,
        "steps": 4,
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
