"""SIGKILL a training rank at a chosen point, for tests/test_train.py's crash-and-relaunch tests.

Put this folder on PYTHONPATH and set ``STATELESS_OPT_CRASH_PLAN`` to ``;``-separated
``attempt:point:step:rank`` entries; the process that is rank ``rank`` of torchrun's restart number
``attempt`` (TORCHELASTIC_RESTART_COUNT; 0 without restarts) kills itself with SIGKILL at ``point``:

* ``mid_step``     step ``step``'s optimizer update is about to run (after forward and backward: DDP's
                   gradient all-reduce done, FSDP2's reduce-scatter done, ZeRO's partitions reduced)
* ``mid_write``    this rank has written its file of checkpoint ``step``, which is not committed yet
* ``after_write``  checkpoint ``step`` is committed (renamed, retention done) and nothing else happened

Nothing in launch/ knows about this: the hooks are installed from outside, when ``launch.checkpoint``
and ``launch.data`` are first imported (an import hook), and through torch's global optimizer pre-step
hook.
"""

from __future__ import annotations

import os

_PLAN = os.environ.get("STATELESS_OPT_CRASH_PLAN")
_RANK = os.environ.get("RANK")

if _PLAN and _RANK is not None:  # a training worker (the torchrun agent has no RANK)
    import importlib.abc
    import importlib.util
    import signal
    import sys

    _attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    _mine = [e.split(":") for e in _PLAN.split(";") if e and int(e.split(":")[0]) == _attempt]
    _mine = [(point, int(step)) for _, point, step, rank in _mine if int(rank) == int(_RANK)]

    def _die(where: str) -> None:
        sys.stdout.flush()
        sys.stderr.write(f"[crash plan] rank {_RANK} attempt {_attempt}: SIGKILL {where}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    _step = {"now": 0}  # the step being run (1-based), from the batch it asks for

    def _install_data(module) -> None:
        batch = module.train_batch

        def batch_hook(tokens, index, *args, **kwargs):
            _step["now"] = index + 1  # (with grad_accum 1, as in the tests: the batch index is the step)
            return batch(tokens, index, *args, **kwargs)

        module.train_batch = batch_hook

    def _install_checkpoint(module) -> None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        save, write = module.save, module._save

        def save_hook(root, step, *args, **kwargs):
            out = save(root, step, *args, **kwargs)
            if ("after_write", step) in _mine:
                _die(f"after checkpoint {step} was committed")
            return out

        def write_hook(obj, path):
            write(obj, path)
            for point, step in _mine:
                if point == "mid_write" and f"{module.PREFIX}{step:08d}{module.PARTIAL}" in str(path):
                    _die(f"after writing {path}, before checkpoint {step} was committed")

        def step_hook(optimizer, args, kwargs):  # ZeRO steps its base optimizer once per param group
            if ("mid_step", _step["now"]) in _mine:
                _die(f"in step {_step['now']} before the optimizer update")

        module.save, module._save = save_hook, write_hook
        register_optimizer_step_pre_hook(step_hook)

    _INSTALL = {"launch.checkpoint": _install_checkpoint, "stateless_opt.launch.checkpoint": _install_checkpoint,
                "launch.data": _install_data, "stateless_opt.launch.data": _install_data}

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in _INSTALL:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _INSTALL[name](module)

            spec.loader.exec_module = exec_module
            return spec

    if _mine:
        sys.meta_path.insert(0, _Finder())
