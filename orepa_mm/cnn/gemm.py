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
"""
import functools
from typing import Callable, Optional

import torch
from torch import Tensor


@functools.lru_cache(maxsize=None)
def _onednn_linear() -> Optional[Callable]:
    """oneDNN's ``a @ w.T`` if this torch build has it and it agrees with ``torch.mm``."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        linear = torch.ops.mkldnn._linear_pointwise
        a = torch.arange(12, dtype=torch.float32).view(3, 4) / 7
        b = torch.arange(8, dtype=torch.float32).view(4, 2) / 5
        ok = torch.allclose(linear(a, b.t(), None, 'none', [], ''), a @ b, rtol=1e-5, atol=1e-6)
    except (AttributeError, RuntimeError):
        return None
    return linear if ok else None


def uses_onednn(a: Tensor) -> bool:
    """Whether a product with ``a`` (and an operand like it) runs on oneDNN's GEMM."""
    return a.device.type == 'cpu' and a.dtype == torch.float32 and _onednn_linear() is not None


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N), any strides. Not differentiable."""
    if uses_onednn(a) and b.dtype == torch.float32:
        return _onednn_linear()(a, b.t(), None, 'none', [], '')
    return torch.mm(a, b)


def batched_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for 3-D ``a`` (B, M, K) and ``b`` (B, K, N), one product per batch entry.

    Grouped layers have one product per group. B = 1 (every ungrouped layer) goes to
    :func:`matmul`; grouped ones (ResNeXt: many small products) to ``torch.bmm``.
    """
    if a.shape[0] == 1:
        return matmul(a[0], b[0]).unsqueeze(0)
    return torch.bmm(a, b)
