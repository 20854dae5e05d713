"""The contract every orepa_mm re-param conv keeps, and the conv interface they share.

The contract (docs/development.md states it once for users):

* A re-param layer is a **pure function of its parameters and buffers**: its forward is a conv
  with :meth:`ReparamConv2d.kernel`, generated from the current values every call. There is no
  kernel cache, so nothing can be stale (``.data`` writes of an EMA / mean teacher, optimizer
  steps, ``load_state_dict``, BN buffers of DBB) and nothing reads a value back to the host:
  the forward makes no device synchronisation. Where no gradient is needed (eval, frozen
  stages, teachers, ``inference_mode``) the kernel is generated without autograd, which
  saves and keeps nothing. Deploy (:func:`orepa_mm.reparameterize_model`) for inference speed.
* **Every read of** ``weight`` is that function's value now (a :class:`WritableKernel`).
* **Every write either lands exactly or raises one sentence**: in-place writes to ``weight``
  or any view of it, ``weight = w``, ``weight.data = w``, ``nn.init.*_``, ``out=`` load the
  written kernel exactly (:meth:`load_kernel`); a write through a handle read before the
  parameters changed raises; ``weight_norm``, ``spectral_norm``, parametrizations and pruning
  of the derived ``weight`` raise (deploy first, then apply them to the stock conv).
* **Loading** a stock (``weight`` [+ ``bias``]), an OREPA or a deployed state dict gives
  exactly the function those tensors describe (see ``_StockWeightLoadingMixin``).
* **No wrapper changes a gradient**: a wrapper that supplies the kernel (OREPA-DDP) does so
  through the one documented hook, :attr:`ReparamConv2d.kernel_source`.

A re-param conv looks like ``nn.Conv2d`` to the rest of the OpenMMLab ecosystem (``weight``,
``in_channels``, ``kernel_size``, ``stride``, ... exist), so ConvModule, mmpretrain's RepVGG
fusion and FLOP counters work unchanged, and ``to_conv2d()`` bakes it into a stock
``nn.Conv2d`` under the same attribute name, which is what ``reparameterize_model`` relies on.
"""
import copy
import itertools
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.utils import _pair

from .precision import is_compiling
from .writable_kernel import WritableKernel


def _derived_weight_message(layer_type: str) -> str:
    return (f'{layer_type}.weight is derived from the layer\'s branches, so it cannot '
            'be replaced, re-parametrized, normalised or pruned; re-parameterize the model first '
            '(orepa_mm.reparameterize_model) and apply this to the deployed nn.Conv2d.')


#: Where torch.func.functional_call swaps module attributes, and where parametrizations are
#: registered: a re-param layer answers those callers differently (see their uses).
_STATELESS_MODULE = 'torch.nn.utils._named_member_accessor'
_PARAMETRIZE_MODULE = 'torch.nn.utils.parametrize'


def _called_from(module_name: str, function: Optional[str] = None, depth: int = 6) -> bool:
    """Whether one of the few callers above this frame is ``module_name`` (``.function``)."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_globals.get('__name__') == module_name and (function is None
                                                               or frame.f_code.co_name == function):
            return True
        frame = frame.f_back
    return False


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Equal, NaN where NaN (a diverged layer's handle is still its own)."""
    a = a.detach().to(b.dtype)
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


class _ParameterDict(dict):
    """A re-param layer's ``_parameters``: asking it for ``'weight'`` (what the deprecated
    ``nn.utils.weight_norm`` / ``spectral_norm`` do) raises the contract's sentence instead of
    a bare ``KeyError`` deep inside torch."""

    __slots__ = ('layer_type', )

    def __missing__(self, key):
        if key == 'weight':
            raise TypeError(_derived_weight_message(self.layer_type))
        raise KeyError(key)

    def __delitem__(self, key):
        if key == 'weight' and key not in self:
            raise TypeError(_derived_weight_message(self.layer_type))
        super().__delitem__(key)


