"""Training-loop pieces mmengine 0.10.7 lacks for CPU users: bf16 AMP and gloo DDP, and the
OREPA-aware DDP wrapper that communicates kernel gradients only."""
from .cpu_distributed import (CPUDistributedDataParallel, CPUSyncBatchNorm,
                              prepare_cpu_distributed)
from .optim_wrapper import BF16OptimWrapper
from .orepa_ddp import OREPADistributedDataParallel

__all__ = [
    'BF16OptimWrapper', 'CPUDistributedDataParallel', 'CPUSyncBatchNorm',
    'OREPADistributedDataParallel', 'prepare_cpu_distributed'
]
