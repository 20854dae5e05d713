"""An explicit, opt-in kernel cache for evaluating an unconverted model: ``cached_kernels``.

Outside it, a re-param layer generates its kernel every forward (the contract: never stale, no
device sync). Generating costs about what the kernel's own conv costs on a small batch, which
validation of an unconverted model would pay on every batch. Like
``torch.nn.utils.parametrize.cached()``, :func:`cached_kernels` lets the caller say "the
parameters do not change in here": each layer's kernel is generated once, without autograd,
and reused for as long as the context is open.

What it still sees, without a host sync: any in-place change of a parameter or buffer made
through the tensor itself (optimizer steps, ``load_state_dict``, ``p.mul_()``, ``p.copy_()``),
by its version counter, and a replaced tensor, by identity. What it cannot see: a write through
``.data`` inside the context (it leaves the version counter alone), which is why the cache is
opt-in and scoped: :class:`~orepa_mm.engine.hooks.ReparamKernelCacheHook` opens it for each
validation / test epoch only, after EMAHook has swapped its averaged parameters in and closed
before it swaps them back. When autograd needs the kernel, the cache is bypassed.
"""
import contextlib
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor


def _key(layer: nn.Module) -> Tuple:
    tensors = list(layer.parameters()) + list(layer.buffers())
    return tuple((id(t), t._version) for t in tensors)


class KernelCache:
    """Kernels of the layers it is the ``kernel_source`` of, keyed by parameter versions."""

    def __init__(self):
        self._entries: Dict[int, Tuple[weakref.ref, Tuple, Tensor]] = {}

    def kernel_for(self, layer: nn.Module) -> Optional[Tensor]:
        if torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters()):
            return None  # autograd needs the kernel's graph: generate as usual
        key = _key(layer)
        entry = self._entries.get(id(layer))
        if entry is not None and entry[0]() is layer and entry[1] == key:
            kernel = entry[2]
            if not kernel.is_inference() or torch.is_inference_mode_enabled():
                return kernel
        source, layer.kernel_source = layer.kernel_source, None
        try:
            with torch.no_grad():
                kernel = layer.kernel()
        finally:
            layer.kernel_source = source
        self._entries[id(layer)] = (weakref.ref(layer), key, kernel)
        return kernel


def _outermost_reparam_layers(model: nn.Module) -> List[nn.Module]:
    from .reparam_conv import ReparamConv2d
    found = []

    def visit(module):
        for child in module.children():
            if isinstance(child, ReparamConv2d):
                found.append(child)
            else:
                visit(child)

    if isinstance(model, ReparamConv2d):
        return [model]
    visit(model)
    return found


@contextlib.contextmanager
def cached_kernels(model: nn.Module) -> Iterator[KernelCache]:
    """Within the context, every re-param layer of ``model`` whose kernel is not supplied by a
    wrapper (OREPA-DDP) generates its kernel once and reuses it (see the module docstring).

    For evaluation: ``with torch.no_grad(), cached_kernels(model): ...``.
    """
    cache = KernelCache()
    layers = [layer for layer in _outermost_reparam_layers(model) if layer.kernel_source is None]
    for layer in layers:
        layer.kernel_source = weakref.ref(cache)
    try:
        yield cache
    finally:
        for layer in layers:
            layer.kernel_source = None
