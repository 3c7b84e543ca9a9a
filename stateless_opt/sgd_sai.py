"""SGD-SaI (Xu et al., arXiv 2412.11768): SGD with momentum, each tensor's LR scaled once by its
gradient signal-to-noise ratio. One momentum buffer, no second moment.

The rule for one weight is ``gsnr`` and ``sgd_sai_update`` below, in plain torch: at the first step
where its gradient g is non-zero, gSNR = ||g||_2 / (std(g) + eps) (std unbiased, as the official code),
frozen for the rest of training; then m_1 = g_1, m_t = mu m_{t-1} + (1 - mu) g_t, and
p <- (1 - lr*wd) p - lr * gSNR * m_t.

Deliberate fixes over the official ``sgd_sai.SGD_sai`` (each tested): a weight whose first gradient
is all zeros (LoRA A with B = 0, zero-init layers) takes its scale at its first non-zero gradient
instead of being frozen forever; a one-element tensor gets scale 1 (no spread to measure; the
official code gives |g| / eps); scales are fp32 state that ``state_dict()`` carries, so a resume
does not recompute them from a fresh gradient.

Optional, and a departure from the paper (``fallback="adamw"``, ``fallback_lr_ratio``): param groups that
``stateless_opt.param_groups`` marks ``rule="fallback"`` (embeddings, LM head, norms) take AdamW, or
SGD-SaI at their own LR, at ``lr * fallback_lr_ratio``; SWAN/SinkGD's AdamW fallback does the step.
Groups without that mark are SGD-SaI at ``lr``, as in the paper.

Sharded: the g-SNR needs each weight's (sum, sum of squares) over all ranks: one all-reduce of
scalars, once per weight (``gsnr_from_sums``); momentum lives on the local piece only. Fused paths:
``_fused_fp32_step``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from . import kernels
from .config import AdamWFallbackConfig
from .fallback import adamw_fallback, adamw_state
from .layouts import local_views
from .optimizer import StatelessOptimizer, StateSize, StepMasks, adamw_fallback_state


# ====================================================================================== the rule
def gsnr(grad: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """One tensor's g-SNR, in float64: ||g||_2 / (unbiased std(g) + eps); 1 for a one-element tensor."""
    g = grad.double().reshape(-1)
    if g.numel() == 1:
        return torch.ones((), dtype=torch.float64)
    return g.norm() / (g.std(correction=1) + eps)


def momentum_(buf: torch.Tensor, grad: torch.Tensor, momentum: float, first: bool) -> torch.Tensor:
    """The EMA momentum in place: m_1 = g_1, m_t = mu m_{t-1} + (1 - mu) g_t."""
    return buf.copy_(grad) if first else buf.mul_(momentum).add_(grad, alpha=1.0 - momentum)


def sgd_sai_update(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, scale: float, *, lr: float,
                   momentum: float, weight_decay: float, first: bool) -> None:
    """One SGD-SaI step of one weight in place, its g-SNR ``scale`` taken (``first``: its first step)."""
    momentum_(buf, grad, momentum, first)
    param.mul_(1.0 - lr * weight_decay).add_(buf, alpha=-lr * scale)


# ====================================================================================== batched
def gsnr_from_sums(total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor, eps: float) -> torch.Tensor:
    """``gsnr`` of many tensors from their (all-reduced) sums and sums of squares (float64 in, fp32
    out), std unbiased (N-1); one-element tensors get 1. Saturated at fp32's largest value: a constant
    gradient's scale is ||g|| / eps, which above ||g|| ~ 3e30 would overflow the fp32 state to inf and
    turn an fp64 weight whose update fits into inf."""
    norm = total_sq.clamp_min(0).sqrt()
    var = (total_sq - total * total / count) / (count - 1).clamp_min(1)
    std = var.clamp_min(0).sqrt()
    snr = norm / (std + eps)
    return torch.where(count > 1, snr, torch.ones_like(snr)).clamp_max(torch.finfo(torch.float32).max).float()


