"""Precision of the kernel functions: fp32 (or fp64) in both directions, whatever autocast says.

:func:`full_precision_forward` / :func:`full_precision_backward` are orepa_mm's
``torch.amp.custom_fwd(cast_inputs=torch.float32)`` / ``custom_bwd`` for the kernel functions,
for whichever device the inputs are on: both directions run with autocast off, in the inputs'
own precision (fp32, or fp64 for deploy bakes), even when ``backward()`` is called inside an
autocast region (where CPU autograd runs the backward with the caller's autocast state).
"""
import functools
from typing import Callable

import torch
from torch import Tensor

# torch >= 2.3 / 2.4 spellings; mmdeploy's environment (torch 2.1, where a train-time model's
# backbone.switch_to_deploy() runs) has only the older ones.
if hasattr(torch.compiler, 'is_compiling'):
    is_compiling = torch.compiler.is_compiling
else:  # pragma: no cover - torch < 2.3

    def is_compiling() -> bool:
        return torch._dynamo.is_compiling()


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, also where it takes no device (torch < 2.4)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # pragma: no cover - torch < 2.4
        return (torch.is_autocast_cpu_enabled()
                if device_type == 'cpu' else torch.is_autocast_enabled())


# -- precision of the kernel functions ---------------------------------------------------------
def _reduced_to_fp32(value):
    """A half / bf16 tensor as fp32; anything else (fp32, fp64, None, ints) unchanged."""
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, Tensor):
            return a.device.type
    return 'cpu'


def _switch_autocast_off(device_type: str) -> bool:
    """Whether to run the function body in an autocast-off region: in eager only when
    autocast is on; when traced always, because the traced backward is replayed in the
    autocast state of the joint graph's tracing (that of the compiled forward), not in the
    one that was current when Dynamo looked at it, so the region must be in the graph."""
    return is_compiling() or autocast_enabled(device_type)


def full_precision_forward(forward: Callable) -> Callable:
    """``custom_fwd(cast_inputs=torch.float32)`` for the inputs' device, whatever it is.

    Under autocast, reduced-precision inputs are cast to fp32 (float64 stays float64, like
    ``custom_fwd``); the forward always runs with autocast off.
    """

    @functools.wraps(forward)
    def wrapper(ctx, *args):
        device_type = _device_type(args)
        if not _switch_autocast_off(device_type):
            return forward(ctx, *args)  # eager, autocast off: nothing to do
        if autocast_enabled(device_type):
            args = tuple(_reduced_to_fp32(a) for a in args)
        with torch.autocast(device_type, enabled=False):
            return forward(ctx, *args)

    return wrapper


def full_precision_backward(backward: Callable) -> Callable:
    """``custom_bwd`` to go with :func:`full_precision_forward`: autocast off in backward,
    as in the forward. (The incoming gradient already has the forward output's dtype:
    autograd casts it.)"""

    @functools.wraps(backward)
    def wrapper(ctx, grad: Tensor):
        device_type = grad.device.type
        if not _switch_autocast_off(device_type):
            return backward(ctx, grad)
        with torch.autocast(device_type, enabled=False):
            return backward(ctx, grad)

    return wrapper
