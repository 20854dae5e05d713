"""bf16 mixed precision on the CPU, for ``--amp`` on machines without a GPU.

mmengine 0.10.7's ``AmpOptimWrapper`` refuses to start without a CUDA/NPU/MLU/MUSA device, so
``--amp`` could not train on a CPU. bfloat16 has float32's exponent range, so it needs no loss
scaling. The autocast region is the feature extractor (``backbone`` and ``neck``, where the
convolutions and nearly all FLOPs are); heads run in float32 on its float32-cast outputs,
because mmcv's CPU ops (NMS, RoIAlign, ...) have no bf16 kernels. A model without a backbone
runs wholly under autocast. OREPA kernels are generated in float32 either way.
"""
from contextlib import ExitStack, contextmanager

import torch
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch.utils._pytree import tree_map


def _to_float32(value):
    if torch.is_tensor(value) and value.dtype == torch.bfloat16:
        return value.float()
    return value


@contextmanager
def _bf16_forward(module: torch.nn.Module):
    """Within the context, ``module`` runs under bf16 autocast and returns float32 tensors."""
    forward = module.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
            out = forward(*args, **kwargs)
        return tree_map(_to_float32, out)

    module.forward = autocast_forward
    try:
        yield
    finally:
        del module.forward  # back to the class's forward


@OPTIM_WRAPPERS.register_module(force=True)
class BF16OptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose backbone and neck run under CPU bf16 autocast."""

    autocast_modules = ('backbone', 'neck')

    @contextmanager
    def optim_context(self, model):
        inner = model.module if is_model_wrapper(model) else model
        targets = [
            getattr(inner, name) for name in self.autocast_modules
            if isinstance(getattr(inner, name, None), torch.nn.Module)
        ]
        with super().optim_context(model), ExitStack() as stack:
            if targets:
                for module in targets:
                    stack.enter_context(_bf16_forward(module))
            else:
                stack.enter_context(torch.autocast(device_type='cpu', dtype=torch.bfloat16))
            yield
