"""What a re-param layer's ``weight`` hands out: the squeezed kernel, with writes that land.

``weight`` is derived (a function of the branch parameters), so a plain tensor returned from
it would silently swallow writes: mmpretrain's ``RepVGGBlock.switch_to_deploy`` and MobileOne
do ``branch_reparam.weight.data = fused``, mmengine's init overrides do
``nn.init.kaiming_normal_(layer.weight)``, hand-written code does ``layer.weight.copy_(w)`` or
``layer.weight.view(-1).mul_(0)``. :class:`WritableKernel` is a tensor subclass that behaves as
the plain kernel for every read (``__torch_function__`` runs each op on the plain tensor and
returns plain results), except that every view of it (indexing, ``view``, ``detach``,
``permute``, ``.data``, ``unbind``, ...) is again a writable kernel tied to the same handle.
An in-place write to the handle or to any of its views (methods ending in ``_``, ``[...] =``,
``out=``, ``torch._foreach_*_``, ``nn.init.*_``) loads the handle's new value into the layer
(:meth:`ReparamConv2d.load_kernel`: origin = the written kernel, every other branch scaled to
zero, exactly what loading a stock ``weight`` does).

A write is exact only if the handle still holds the layer's kernel: ``w = layer.weight``, then
an optimizer step, then ``w[0] = 0`` would otherwise load the pre-step values of every other
row. So before loading, the handle's value before the write is compared with the layer's
kernel now, and a stale handle raises instead of rolling the step back. (Writes are rare and
off the training step, so the comparison's cost and device sync do not matter there.)
A write that a layer cannot take (a DBB layer, a wrong shape) raises there and then.
"""
import inspect
import weakref

import torch
from torch import Tensor

#: Methods ending in ``_`` that do not write the tensor's values.
_NOT_WRITES = frozenset({'requires_grad_', 'retain_grad', 'share_memory_', 'record_stream'})
#: In-place operators (their names do not end in ``_``).
_INPLACE_DUNDERS = frozenset({
    '__setitem__', '__iadd__', '__isub__', '__imul__', '__itruediv__', '__ifloordiv__', '__imod__',
    '__ipow__', '__iand__', '__ior__', '__ixor__', '__ilshift__', '__irshift__', '__imatmul__'
})


def _op_name(func) -> str:
    """``Tensor.mul_`` -> ``mul_``; ``torch.ops.aten.zero_.default`` -> ``zero_``."""
    return getattr(func, '__name__', '').split('.')[0]


def _writes_in_place(func, args=(), kwargs=None) -> bool:
    name = _op_name(func)
    if name in _INPLACE_DUNDERS:
        return True
    if name.endswith('_') and not name.startswith('__') and name not in _NOT_WRITES:
        return True
    return _inplace_argument(func, args, kwargs or {})


def _inplace_argument(func, args, kwargs) -> bool:
    """``F.relu(w, inplace=True)``, ``F.hardtanh(w, -1, 1, True)``: an ``inplace`` flag."""
    if kwargs.get('inplace') is True:
        return True
    if not any(a is True for a in args[1:]):
        return False
    try:
        bound = inspect.signature(func).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get('inplace') is True


def _plain(t: Tensor) -> Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return t.detach().clone()


def _storage_ptr(t: Tensor) -> int:
    with torch._C.DisableTorchFunctionSubclass():
        return t.untyped_storage().data_ptr()


