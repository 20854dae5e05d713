"""Where fused kernel generation comes from: the C++ loops for float32 on the CPU
(``orepa_mm/csrc``) and the Triton ops for CUDA (:mod:`.triton_kernels`, imported on first use so
that ``import orepa_mm`` stays light; :func:`triton_route`).

``make install`` compiles them into ``orepa_mm._kxk_kernel_ops``; without them (no compiler,
another platform) orepa_mm uses the PyTorch reference path, which gives the same numbers.

The loops are dispatcher operators, ``torch.ops.orepa_mm.kxk_*`` (:data:`FUSED_OP_NAMES`),
with the fake (shape-only) kernels below, so ``torch.compile`` traces them into its graphs
like any aten op instead of breaking the graph at an opaque Python extension call; Inductor
calls them as external kernels. They are called only inside the k x k kernel function's
forward and backward (:mod:`.kxk_kernel`, whose names their arguments share), which holds their
autograd formulas.
"""
import functools
import importlib
import importlib.util
import os
import warnings
from types import ModuleType, SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

#: The operators of the compiled module, as ``orepa_mm::<name>``.
FUSED_OP_NAMES = ('kxk_assemble', 'kxk_branch_backward', 'kxk_taps_first_scaled',
                  'kxk_t_major_scaled', 'kxk_compose_backward')
#: The ``OPS_VERSION`` of the C++ source these bindings expect.
OPS_VERSION = 2


def _load() -> Optional[ModuleType]:
    try:
        module = importlib.import_module('orepa_mm._kxk_kernel_ops')
    except ImportError:
        return None
    if getattr(module, 'OPS_VERSION', None) != OPS_VERSION:
        warnings.warn('orepa_mm._kxk_kernel_ops was built from an older orepa_mm/csrc; '
                      'orepa_mm uses its PyTorch path until it is rebuilt '
                      '(python setup.py build_ext --inplace, or make install).')
        return None
    return module


def _bind(module: Optional[ModuleType]) -> Optional[SimpleNamespace]:
    """The operators under their short names (``ops.assemble(...)``), fake kernels registered."""
    if module is None:
        return None
    ns = torch.ops.orepa_mm
    _register_fake_kernels()
    return SimpleNamespace(
        module=module,
        assemble=ns.kxk_assemble.default,
        branch_backward=ns.kxk_branch_backward.default,
        taps_first_scaled=ns.kxk_taps_first_scaled.default,
        t_major_scaled=ns.kxk_t_major_scaled.default,
        compose_backward=ns.kxk_compose_backward.default)


def _register_fake_kernels():
    """Output shapes and dtypes of the fused operators, for tracing (no data touched)."""

    @torch.library.register_fake('orepa_mm::kxk_assemble')
    def _assemble(origin, origin_scale, pattern_matrices, patterns, pattern_scales, composed,
                  pointwise, depthwise, dws_scale):
        return torch.empty_like(origin, memory_format=torch.contiguous_format)

    @torch.library.register_fake('orepa_mm::kxk_branch_backward')
    def _branch_backward(grad, origin, origin_scale, pattern_matrices, patterns, pattern_scales,
                         pointwise, depthwise, dws_scale, with_transposed):
        o, i, x = origin.shape
        nb = 0 if pattern_matrices is None else pattern_matrices.shape[0]
        e = 0 if pointwise is None else pointwise.shape[2]
        new = origin.new_empty
        d_dw = new((i, e, x)) if e > 0 else new((0, ))
        g_t = new((o, x, i)) if with_transposed else new((0, ))
        dv_dws = new((o, )) if e > 0 else new((0, ))
        return (new((o, i, x)), new((o, )), new((nb, o, i)), new((nb, o)), new(
            (o, i, e)), d_dw, dv_dws, g_t)

    @torch.library.register_fake('orepa_mm::kxk_taps_first_scaled')
    def _taps_first_scaled(expand_kxk, scale):
        o, t, x = expand_kxk.shape
        return expand_kxk.new_empty((o, x, t))

    @torch.library.register_fake('orepa_mm::kxk_t_major_scaled')
    def _t_major_scaled(expand_kxk, scale):
        o, t, x = expand_kxk.shape
        return expand_kxk.new_empty((t, o, x))

    @torch.library.register_fake('orepa_mm::kxk_compose_backward')
    def _compose_backward(h, expand_kxk, expand_scale):
        return (torch.empty_like(expand_kxk, memory_format=torch.contiguous_format),
                expand_kxk.new_empty((expand_kxk.shape[0], )))


#: The fused operators (``assemble``, ``branch_backward``, ``taps_first_scaled``,
#: ``t_major_scaled``, ``compose_backward``), or None when they were not built.
KXK_KERNEL_OPS = _bind(_load())

#: The loops keep one kernel row (k * k taps) and one depthwise expansion in registers.
MAX_TAPS = 64


def fused_kxk_ops(reference: Tensor, groups: int, expand: int) -> Optional[SimpleNamespace]:
    """The fused ops if they serve this layer: ``reference`` is its kernel (or kernel
    gradient) and must be CPU float32; groups = 1, k <= 7, expand ratio <= 64."""
    taps = reference.shape[-1] * reference.shape[-2]
    if (KXK_KERNEL_OPS is None or groups != 1 or reference.device.type != 'cpu'
            or reference.dtype != torch.float32 or taps > MAX_TAPS or expand > MAX_TAPS):
        return None
    return KXK_KERNEL_OPS


#: The CPU runs the Triton ops only under Triton's interpreter, and only when asked for: set
#: both before the process starts (``TRITON_INTERPRET=1 OREPA_MM_TRITON_ON_CPU=1``) to run and
#: count the CUDA implementation on a machine without a GPU.
_TRITON_ON_CPU = (
    os.environ.get('TRITON_INTERPRET') == '1' and os.environ.get('OREPA_MM_TRITON_ON_CPU') == '1')


@functools.lru_cache(maxsize=None)
def triton_ops() -> Optional[ModuleType]:
    """:mod:`.triton_kernels` (imported, and its ops registered, on first use), or None
    without ``triton``."""
    if importlib.util.find_spec('triton') is None:
        return None
    try:
        return importlib.import_module('orepa_mm.cnn.triton_kernels')
    except (ImportError, AttributeError) as exc:  # a triton or torch too old for the kernels
        warnings.warn(f'orepa_mm: the Triton kernels cannot load ({type(exc).__name__}: {exc}); '
                      'CUDA layers generate their kernels with PyTorch ops.')
        return None


def triton_route(reference: Tensor) -> bool:
    """Whether a layer whose kernel (or kernel gradient) is like ``reference`` takes the Triton
    ops: float32 / float64 CUDA tensors when triton is installed; CPU tensors only under the
    interpreter switch above."""
    if reference.dtype not in (torch.float32, torch.float64):
        return False
    on = reference.device.type == 'cuda' or (_TRITON_ON_CPU and reference.device.type == 'cpu')
    return on and triton_ops() is not None
