"""Matrix products for kernel generation, on oneDNN's fp32 GEMM where torch ships it.

Why: generating the squeezed kernels is OREPA's whole training overhead, and it is almost all
matrix products. On CPUs where MKL's sgemm takes a slow path (AMD EPYC: MKL dispatches its
AVX2 code there), ``torch.mm`` runs at less than half the speed of oneDNN's fp32 GEMM, which
is the library the convolutions themselves already use (measured on this project's 2-core EPYC
machine: 105 vs 160-245 GMAC/s for the kernel-generation shapes, see ``tools/benchmark_conv.py
--gemm``). torch exposes that GEMM as ``torch.ops.mkldnn._linear_pointwise`` (what Inductor
emits for CPU linears). It is exact fp32 (no reduced-precision math), but it has no autograd
formula, so these helpers are only called inside orepa_mm's custom autograd functions.

Everything else (CUDA, float64 deploy bakes, bf16, a torch without oneDNN) goes to
``torch.mm`` / ``torch.bmm``.

torch.compile: whether this torch has a working oneDNN GEMM is decided once, at import, into
:data:`ONEDNN_LINEAR`, so traced code only reads a constant. Eager calls the oneDNN op
directly; traced code calls it through the custom op ``orepa_mm::onednn_mm``, because
Inductor lowers ``mkldnn._linear_pointwise`` only for constant (frozen) weights. Both run the
same oneDNN GEMM, so compiled and eager products are the same numbers.

Precision: :func:`full_precision_forward` / :func:`full_precision_backward` are orepa_mm's
``torch.amp.custom_fwd(cast_inputs=torch.float32)`` / ``custom_bwd`` for the kernel functions,
for whichever device the inputs are on: both directions run with autocast off, in the inputs'
own precision (fp32, or fp64 for deploy bakes), even when ``backward()`` is called inside an
autocast region (where CPU autograd runs the backward with the caller's autocast state).
"""
import functools
from typing import Callable, Optional

import torch
from torch import Tensor


def _probe_onednn_linear() -> Optional[Callable]:
    """oneDNN's ``a @ w.T`` if this torch build has it and it agrees with ``torch.mm``."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        linear = torch.ops.mkldnn._linear_pointwise.default
        a = torch.arange(12, dtype=torch.float32).view(3, 4) / 7
        b = torch.arange(8, dtype=torch.float32).view(4, 2) / 5
        ok = torch.allclose(linear(a, b.t(), None, 'none', [], ''), a @ b, rtol=1e-5, atol=1e-6)
    except (AttributeError, RuntimeError):
        return None
    return linear if ok else None


#: oneDNN's fp32 ``a @ w.T`` (``mkldnn._linear_pointwise``), or None: decided once, at import.
ONEDNN_LINEAR: Optional[Callable] = _probe_onednn_linear()


@torch.library.custom_op('orepa_mm::onednn_mm', mutates_args=())
def onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (fp32 CPU, 2-D) on oneDNN's GEMM: what traced code calls (see module doc)."""
    return ONEDNN_LINEAR(a, b.t(), None, 'none', [], '')


@onednn_mm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


def uses_onednn(a: Tensor) -> bool:
    """Whether a product with ``a`` (and an operand like it) runs on oneDNN's GEMM."""
    return ONEDNN_LINEAR is not None and a.device.type == 'cpu' and a.dtype == torch.float32


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N), any strides. Not differentiable."""
    if uses_onednn(a) and b.dtype == torch.float32:
        if torch.compiler.is_compiling():
            return onednn_mm(a, b)
        return ONEDNN_LINEAR(a, b.t(), None, 'none', [], '')
    return torch.mm(a, b)


def batched_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 3-D ``a`` (B, M, K) and ``b`` (B, K, N), one product per batch entry.

    Grouped layers have one product per group. B = 1 (every ungrouped layer) goes to
    :func:`matmul`; grouped ones (ResNeXt: many small products) to ``torch.bmm``.
    """
    if a.shape[0] == 1:
        return matmul(a[0], b[0]).unsqueeze(0)
    return torch.bmm(a, b)


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
    return torch.compiler.is_compiling() or torch.is_autocast_enabled(device_type)


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
        if torch.is_autocast_enabled(device_type):
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