# ====================================================================================== the optimizer
class SGDSaIConfig(AdamWFallbackConfig):
    """SGD-SaI (arXiv 2412.11768): momentum SGD with each tensor's LR scaled once by its g-SNR."""

    lr: float = Field(1e-2, ge=0.0, description="learning rate (the official default is a ViT setting)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA coefficient of the momentum buffer")
    eps: float = Field(1e-8, gt=0.0, description="added to std(g) in g-SNR = ||g|| / (std(g) + eps)")
    weight_decay: float = Field(1e-2, ge=0.0, description="decoupled weight decay, not scaled by g-SNR")
    max_normalized_gsnr: bool = Field(
        False, description="the paper's Alg. 1 variant: divide every g-SNR by the max over all tensors"
    )
    fallback: Literal["sgdsai", "adamw"] = Field(
        "sgdsai",
        description="rule for param groups marked rule='fallback' (stateless_opt.param_groups: embeddings, "
        "LM head, norms): SGD-SaI like every tensor (the paper), or AdamW (a departure from the paper)",
    )
    fallback_lr_ratio: float = Field(
        1.0, gt=0.0, description="LR of the rule='fallback' groups = lr * ratio (1: the paper's single LR)"
    )
    fused: bool = Field(
        True,
        description="fp32 weights: fused kernels (on CUDA one Triton launch for all weights, decay "
        "included; elsewhere torch's fused SGD kernel per weight plus a decay pass); False: the tensor-op path",
    )
    stochastic_rounding: bool = Field(
        True, description="round low-precision (bf16/fp16) weights stochastically so small updates survive"
    )


