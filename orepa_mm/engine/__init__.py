"""Training-loop pieces mmengine 0.10.7 lacks for CPU users: bf16 AMP and gloo DDP; the
OREPA-aware DDP wrapper that communicates kernel gradients only; the hook that validates an
unconverted model with each kernel generated once per epoch."""
from .cpu_distributed import CPUDistributedDataParallel, CPUSyncBatchNorm, prepare_cpu_distributed
from .hooks import ReparamKernelCacheHook
from .optim_wrapper import BF16OptimWrapper
from .orepa_ddp import OREPADistributedDataParallel

__all__ = [
    'BF16OptimWrapper', 'CPUDistributedDataParallel', 'CPUSyncBatchNorm',
    'OREPADistributedDataParallel', 'ReparamKernelCacheHook', 'prepare_cpu_distributed'
]
