"""bf16 mixed precision on the CPU, for ``--amp`` on machines without a GPU.

mmengine 0.10.7's ``AmpOptimWrapper`` refuses to start without a CUDA/NPU/MLU/MUSA device, so
``--amp`` could not train on a CPU. bfloat16 has float32's exponent range, so it needs no loss
scaling: the wrapper is the plain ``OptimWrapper`` with the forward pass under CPU autocast.
OREPA kernels are still generated in float32 (see ``ReparamConv2d.weight``).
"""
from contextlib import contextmanager

import torch
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module(force=True)
class BF16OptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under ``torch.autocast('cpu', torch.bfloat16)``."""

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), \
                torch.autocast(device_type='cpu', dtype=torch.bfloat16):
            yield