class ReparamConv2d(BaseModule):
    """Base class: conv attributes, optional bias, the derived ``weight`` and the deploy bake.

    Subclasses implement :meth:`generate_kernel` (the equivalent kernel from the branch
    parameters) and :meth:`stock_state`, and may override :meth:`equivalent_kernel_bias` and
    ``forward`` (a forward that is not a conv with :meth:`kernel` runs its branches on the
    features, as DBB does).
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = False,
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self._parameters = _ParameterDict(self._parameters)
        self._parameters.layer_type = type(self).__name__
        kernel_size = _pair(kernel_size)
        if kernel_size[0] != kernel_size[1]:
            raise ValueError(f'{type(self).__name__} needs a square kernel, got {kernel_size}.')
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'in_channels ({in_channels}) and out_channels ({out_channels}) '
                             f'must both be divisible by groups ({groups}).')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        # Read by mmcv's ConvModule and by code that inspects nn.Conv2d-like layers.
        self.transposed = False
        self.output_padding = (0, 0)
        self.padding_mode = 'zeros'
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        #: Where the kernel comes from, when not from :meth:`generate_kernel`: None, or a
        #: ``weakref.ref`` to an object with ``kernel_for(layer) -> Optional[Tensor]`` (a
        #: wrapper such as OREPA-DDP that convolves with a kernel of its own making). Copies
        #: (deepcopy, pickle) do not carry it: an EMA or deployed copy generates its own.
        self.kernel_source = None

    # -- kernel -------------------------------------------------------------------------------
    def generate_kernel(self) -> Tensor:
        """The equivalent (O, I/g, k, k) kernel of all branches (differentiable)."""
        raise NotImplementedError

    def _constant_buffers(self) -> Dict[str, Tensor]:
        """The fixed tensors the kernel uses (patterns, identities), as built at construction.

        Non-persistent buffers (no checkpoint holds them), so a layer built on the meta device
        rebuilds them when it is materialised (:meth:`_apply`, as ``to_empty`` runs it).
        """
        return {}

    def _apply(self, fn, recurse=True):
        on_meta = [name for name, b in self._buffers.items() if b is not None and b.is_meta]
        super()._apply(fn, recurse)
        if on_meta:
            with torch.device('cpu'):
                constants = self._constant_buffers()
            for name in on_meta:
                buffer = self._buffers.get(name)
                if constants.get(name) is not None and buffer is not None and not buffer.is_meta:
                    with torch.no_grad():
                        buffer.copy_(constants[name])
        return self

    def kernel_parameters(self) -> List[Tensor]:
        """The parameters the kernel is a function of (all but ``bias``)."""
        return [p for name, p in self.named_parameters() if name != 'bias']

    def kernel(self) -> Tensor:
        """The squeezed kernel now, in the parameters' precision (fp32 under autocast).

        Generated afresh every call, from the current parameters and buffers (see the module
        docstring), or taken from :attr:`kernel_source` when a wrapper supplies it. With no
        gradient needed (no grad mode, frozen parameters) autograd records nothing.
        """
        kernel = self._sourced_kernel()
        return self._own_kernel() if kernel is None else kernel

    def _sourced_kernel(self) -> Optional[Tensor]:
        """The kernel a wrapper supplies through :attr:`kernel_source`, or None."""
        source = self.kernel_source() if self.kernel_source is not None else None
        return None if source is None else source.kernel_for(self)

    def _own_kernel(self) -> Tensor:
        device_type = self.branch_parameter().device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.generate_kernel()

    @property
    def weight(self) -> Tensor:
        """The squeezed kernel, like ``nn.Conv2d.weight``; writes to it are loaded back.

        ``layer.weight = w``, ``layer.weight.data = w``, ``nn.init.*_(layer.weight)``,
        ``layer.weight.copy_(w)``, ``layer.weight.view(-1).mul_(0)``: each sets the layer so
        that its kernel equals the written value exactly (:meth:`load_kernel`). See
        :mod:`orepa_mm.cnn.writable_kernel`.
        """
        if is_compiling():
            return self.kernel()
        kernel = self._sourced_kernel()
        # A supplied kernel (a cache entry, OREPA-DDP's proxy) is handed out as a copy: a
        # write through the handle must reach the parameters, never the supplier's tensor.
        kernel = self._own_kernel() if kernel is None else kernel.clone()
        return WritableKernel.of(kernel, self)

    @weight.deleter
    def weight(self) -> None:
        raise TypeError(_derived_weight_message(type(self).__name__))

    @property
    def parametrizations(self):
        """Absent (``hasattr`` is False, ``is_parametrized`` says no), except to
        ``torch.nn.utils.parametrize.register_parametrization`` (weight_norm, spectral_norm,
        orthogonal...), which asks for it before it registers anything and gets the contract's
        sentence: the derived ``weight`` cannot be re-parametrized."""
        if _called_from(_PARAMETRIZE_MODULE, 'register_parametrization'):
            raise TypeError(_derived_weight_message(type(self).__name__))
        raise AttributeError(f"'{type(self).__name__}' object has no attribute "
                             "'parametrizations'")

    def __dir__(self):
        # Introspection (torch.jit.trace's export scan, inspect.getmembers) skips it.
        return [name for name in super().__dir__() if name != 'parametrizations']

    def register_parameter(self, name: str, param) -> None:
        if name.startswith('weight'):
            # torch.nn.utils.prune moves ``weight`` to ``weight_orig``; weight_norm registers
            # ``weight_g`` / ``weight_v``: neither can apply to a derived kernel.
            raise TypeError(_derived_weight_message(type(self).__name__))
        super().register_parameter(name, param)

    def __setattr__(self, name: str, value) -> None:
        if name == 'weight':
            if _called_from(_STATELESS_MODULE):
                raise TypeError(f'torch.func.functional_call cannot swap in a kernel for the '
                                f'derived {type(self).__name__}.weight (swapping it back would '
                                'rewrite the branches); pass the branch parameters '
                                '(named_parameters()) instead, or deploy the model first.')
            if not isinstance(value, Tensor):
                raise TypeError(f'{type(self).__name__}.weight can only be set to a tensor '
                                f'(the kernel to load), got {type(value).__name__}.')
            self.load_kernel(value, same_dtype=True)
            return
        super().__setattr__(name, value)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['kernel_source'] = None
        return state

    def stock_state(self, weight: Tensor) -> Dict[str, Tensor]:
        """Branch tensors (names relative to this layer, ``bias`` excluded) whose kernel is
        exactly ``weight``."""
        raise TypeError(f'a kernel cannot be written into a {type(self).__name__} layer (its '
                        'branches have their own norms); re-parameterize the model first '
                        '(orepa_mm.reparameterize_model) and write the deployed conv.')

    @torch.no_grad()
    def load_kernel(self,
                    weight: Tensor,
                    expected_current: Optional[Tensor] = None,
                    same_dtype: bool = False) -> None:
        """Make the squeezed kernel exactly ``weight``: origin = ``weight``, every other branch
        scaled to zero (as when a stock ``weight`` is loaded from a state dict).

        ``expected_current``: what the writer believes the kernel is now (a ``weight`` handle's
        value before its write); if the layer's kernel differs, the handle is stale and the
        write is refused rather than loading old values over an optimizer step.
        ``same_dtype``: ``weight`` is taken as it is (``weight = w``, ``weight.data = w``, which
        change a stock conv's dtype), so one in another dtype than the layer's cannot land
        exactly and is refused instead of being cast.
        """
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f'cannot write a kernel of shape {tuple(weight.shape)} into a '
                             f'{type(self).__name__} layer of shape {expected}.')
        dtype = self.branch_parameter().dtype
        if same_dtype and weight.dtype != dtype:
            raise TypeError(f'cannot set the {dtype} {type(self).__name__}.weight to a '
                            f'{weight.dtype} tensor exactly; cast the tensor (w.to({dtype})) or '
                            'the layer (layer.to(w.dtype)) first.')
        state = self.stock_state(weight.detach())
        if expected_current is not None and not _same_values(self._own_kernel(), expected_current):
            raise ValueError(f'this {type(self).__name__}.weight tensor was read before the '
                             'layer\'s parameters changed, so writing it would load old values; '
                             'read layer.weight again and write to that.')
        for name, value in state.items():
            self.get_parameter(name).copy_(value)

    def branch_parameter(self) -> Tensor:
        """A tensor of the layer's kernel parameters (for their device and dtype).

        DataParallel replicas hold their parameters as plain attributes, listed in
        ``_former_parameters``, not as registered parameters.
        """
        replica_params = getattr(self, '_former_parameters', {}).values()
        for tensor in itertools.chain(self.parameters(), replica_params):
            if tensor is not None:
                return tensor
        raise RuntimeError(f'{type(self).__name__} has no parameters.')

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)

    # -- deploy -------------------------------------------------------------------------------
    def equivalent_kernel_bias(self) -> Tuple[Tensor, Optional[Tensor]]:
        """Kernel and bias of the single conv this layer is equivalent to (eval mode)."""
        return self.generate_kernel(), self.bias

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """A stock ``nn.Conv2d`` with the baked kernel, computed in float64 and cast back."""
        reference = self.branch_parameter()
        exact = copy.deepcopy(self).double().eval()
        kernel, bias = exact.equivalent_kernel_bias()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=bias is not None,
            device=reference.device,
            dtype=reference.dtype)
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
        conv.train(self.training)
        return conv

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, '
             f'stride={self.stride}, padding={self.padding}')
        if self.dilation != (1, 1):
            s += f', dilation={self.dilation}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        return s