class SGDSaI(StatelessOptimizer):
    """SGD-SaI: ``SGDSaI(params, lr=1e-2, momentum=0.9, eps=1e-8, weight_decay=1e-2, ...)``.

    Elementwise, so it applies to every tensor (no matrix/fallback split), like the official package.
    The official default lr=1e-2 is a ViT setting: each tensor's effective LR is about lr * sqrt(numel)
    (gSNR >= sqrt(N - 1) for zero-mean gradients), so LLMs need a much smaller lr.
    """

    config_cls = SGDSaIConfig
    uses_rules = False
    # one fp32 scale per weight: not flat-shaped (see host_state); on the host when steps are decided there
    host_state = frozenset({"gsnr"})
    weight_state = frozenset({"gsnr"})
    # elementwise: fp64 weights are stepped in fp64 (momentum buffer like the weight)
    param_dtypes = StatelessOptimizer.param_dtypes | {torch.float64}

    def __init__(self, params, lr: float = 1e-2, **hyperparameters):
        super().__init__(params, lr, **hyperparameters)
        if not any(g.get("rule") == "fallback" for g in self.param_groups):
            custom = sorted({k for g in self.param_groups for k, default in (("fallback", "sgdsai"),
                             ("fallback_lr_ratio", 1.0)) if g[k] != default})
            if custom:
                raise ValueError(
                    f"SGDSaI: {', '.join(custom)} apply to param groups marked rule='fallback' and none is; "
                    "pass stateless_opt.param_groups(model) (it marks embeddings, LM head and norms)"
                )

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._known: set = set()  # (state id, index) of scales known to be set (device-decided steps)

    def _begin_step(self, todo) -> None:
        """Every group's new scales before any group steps (host-decided steps): the max-normalised
        variant divides by the max over all weights (a split into param groups must not change it)."""
        self._fresh_scales = set().union(*(self._init_scales(group, units) for group, units in todo
                                           if not _adamw_group(group)))

    def _step_group(self, group, units, live) -> None:
        masks = live if isinstance(live, StepMasks) else None
        if _adamw_group(group):
            adamw_fallback(self, group, units, self._group_lr(group, units, masks), masks)
            return
        if masks is not None:
            self._step_group_on_device(group, units, masks)
            return
        fresh = self._fresh_scales
        max_scale = self._max_gsnr() if group["max_normalized_gsnr"] else 1.0
        mu = group["momentum"]
        lr = self._group_lr(group, units, None)
        fused, params, updates, scales = [], [], [], []
        for t, shards in units:
            state = self.state[t]
            buf_flat = local_views(state["momentum_buffer"])[0].view(-1)
            gsnr = state["gsnr"] if state["gsnr"].device.type == "cpu" else state["gsnr"].cpu()
            for s in shards:
                buf = buf_flat[s.offset : s.offset + s.grad.numel()]
                first = (id(state), s.unit_index) in fresh
                value = gsnr[s.unit_index].item()  # host tensor: no sync
                if group["fused"] and _fusable(s.param, s.grad, buf, mu):
                    fused.append((s.param, s.grad, buf, value, first))
                    continue
                momentum_(buf, s.grad, mu, first)
                params.append(s.param)
                updates.append(buf)
                scales.append(value / max_scale)
        _fused_fp32_step(fused, mu, lr, group["weight_decay"], max_scale)
        self._apply(params, updates, lr, group["weight_decay"], group, scales)

    def _group_lr(self, group: dict, units, masks):
        """The group's LR (``_lr``: its device scalar on device-decided steps), times
        ``fallback_lr_ratio`` on a rule='fallback' group."""
        device = units[0][0].device if not units[0][1] else units[0][1][0].grad.device
        lr = self._lr(group, device, masks)
        return lr * group["fallback_lr_ratio"] if group.get("rule") == "fallback" else lr

    def _step_group_on_device(self, group, units, masks) -> None:
        """The device-decided step: scales are taken on the device where a weight's is still NaN and its
        gradient is non-zero; each weight's mode (0 untouched, 1 first step, 2 later) is a device flag
        the kernel (or the masked tensor ops) read; nothing is read back, except, while some scale may
        still be missing, which ones are (``_known``, read one step late without draining the GPU)."""
        device = units[0][0].device if not units[0][1] else units[0][1][0].grad.device
        mu = group["momentum"]
        sc = self.scalars(group, device)
        lr = self._group_lr(group, units, masks)
        ready = self.__dict__.get("_modes_ready", {}).pop(id(group), None)
        shards, modes = ready if ready is not None else self._device_modes(group, units, masks)
        max_scale = self._max_gsnr_on_device(device) if group["max_normalized_gsnr"] else None
        fused, rest = [], []
        for k, (state, s) in enumerate(shards):
            buf = local_views(state["momentum_buffer"])[0].view(-1)[s.offset : s.offset + s.grad.numel()]
            if group["fused"] and kernels.available(device) and _fusable(s.param, s.grad, buf, mu):
                fused.append((s.param, s.grad, buf, kernels.address(state["gsnr"], s.unit_index),
                              kernels.address(modes, k)))
            else:
                rest.append((k, state, s, buf))
        if fused:
            kernels.sgd_sai_step_(fused, lr=lr, weight_decay=sc[1], mu=mu,
                                  max_scale=max_scale if max_scale is not None else 1.0, tables=self.launch_tables)
        params, updates, scales, keys_rest = [], [], [], []
        for k, state, s, buf in rest:
            mode, g = modes[k], s.grad
            stepped = torch.where(mode == 1, g, torch.add(buf * mu, g, alpha=1.0 - mu))  # as momentum_
            buf.copy_(torch.where(mode > 0, stepped, buf))
            scale = state["gsnr"][s.unit_index].double()
            params.append(s.param)
            updates.append(buf)
            scales.append(scale / max_scale.double() if max_scale is not None else scale)
            keys_rest.append(s.key)
        if params:
            self._apply(params, updates, lr, group["weight_decay"], group, scales, keys_rest)

    def _begin_step_on_device(self, work, masks) -> None:
        """The max-normalised variant divides by the max over all weights: every group's new scales are
        taken (``_device_modes``) before any group steps, as ``_begin_step`` does on the host."""
        self._modes_ready = {}
        groups = [w for w in work if not _adamw_group(w.group)]
        if any(w.group["max_normalized_gsnr"] for w in groups):
            for w in groups:
                self._modes_ready[id(w.group)] = self._device_modes(w.group, list(zip(w.units, w.shards)), masks)

    def _device_modes(self, group, units, masks) -> tuple[list, torch.Tensor]:
        """The group's (state, shard) pairs and each one's mode flag (0 untouched, 1 first step, 2 later),
        taking the scales of weights whose scale is still NaN and whose gradient is non-zero."""
        device = units[0][0].device if not units[0][1] else units[0][1][0].grad.device
        self._learn_known_scales()
        shards = [(self.state[t], s) for t, ss in units for s in ss]
        for state, _ in shards:
            if state["gsnr"].device != device:  # a host-decided run's checkpoint: once, eagerly
                state["gsnr"] = state["gsnr"].to(device)
        keys = [s.key for _, s in shards]
        index = self.launch_tables.get(tuple(masks.position[k] for k in keys), torch.long, device)
        keep = masks.keep[index]
        modes = self._mode_buffer(group, len(shards), device)
        pending = [k for k, (state, s) in enumerate(shards) if (id(state), s.unit_index) not in self._known]
        if pending:
            first = self._init_scales_on_device(group, [shards[k] for k in pending], keep, pending, device)
            at = self.launch_tables.get(tuple(pending), torch.long, device)
            firsts = torch.zeros(len(shards), dtype=torch.float32, device=device).index_copy_(0, at, first)
            torch.sub(keep * 2.0, firsts, out=modes)
        else:
            torch.mul(keep, 2.0, out=modes)
        return shards, modes

    def _mode_buffer(self, group: dict, n: int, device) -> torch.Tensor:
        """The group's persistent fp32 mode flags (addressed by the kernel's cached launch table)."""
        key = ("sgd_sai_modes", id(group), n, str(device))
        buf = self.geometry_cache.get(key)
        if buf is None:
            if kernels.capturing(device):
                raise RuntimeError("SGD-SaI's weights changed during CUDA graph capture: run an eager step first")
            buf = self.geometry_cache[key] = torch.zeros(n, dtype=torch.float32, device=device)
        return buf

    def _init_scales_on_device(self, group, pending: list, keep: torch.Tensor, positions: list[int], device):
        """Scales for the weights whose scale may still be NaN (``pending``: (state, shard)), written
        where it is NaN and the gradient non-zero; returns the fp32 first-step flags. While some are
        missing, which ones is copied to the host for the next step's ``_learn_known_scales``."""
        stats = torch.stack([_sum_and_sumsq(s.grad) for _, s in pending])
        self._reduce_stats(stats, [s for _, s in pending])
        counts = self.launch_tables.get(tuple(float(s.numel) for _, s in pending), torch.float64, device)
        new = gsnr_from_sums(stats[:, 0], stats[:, 1], counts, group["eps"])
        at = self.launch_tables.get(tuple(positions), torch.long, device)
        live = keep[at] > 0
        flags = []
        for k, (state, s) in enumerate(pending):
            old = state["gsnr"][s.unit_index : s.unit_index + 1]
            first = torch.isnan(old) & live[k : k + 1]
            old.copy_(torch.where(first, new[k : k + 1], old))
            flags.append(first)
        first = torch.cat(flags).to(torch.float32)
        if not kernels.capturing(device):
            missing = torch.cat([torch.isnan(state["gsnr"][s.unit_index : s.unit_index + 1]) for state, s in pending])
            keys = [(id(state), s.unit_index) for state, s in pending]
            if device.type == "cpu":
                self._probe = (keys, missing, None)
            else:
                host = torch.empty(missing.shape, dtype=torch.bool, pin_memory=True)
                host.copy_(missing, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                self._probe = (keys, host, event)
        return first

    def _learn_known_scales(self) -> None:
        """Weights whose scale the last device-decided step found set are not pending any more. The flags
        were copied to the host by that step; waiting for its event waits for that step alone (the
        same step on every rank, so every rank keeps the same pending set)."""
        probe = self.__dict__.get("_probe")
        if probe is None or (probe[2] is not None and torch.cuda.is_current_stream_capturing()):
            return  # under capture: the pending set of the last eager step, whose tables exist
        del self.__dict__["_probe"]
        keys, missing, event = probe
        if event is not None:
            event.synchronize()
        self._known.update(k for k, m in zip(keys, missing.tolist()) if not m)

    def _max_gsnr_on_device(self, device) -> torch.Tensor:
        """The paper's variant on the device: max g-SNR over every weight that has one, else 1."""
        values = torch.cat([st["gsnr"].to(device) for st in self.state.values() if "gsnr" in st])
        top = torch.nan_to_num(values, nan=-float("inf")).amax()
        return torch.where(torch.isfinite(top), top, torch.ones_like(top))

    @classmethod
    def state_size(cls, group: dict, element_bytes: int) -> StateSize:
        """One momentum buffer like the stepped tensor, one fp32 scale per weight (on the device unless
        steps are decided on the host); AdamW's on the rule='fallback' groups of ``fallback="adamw"``."""
        if _adamw_group(group):
            return adamw_fallback_state(group)
        return StateSize(per_element=float(element_bytes), per_weight=4, scalars_on_host=group.get("capturable") is False)

    def _ensure_state(self, group, units, shards) -> None:
        """One momentum buffer per tensor (like the weight, local shard only) and one fp32 scale per
        weight it holds (NaN until the weight's first non-zero gradient), on the host for host-decided
        steps, beside the weight for device-decided ones; AdamW's moments instead for an AdamW fallback
        group."""
        for t, ss in zip(units, shards):
            state = self.state[t]
            if _adamw_group(group):
                adamw_state(state, t, t.device if self._decides_on_device(group, t.device) else None)
                continue
            if not state:
                # contiguous: each weight's piece is a flat range of it, like the weight's own piece
                state["momentum_buffer"] = torch.zeros_like(t, memory_format=torch.contiguous_format)
                state["gsnr"] = torch.full((len(ss),), float("nan"), dtype=torch.float32,
                                           device=self._scale_device(group, t))

    def _init_scales(self, group, units) -> set[tuple[int, int]]:
        """Take the scales of weights seen non-zero for the first time (one all-reduce of float64
        (sum, sum of squares) per group); returns their (state id, index) so momentum starts at g."""
        pending = []
        for t, shards in units:
            state = self.state[t]
            pending += [(state, s) for s in shards if torch.isnan(state["gsnr"][s.unit_index])]
        if not pending:
            return set()
        stats = torch.stack([_sum_and_sumsq(s.grad) for _, s in pending])
        self._reduce_stats(stats, [s for _, s in pending])
        counts = torch.tensor([float(s.numel) for _, s in pending], dtype=torch.float64, device=stats.device)
        scales = gsnr_from_sums(stats[:, 0], stats[:, 1], counts, group["eps"]).cpu()
        for (state, s), value in zip(pending, scales):
            state["gsnr"][s.unit_index] = value
        return {(id(state), s.unit_index) for state, s in pending}

    def _reduce_stats(self, stats: torch.Tensor, shards: list) -> None:
        """Sum each weight's (sum, sum of squares) over the ranks that hold its pieces (one all-reduce
        per process group)."""
        by_comm: dict[int, tuple] = {}
        for k, s in enumerate(shards):
            if s.world > 1 and not s.replicated:
                comm = self._comm(s)
                by_comm.setdefault(id(comm), (comm, []))[1].append(k)
        for comm, idx in by_comm.values():
            if len(idx) == len(shards):
                comm.all_reduce_sum_(stats)
            else:
                at = self.launch_tables.get(tuple(idx), torch.long, stats.device)
                stats[at] = comm.all_reduce_sum_(stats[at])

    def _max_gsnr(self) -> float:
        """The paper's variant: the max g-SNR over every weight that has one so far."""
        values = [v for st in self.state.values() if "gsnr" in st for v in st["gsnr"].tolist() if v == v]
        return max(values) if values else 1.0


def _adamw_group(group: dict) -> bool:
    """A group stepped by the opt-in AdamW fallback (marked rule='fallback', ``fallback="adamw"``)."""
    return group.get("rule") == "fallback" and group.get("fallback") == "adamw"


def _sum_and_sumsq(g: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """float64 (sum, sum of squares) of a gradient, in chunks: a float64 copy of a whole embedding
    gradient would add 8 bytes per element to the peak of the first step."""
    acc = torch.zeros(2, dtype=torch.float64, device=g.device)
    for piece in g.reshape(-1).split(chunk):
        d = piece.double()
        acc[0] += d.sum()
        acc[1] += d.square().sum()
    return acc


# Devices whose torch build has the fused SGD kernel (``torch.optim.SGD(fused=True)``): CUDA, and the
# CPU since torch 2.4.
_FUSED_DEVICES = ("cuda", "cpu")


def _fusable(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, mu: float) -> bool:
    """fp32 weight, gradient and buffer, dense, on a device with the fused kernel, and momentum > 0
    (the kernel keeps no buffer without momentum). The CPU kernel reads raw pointers, hence the
    contiguity check (the layouts already guarantee it)."""
    return (
        mu > 0.0
        and p.dtype == g.dtype == buf.dtype == torch.float32
        and p.device.type in _FUSED_DEVICES
        and p.numel() > 0
        and p.is_contiguous()
        and g.is_contiguous()
    )


def _fused_fp32_step(frags: list, mu: float, lr: float, weight_decay: float, max_scale: float = 1.0) -> None:
    """The host-decided SGD-SaI step of fp32 fragments ``(param, grad, buf, gsnr, first)``: m = mu m +
    (1 - mu) g, or m = g where ``first`` (a weight's first step), then p <- (1 - lr*wd) p - lr *
    (gsnr / max_scale) * m.

    On CUDA with Triton: ``kernels.sgd_sai_step_``, one pass (reads p, g, m, writes p, m: 20 bytes a
    parameter, decay included) and one launch for all fragments; the scales and first-step flags go to
    the device in one small copy (the device-decided step reads them where they live). Elsewhere: the
    decay as a pass of its own (8 bytes), then torch's fused SGD kernel (``torch._fused_sgd_``, 20
    bytes), one call per fragment since each has its own lr * scale, with its decay off and dampening
    = mu. The kernel's decay is coupled (added to g before the momentum), hence the separate pass.
    Folding it in (m by one lerp pass, then the momentum-free kernel on m with coupled decay wd / scale:
    24 bytes) rounds W once instead of twice: closer to float64, but off the official fp32 trajectory
    by more than tests/test_sgd_sai_official.py allows; so W is rounded as the official does: W * (1 -
    lr*wd), then the update. The generic path: 40 bytes."""
    if not frags:
        return
    if torch.compiler.is_compiling():  # traced: aten::_fused_sgd_ has no fake (meta) kernel, the same math in ops
        for p, g, buf, value, first in frags:
            sgd_sai_update(p, g, buf, value / max_scale, lr=lr, momentum=mu, weight_decay=weight_decay, first=first)
        return
    device = frags[0][0].device
    if kernels.available(device):  # one pass (20 bytes a parameter, decay included), one launch
        n = len(frags)
        values = kernels.to_device([v for *_, v, _ in frags] + [1.0 if first else 2.0 for *_, first in frags],
                                torch.float32, device)
        kernels.sgd_sai_step_([(p, g, buf, kernels.address(values, i), kernels.address(values, n + i))
                               for i, (p, g, buf, _, _) in enumerate(frags)],
                              lr=lr, weight_decay=weight_decay, mu=mu, max_scale=max_scale)
        return
    decay = 1.0 - lr * weight_decay
    if decay != 1.0:
        torch._foreach_mul_([p for p, *_ in frags], decay)
    for p, g, buf, value, first in frags:
        torch._fused_sgd_([p], [g], [buf], weight_decay=0.0, momentum=mu, lr=lr * (value / max_scale),
                          dampening=mu, nesterov=False, maximize=False, is_first_step=first, grad_scale=None,
                          found_inf=None)
