"""stateless_opt: SWAN, SinkGD and SGD-SaI as torch optimizers that keep (almost) no state and work
on one GPU, under DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 with the single-process update."""

from .config import SGDSaIConfig, SinkGDConfig, SWANConfig
from .grouping import param_groups
from .memory import memory_report
from .sgd_sai import SGDSaI
from .sinkgd import SinkGD
from .swan import SWAN

__all__ = ["SWAN", "SinkGD", "SGDSaI", "param_groups", "memory_report", "SWANConfig", "SinkGDConfig", "SGDSaIConfig"]
__version__ = "0.1.0"