class WritableKernel(Tensor):
    """A generated kernel whose in-place writes (also through its views), ``.data``
    assignments and ``out=`` results are loaded into the layer it came from (see the module
    docstring)."""

    @staticmethod
    def of(kernel: Tensor, layer) -> 'WritableKernel':
        """``kernel`` (a plain tensor, autograd history kept) as the writable weight of
        ``layer``: the root of its own views."""
        handle = kernel.as_subclass(WritableKernel)
        handle._layer = weakref.ref(layer)
        handle._root = None
        return handle

    def _root_handle(self) -> 'WritableKernel':
        root = getattr(self, '_root', None)
        return self if root is None else root

    def _view_of(self, view: Tensor) -> 'WritableKernel':
        view = view.as_subclass(WritableKernel)
        view._layer = self._layer
        view._root = self._root_handle()
        return view

    def _load_into_layer(self, before: Tensor) -> None:
        """Load this handle (the root) into its layer; ``before`` is its value before the
        write, which must be the layer's kernel now (else the handle is stale)."""
        layer = self._layer()
        if layer is None:
            return
        layer.load_kernel(_plain(self), expected_current=before)

    @property
    def data(self) -> 'WritableKernel':
        with torch._C.DisableTorchFunctionSubclass():
            plain = torch._C.TensorBase.data.__get__(self).as_subclass(Tensor)
        return self._view_of(plain)

    @data.setter
    def data(self, value: Tensor) -> None:
        layer = self._layer()
        if layer is not None:
            layer.load_kernel(value, same_dtype=True)
        torch._C.TensorBase.data.__set__(self, value)

    def _set_layer_requires_grad(self, flag: bool) -> None:
        layer = self._layer()
        if layer is not None:
            for param in layer.kernel_parameters():
                param.requires_grad_(flag)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        setter = func == _REQUIRES_GRAD_SETTER
        if (setter or _op_name(func) == 'requires_grad_') and args[0]._root is None:
            # Freezing (or unfreezing) ``layer.weight`` itself freezes the parameters it is made
            # of, as ``conv.weight.requires_grad_(False)`` freezes a stock conv. A handle read
            # without autograd is a leaf and takes the flag too (``w.requires_grad_()`` then
            # differentiates with respect to it, as before). Views (``weight.detach()``) are
            # new tensors: they take the flag plainly and leave the layer alone.
            flag = bool(args[1] if len(args) > 1 else kwargs.get('requires_grad', True))
            args[0]._set_layer_requires_grad(flag)
            if args[0].grad_fn is None:
                with torch._C.DisableTorchFunctionSubclass():
                    torch._C.TensorBase.requires_grad.__set__(args[0], flag)
            return None if setter else args[0]
        written = _written_handles(func, args, kwargs) if _may_write(func, args, kwargs) else []
        before = [(root, _plain(root)) for root in written]
        try:
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **kwargs)
        except RuntimeError as exc:
            if written and torch.is_grad_enabled() and 'inplace' in str(exc):
                raise RuntimeError('write to layer.weight under torch.no_grad(), as to a stock '
                                   "conv's weight (with autograd on it is the output of the "
                                   'kernel function, which cannot be written in place).') from exc
            raise
        for root, value in before:
            root._load_into_layer(value)
        source = args[0] if args else None
        if isinstance(source, WritableKernel):
            return _wrap_views(source, result)
        return result

    def __reduce_ex__(self, proto):
        # Saving it (torch.save, deepcopy) saves the plain kernel.
        with torch._C.DisableTorchFunctionSubclass():
            return self.detach().clone().__reduce_ex__(proto)


#: ``tensor.requires_grad = flag`` as seen by ``__torch_function__``.
_REQUIRES_GRAD_SETTER = Tensor.requires_grad.__set__


def _may_write(func, args, kwargs) -> bool:
    return _writes_in_place(func, args, kwargs) or isinstance(kwargs.get('out'), WritableKernel)


def _written_handles(func, args, kwargs):
    """The root handles that ``func(*args, **kwargs)`` writes into, each once."""
    targets = []
    if _writes_in_place(func, args, kwargs):
        # The written tensor: the first argument (a list for torch._foreach_*_), or a keyword
        # one (nn.init's ``tensor=``).
        first = args[0] if args else next(iter(kwargs.values()), None)
        targets.extend(first if isinstance(first, (list, tuple)) else [first])
    out = kwargs.get('out')
    targets.extend(out if isinstance(out, (list, tuple)) else [out])
    roots = []
    for target in targets:
        if isinstance(target, WritableKernel):
            root = target._root_handle()
            if all(root is not r for r in roots):
                roots.append(root)
    return roots


def _wrap_views(source: WritableKernel, result):
    """Results of an op on a handle that share its memory (views) become writable handles."""
    if isinstance(result, Tensor):
        if type(result) is Tensor and _shares_memory(result, source):
            return source._view_of(result)
        return result
    if isinstance(result, (tuple, list)) and any(isinstance(r, Tensor) for r in result):
        return type(result)(tuple(_wrap_views(source, r) for r in result))
    return result


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    if a.is_meta or a.numel() == 0:
        return False
    return _storage_ptr(a) == _storage_ptr(b)
