"""The optional fused CPU loops of k x k kernel generation (``orepa_mm/csrc``).

``make install`` compiles them into ``orepa_mm._kxk_kernel_ops``; without them (no compiler,
another platform) orepa_mm uses the PyTorch reference path, which gives the same numbers.
"""
import importlib
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor


def _load() -> Optional[ModuleType]:
    try:
        return importlib.import_module('orepa_mm._kxk_kernel_ops')
    except ImportError:
        return None


#: The compiled module, or None when it was not built.
KXK_KERNEL_OPS = _load()


#: The loops keep one kernel row (k * k taps) and one depthwise expansion in registers.
MAX_TAPS = 64


def fused_kxk_ops(reference: Tensor, groups: int, expand: int) -> Optional[ModuleType]:
    """The fused ops if they serve this layer: ``reference`` is its kernel (or kernel
    gradient) and must be CPU float32; groups = 1, k <= 7, expand ratio <= 64."""
    taps = reference.shape[-1] * reference.shape[-2]
    if (KXK_KERNEL_OPS is None or groups != 1 or reference.device.type != 'cpu'
            or reference.dtype != torch.float32 or taps > MAX_TAPS or expand > MAX_TAPS):
        return None
    return KXK_KERNEL_OPS
