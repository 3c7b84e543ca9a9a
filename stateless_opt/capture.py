"""A captured step: ``CUDAGraphOptimizer`` records one whole ``step()`` of a device-decided optimizer in a
CUDA graph after a few eager steps and replays it, so the host issues one launch per step instead of
hundreds (the 1.3B step of SinkGD was bound by its ~38 ms of Python issuing ~20 ms of GPU work).

A replay repeats the recorded kernels on the same memory: whatever the step reads must live at the same
addresses and whatever it decides must be decided on the device. Our optimizers' device-decided steps
(``capturable=True``, the default on accelerators) do exactly that: the NaN/Inf skip and the
zero-gradient masks are device flags, SGD-SaI's scales live on the device, counters add up on the
device, index and launch tables are built once, and the LR and weight decay are float64 device scalars
that ``refresh_scalars()`` rewrites from ``param_groups`` before every replay - so an LR scheduler
drives the captured step as usual (bind it to this wrapper or to the optimizer: they share
``param_groups``). torch.optim's own capturable optimizers step the same way.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable

import torch

# Group keys that a replay reads from device scalars (refresh_scalars) or that only count steps.
_LIVE_KEYS = frozenset({"params", "lr", "weight_decay", "step", "skipped_steps"})


class CUDAGraphOptimizer(torch.optim.Optimizer):
    """Capture ``optimizer.step()`` in a CUDA graph after ``warmup_steps`` eager steps and replay it.

    ``optimizer``: a stateless_opt optimizer on CUDA whose steps are decided on the device (leave
    ``capturable`` at None or set it True). Use it in place of the optimizer::

        opt = CUDAGraphOptimizer(SWAN(model.parameters(), lr=1e-3), warmup_steps=3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for batch in data:
            model(batch).loss.backward()
            opt.step()
            opt.zero_grad()            # zeroes the .grad tensors in place (set_to_none is ignored)
            sched.step()

    What users must know (each is checked where it can be, and the step is re-captured or refused):

    * **Stable gradients.** The graph reads the ``.grad`` tensors that existed at capture. Zero them in
      place (``zero_grad`` here does, whatever ``set_to_none`` says; ``model.zero_grad()`` and
      ``set_to_none=True`` elsewhere replace them). Before each replay every parameter's gradient is
      checked (same tensor, and no parameter gained or lost one): if any moved, the graph is dropped
      with a warning and the step runs eagerly until the gradients stay put for a step, then it is
      captured again (gradients replaced at every step: every step runs eagerly, with a warning).
    * **When it re-captures.** After ``add_param_group``, ``load_state_dict``, an attached layout, a
      change of any hyper-parameter other than ``lr`` and ``weight_decay`` (e.g. momentum, betas,
      iterations: they are baked into the graph), and whenever the gradients moved (above): the graph is
      dropped and ``warmup_steps`` eager steps run before the next capture. Changed shapes or a new
      layout (FSDP2's reshard, a new DeepSpeed engine) mean new tensors, hence the same. ``release()``
      drops it by hand (call it before ``dist.destroy_process_group()`` when the graph holds
      collectives).
    * **LR and weight decay** are read from device scalars refreshed before every replay: a float
      written by a scheduler (or by hand) takes effect at the next replay; a tensor ``lr`` is read live.
    * **Counters** (``group["step"]``, ``skipped_steps``) add up on the device and are brought up to
      date by ``state_dict()``, ``skipped_steps`` and ``sync_counters()``; ``bytes_sent()`` counts the
      eager steps only.
    * **Not capturable** (refused at capture with the reason): low-precision weights with stochastic
      rounding (seeded on the host: keep an fp32 master), host-decided steps (``capturable=False``),
      DeepSpeed (its engine swaps the tensors it hands the optimizer at every step), CPU tensors,
      non-contiguous weights or gradients (staged through a fresh copy each step).
    * The closure, if given, runs eagerly before the replay (it fills the gradients the graph reads).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 3,
                 capture_error_mode: str = "thread_local"):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (an eager step builds the state, tables and workspaces "
                             f"the graph reuses), got {warmup_steps}")
        if not hasattr(optimizer, "refresh_scalars"):
            raise TypeError(f"CUDAGraphOptimizer wraps a stateless_opt optimizer, got {type(optimizer).__name__} "
                            "(torch.optim optimizers: pass capturable=True and capture with torch.cuda.graph)")
        for i, g in enumerate(optimizer.param_groups):
            if g.get("capturable") is False:
                raise ValueError(f"param group {i} has capturable=False: its steps are decided on the host after a "
                                 "sync, which a CUDA graph cannot hold; leave capturable at None or set it True")
        # Not Optimizer.__init__: the wrapped optimizer owns param_groups, state and defaults; this object
        # is an Optimizer so that LR schedulers and isinstance checks accept it.
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.capture_error_mode = capture_error_mode
        self._graph: torch.cuda.CUDAGraph | None = None
        self._eager_steps = 0
        self._signature = None
        self._keep_alive: list = []
        self._warned: set[str] = set()
        self.captures = 0  # how many times the step was captured (re-captures included)
        self.replays = 0
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())

    # ------------------------------------------------------------------ the Optimizer API, delegated
    def __getattr__(self, name):
        if name == "optimizer":  # before __init__ ran (unpickling)
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):  # DCP passes ``state_dict=`` by keyword
        self.release()
        return self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        self.release()
        return self.optimizer.add_param_group(param_group)

    def add_layout(self, layout):
        self.release()
        return self.optimizer.add_layout(layout)

    def zero_grad(self, set_to_none: bool = True):
        """Zero the gradients in place (the graph reads these tensors), whatever ``set_to_none`` says."""
        if set_to_none:
            self._warn_once("set_to_none", "CUDAGraphOptimizer zeroes .grad in place (set_to_none is ignored): a "
                            "captured step reads the gradient tensors that existed at capture")
        self.optimizer.zero_grad(set_to_none=False)

    def __repr__(self) -> str:
        return f"CUDAGraphOptimizer({self.optimizer!r}, warmup_steps={self.warmup_steps})"

    # ------------------------------------------------------------------ the step
    @property
    def captured(self) -> bool:
        return self._graph is not None

    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._graph is not None:
            reason = self._changed()
            if reason is None:
                self.optimizer.refresh_scalars()
                self._graph.replay()
                self.replays += 1
                return loss
            self._warn_once(reason, f"CUDAGraphOptimizer re-captures: {reason}")
            self.release()
        signature = self._current_signature()
        if self._eager_steps < self.warmup_steps or signature != self._signature:
            # warm-up; or the gradients moved since the last eager step: the tables that step built
            # would not fit, so this one runs eagerly too (and builds them) and capture waits
            if self._eager_steps >= self.warmup_steps:
                self._warn_once("moving", "CUDAGraphOptimizer: the .grad tensors are replaced between steps, so the "
                                "step runs eagerly; zero them in place (zero_grad(set_to_none=False)) to capture it")
            self.optimizer.step()
            self._eager_steps += 1
            self._signature = signature
            return loss
        self._capture()
        return loss

    def release(self) -> None:
        """Drop the captured graph (after a sync: a replay may be in flight); the next steps run eagerly
        for ``warmup_steps`` and then capture again."""
        graph, self._graph = self._graph, None
        self._eager_steps = 0
        self._signature = None
        if graph is not None:
            torch.cuda.synchronize()
            graph.reset()
        self._keep_alive = []

    def _capture(self) -> None:
        """Record one step and replay it (a capture only records: the replay is this step's update)."""
        opt = self.optimizer
        strided = [f"param group {gi}, {opt._label(g, j)}" for gi, g in enumerate(opt.param_groups)
                   for j, p in enumerate(g["params"]) if p.grad is not None
                   and not (p.is_contiguous() and p.grad.is_contiguous())]
        if strided:
            raise RuntimeError(f"CUDAGraphOptimizer cannot capture a step over non-contiguous weights or gradients "
                               f"({'; '.join(strided[:3])}): they are staged through a fresh contiguous copy each "
                               "step; make them contiguous or use the eager step")
        devices = {p.device.type for g in opt.param_groups for p in g["params"] if p.grad is not None}
        if devices != {"cuda"}:
            raise RuntimeError(f"CUDAGraphOptimizer needs every parameter with a gradient on CUDA, got {sorted(devices)}")
        if any(type(lay).__module__.startswith("stateless_opt.integrations.deepspeed") for lay in opt.layouts):
            raise RuntimeError("CUDAGraphOptimizer cannot capture a DeepSpeed step: the engine hands the optimizer "
                               "different tensors at every step; use the eager step")
        opt.refresh_scalars()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
            opt.step()
        self._graph = graph
        self._keep_alive = opt.graph_buffers()
        self.captures += 1
        graph.replay()
        self.replays += 1

    def _current_signature(self) -> tuple:
        """What the graph baked in: every parameter's gradient tensor, the hyper-parameters read on the
        host, the layouts."""
        opt = self.optimizer
        grads = tuple((id(p), p.grad.data_ptr() if p.grad is not None else None)
                      for g in opt.param_groups for p in g["params"])
        hyper = tuple(tuple((k, _frozen(v)) for k, v in sorted(g.items()) if k not in _LIVE_KEYS and not k.startswith("_"))
                      for g in opt.param_groups)
        return grads, hyper, tuple(id(lay) for lay in opt.layouts)

    def _changed(self) -> str | None:
        grads, hyper, layouts = self._current_signature()
        if grads != self._signature[0]:
            return "a parameter's .grad tensor was replaced (or a parameter gained or lost one) since capture"
        if hyper != self._signature[1]:
            return "a hyper-parameter other than lr and weight_decay changed since capture"
        if layouts != self._signature[2]:
            return "the optimizer's layouts changed since capture"
        return None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _frozen(value):
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    return value
