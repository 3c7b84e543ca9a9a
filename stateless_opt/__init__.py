"""stateless_opt: SWAN, SinkGD and SGD-SaI as torch optimizers that keep (almost) no state and work
on one GPU, under DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 with the single-process update.

Where things are (docs/design.md has the map): one file per algorithm (``swan.py``, ``sinkgd.py``,
``sgd_sai.py``: the rule for one tensor first, then its batched, sharded form), the ``torch.optim``
base (``optimizer.py``), the table of optimizers every door reads (``registry.py``), the layouts that
say which piece of each weight a rank holds (``layouts.py``), and the two executors that run rules on
those pieces (``owner_compute.py``, ``row_col_norms.py``). ``CUDAGraphOptimizer`` (``capture.py``)
replays a whole step captured in a CUDA graph.
"""

from .capture import CUDAGraphOptimizer
from .grouping import param_groups
from .memory import memory_report
from .registry import OptimizerSpec, register
from .sgd_sai import SGDSaI, SGDSaIConfig
from .sinkgd import SinkGD, SinkGDConfig
from .swan import SWAN, SWANConfig

__all__ = [
    "SWAN", "SinkGD", "SGDSaI", "param_groups", "memory_report", "SWANConfig", "SinkGDConfig", "SGDSaIConfig",
    "OptimizerSpec", "register", "CUDAGraphOptimizer",
]
__version__ = "0.1.0"
