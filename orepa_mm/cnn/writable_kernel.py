"""What a re-param layer's ``weight`` hands out: the squeezed kernel, with writes that land.

``weight`` is derived (a function of the branch parameters), so a plain tensor returned from
it would silently swallow writes: mmpretrain's ``RepVGGBlock.switch_to_deploy`` and MobileOne
do ``branch_reparam.weight.data = fused``, mmengine's init overrides do
``nn.init.kaiming_normal_(layer.weight)``, hand-written code does ``layer.weight.copy_(w)``.
:class:`WritableKernel` is a tensor subclass that behaves as the plain kernel for every read
(``__torch_function__`` runs each op on the plain tensor and returns plain results), and turns
every write into ``layer.load_kernel(new_value)``: origin = the written kernel, every other
branch scaled to zero, exactly what loading a stock ``weight`` does. A write that a layer cannot
take (a DBB layer, a wrong shape) raises there and then.
"""
import weakref

import torch
from torch import Tensor

#: Methods ending in ``_`` that do not write the tensor's values.
_NOT_WRITES = frozenset({'requires_grad_', 'retain_grad', 'share_memory_', 'record_stream'})
#: In-place operators (their names do not end in ``_``).
_INPLACE_DUNDERS = frozenset({
    '__setitem__', '__iadd__', '__isub__', '__imul__', '__itruediv__', '__ifloordiv__',
    '__imod__', '__ipow__', '__iand__', '__ior__', '__ixor__', '__ilshift__', '__irshift__',
    '__imatmul__'
})


def _writes_self(func) -> bool:
    name = getattr(func, '__name__', '')
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith('_') and not name.startswith('__') and name not in _NOT_WRITES


class WritableKernel(Tensor):
    """A generated kernel whose in-place writes, ``.data`` assignments and ``out=`` results are
    loaded back into the layer it came from (see the module docstring)."""

    @staticmethod
    def of(kernel: Tensor, layer) -> 'WritableKernel':
        """``kernel`` (a plain tensor, autograd history kept) as the writable weight of
        ``layer``."""
        view = kernel.as_subclass(WritableKernel)
        view._layer = weakref.ref(layer)
        return view

    def _root_kernel(self) -> 'WritableKernel':
        root = getattr(self, '_root', None)
        return self if root is None else root

    def _write_back(self) -> None:
        layer = self._layer()
        if layer is None:
            return
        # An indexed view (``weight[0].zero_()``) writes into its root's storage: load the root.
        root = self._root_kernel()
        with torch._C.DisableTorchFunctionSubclass():
            value = root.detach().clone()
        layer.load_kernel(value)

    @property
    def data(self) -> 'WritableKernel':
        with torch._C.DisableTorchFunctionSubclass():
            plain = torch._C.TensorBase.data.__get__(self).as_subclass(Tensor)
        view = plain.as_subclass(WritableKernel)
        view._layer = self._layer
        return view

    @data.setter
    def data(self, value: Tensor) -> None:
        layer = self._layer()
        if layer is not None:
            layer.load_kernel(value)
        torch._C.TensorBase.data.__set__(self, value)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        # The written tensor: the first argument, or a keyword one (nn.init's `tensor=`).
        target = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(target, WritableKernel) and _writes_self(func):
            target._write_back()
        out = kwargs.get('out')
        if isinstance(out, WritableKernel):
            out._write_back()
        if (getattr(func, '__name__', '') == '__getitem__' and isinstance(target, WritableKernel)
                and isinstance(result, Tensor)):
            # weight[i] is a view: keep it writable, its writes load the whole kernel.
            view = result.as_subclass(WritableKernel)
            view._layer = target._layer
            view._root = target._root_kernel()
            return view
        return result

    def __reduce_ex__(self, proto):
        # Saving it (torch.save, deepcopy) saves the plain kernel.
        with torch._C.DisableTorchFunctionSubclass():
            return self.detach().clone().__reduce_ex__(proto)
