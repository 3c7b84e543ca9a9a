"""Fallback rules for the tensors SWAN and SinkGD do not touch (embeddings, LM head, norms, biases).

* ``adamw``: the papers' setup, computed by ``torch.optim.adamw.adamw`` (torch's own math) with the
  moments in ``optimizer.state`` like ``torch.optim.AdamW``. Elementwise, so it runs on each weight's
  local piece (a plain tensor, a DTensor shard, a weight's range of a ZeRO flat partition).
* ``stateless``: RMS-normalised SGD, zero state: each row of a 2-D+ weight (a token's embedding, a
  vocabulary row of the head) scaled to RMS 1, a 0-/1-D tensor scaled to RMS 1 as a whole. It is the
  row half of SinkGD, so it reuses the same fragment machinery and works on any layout.
* ``rowclip``: the same, but each row's norm is floored at the tensor's RMS row norm instead of at
  eps times it: rows with above-average gradients go to RMS 1, the others keep their size relative to
  the tensor (g_row / max(rms(g_row), rms(g))). Rarely-seen embedding / LM-head rows are not blown up
  to full steps. Zero state; not from a paper (a candidate measured in benchmarks/convergence.py).
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw

from .layouts import batch_runs, local_views, split_matrices
from .row_col_norms import chunks, normalize_rows_cols


def adamw_state(state: dict, t: torch.Tensor, step_device: torch.device | None = None) -> None:
    """torch.optim.AdamW's state layout, with fp32 moments also for low-precision weights (and fp64 ones
    for fp64 weights), contiguous (the step reads them as flat pieces, like the weights); the step
    counter on the host, or on ``step_device`` (device-decided steps: torch's fused/capturable layout)."""
    if not state:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
        state["exp_avg"] = torch.zeros_like(t, dtype=dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(t, dtype=dtype, memory_format=torch.contiguous_format)


def _flat_state(t: torch.Tensor, shard) -> torch.Tensor:
    """The piece of a state tensor (shaped like the unit) that holds ``shard``'s weight."""
    return local_views(t)[0].reshape(-1)[shard.offset : shard.offset + shard.grad.numel()]


def adamw_fallback(opt, group: dict, units: list[tuple[torch.Tensor, list]], lr, masks=None) -> None:
    """torch's AdamW on the weight pieces of ``units`` ((tensor, shards) pairs): the moments are the same
    pieces of the tensor's state, its step counter advances once a step. Host-decided steps:
    ``torch.optim.adamw.adamw`` on the live pieces. Device-decided steps (``masks``): torch's fused AdamW
    kernel per piece, with its ``found_inf`` set where the piece must stay untouched (a NaN/Inf step, a
    zero gradient: no update, no decay, moments unchanged), the counter advanced where any piece steps,
    and the LR a device scalar."""
    params, grads, exp_avgs, exp_avg_sqs, steps, low, keys, counters = [], [], [], [], [], [], [], []
    for t, shards in units:
        state = opt.state[t]
        adamw_state(state, t)
        if masks is not None and shards and state["step"].device != shards[0].param.device:
            state["step"] = state["step"].to(shards[0].param.device, torch.float32)  # a host-decided run's checkpoint
        for k, s in enumerate(shards):
            param, grad = s.param, s.grad
            if param.dtype not in (torch.float32, torch.float64):  # low precision: torch's math in fp32
                low.append((param, len(params)))
                param, grad = param.float(), grad.float()
            params.append(param)
            grads.append(grad)
            exp_avgs.append(_flat_state(state["exp_avg"], s))
            exp_avg_sqs.append(_flat_state(state["exp_avg_sq"], s))
            # adamw advances each counter it gets: the first piece takes the tensor's, others a copy (the
            # fused kernel only reads it: every piece reads the tensor's, advanced once below)
            steps.append(state["step"] if k == 0 or masks is not None else state["step"].clone())
            keys.append(s.key)
        if masks is not None and shards:
            counters.append((state["step"], masks.any_of([s.key for s in shards])))
    beta1, beta2 = group["betas"]
    if masks is None:
        adamw(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"],
            eps=group["adam_eps"], maximize=False,
        )
    else:
        if counters:
            torch._foreach_add_([c for c, _ in counters], [k for _, k in counters])
        # the CUDA kernel reads an fp32 LR; the CPU one a double (as the host-decided path computes it)
        lr_t = lr.to(torch.float32 if lr.is_cuda else torch.float64).reshape(())
        for i, key in enumerate(keys):
            torch._fused_adamw_(
                [params[i]], [grads[i]], [exp_avgs[i]], [exp_avg_sqs[i]], [], [steps[i]], lr=lr_t, beta1=beta1,
                beta2=beta2, weight_decay=group["weight_decay"], eps=group["adam_eps"], amsgrad=False, maximize=False,
                grad_scale=None, found_inf=(1.0 - masks.any_of([key])).reshape(1),
            )
    if low:
        gen = None
        for dst, i in low:
            value = params[i]  # unchanged where the kernel skipped: rounding it back is exact
            if gen is None and dst.dtype in (torch.bfloat16, torch.float16) and group.get("stochastic_rounding", True):
                gen = opt._rounding_generator(group, dst.device)
            opt._write(dst, value, group, gen)


ROW_FLOORS = {"stateless": None, "rowclip": 1.0}  # row norm floor relative to the tensor's RMS row norm


def stateless_fallback(opt, group: dict, shards, lr: float, row_floor: float | None = None) -> None:
    """Row-wise RMS normalisation; ``row_floor`` (default: the group's eps) is the floor of each row's
    norm as a multiple of the tensor's RMS row norm (``row_col_norms.floor_norms``)."""
    frags = []
    for s in shards:
        shape2d = None if len(s.shape) >= 2 else (1, max(s.numel, 1))
        frags.extend(split_matrices(s, 0, shape2d=shape2d))
    for run in batch_runs(frags):
        row_comms, col_comms = opt._row_col_comms(run)
        holders = opt._comm(run[0].weight)
        budget = int(group["chunk_mb"] * 2**20) * holders.world
        # a floor at the tensor's own scale needs each whole tensor's norm (ROW_FLOORS' "rowclip")
        fro_comms = [holders] if row_floor is not None and holders.world > 1 and not run[0].weight.replicated else []
        for idx in chunks(run, lambda f: f.whole_bytes, budget):
            normalize_rows_cols(
                [run[i] for i in idx], row_comms=row_comms, col_comms=col_comms, iterations=1,
                eps=group["eps"] if row_floor is None else row_floor,
                columns=False, apply=lambda fs, x: opt._apply_fragments(group, fs, x.unbind(0), lr),
                device=run[0].grad.device, fused_update=opt.fused_update(group, lr), cache=opt.geometry_cache,
                fro_comms=fro_comms,
            )
