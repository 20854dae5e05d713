"""Training-loop pieces mmengine 0.10.7 lacks for CPU users: bf16 AMP and gloo DDP."""
from .cpu_distributed import (CPUDistributedDataParallel, CPUSyncBatchNorm,
                              prepare_cpu_distributed)
from .optim_wrapper import BF16OptimWrapper

__all__ = [
    'BF16OptimWrapper', 'CPUDistributedDataParallel', 'CPUSyncBatchNorm',
    'prepare_cpu_distributed'
]
