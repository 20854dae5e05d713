"""What every orepa_mm re-parameterizable conv shares: the conv interface and the deploy bake.

A re-param conv looks like ``nn.Conv2d`` to the rest of the OpenMMLab ecosystem (``weight``,
``in_channels``, ``kernel_size``, ``stride``, ... exist), so ConvModule, mmpretrain's RepVGG
fusion and FLOP counters work unchanged, and ``to_conv2d()`` bakes it into a stock
``nn.Conv2d`` under the same attribute name, which is what ``reparameterize_model`` relies on.
"""
import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.utils import _pair

from .kernel_cache import KernelCache
from .writable_kernel import WritableKernel


class ReparamConv2d(BaseModule):
    """Base class: conv attributes, optional bias, kernel cache and the float64 deploy bake.

    Subclasses implement :meth:`generate_kernel` (the equivalent kernel from the branch
    parameters) and may override :meth:`equivalent_kernel_bias` and ``forward``.
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
        self._kernel_cache = KernelCache()

    # -- kernel -------------------------------------------------------------------------------
    def generate_kernel(self) -> Tensor:
        """The equivalent (O, I/g, k, k) kernel of all branches (differentiable)."""
        raise NotImplementedError

    def kernel_parameters(self) -> List[Tensor]:
        """The parameters the kernel is a function of (all but ``bias``)."""
        return [p for name, p in self.named_parameters() if name != 'bias']

    def kernel(self) -> Tensor:
        """The squeezed kernel as a plain tensor, generated in fp32 under autocast.

        Generated afresh whenever autograd needs it (training: some parameter requires grad).
        Otherwise (validation, a frozen stage, a teacher model) it is reused for as long as
        the parameters hold exactly the values it was made from (:class:`KernelCache`,
        exact also for ``.data`` writes), so an unconverted model evaluates and a frozen
        stage trains at almost the cost of a plain conv. Never cached under torch.compile.
        """
        params = self.kernel_parameters()
        if torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            self._kernel_cache.clear()
            return self._generate_full_precision()
        cached = self._kernel_cache.lookup(params)
        if cached is None:
            cached = self._kernel_cache.store(params, self._generate_full_precision())
        return cached

    def clear_kernel_cache(self) -> None:
        """Drop the cached kernel (it is also dropped by ``train()`` / ``eval()``)."""
        self._kernel_cache.clear()

    @property
    def weight(self) -> Tensor:
        """The squeezed kernel, like ``nn.Conv2d.weight``; writes to it are loaded back.

        ``layer.weight = w``, ``layer.weight.data = w``, ``nn.init.*_(layer.weight)``,
        ``layer.weight.copy_(w)``: each sets the layer so that its kernel equals the written
        value exactly (:meth:`load_kernel`). See :mod:`orepa_mm.cnn.writable_kernel`.
        """
        kernel = self.kernel()
        if torch.compiler.is_compiling():
            return kernel
        if self._kernel_cache.holds(kernel):
            # A reused kernel is handed out as a copy: a write through a view the writable
            # kernel cannot follow (``weight.view(-1).mul_(0)``) must not corrupt the cache.
            kernel = kernel.clone()
        return WritableKernel.of(kernel, self)

    def __setattr__(self, name: str, value) -> None:
        if name == 'weight':
            if not isinstance(value, Tensor):
                raise TypeError(f'{type(self).__name__}.weight can only be set to a tensor '
                                f'(the kernel to load), got {type(value).__name__}.')
            self.load_kernel(value)
            return
        super().__setattr__(name, value)

    def stock_state(self, weight: Tensor) -> Dict[str, Tensor]:
        """Parameter values (names relative to this layer) whose kernel is exactly ``weight``."""
        raise TypeError(f'a kernel cannot be written into a {type(self).__name__} layer (its '
                        'branches have their own norms); re-parameterize the model first '
                        '(orepa_mm.reparameterize_model) and write the deployed conv.')

    @torch.no_grad()
    def load_kernel(self, weight: Tensor) -> None:
        """Make the squeezed kernel exactly ``weight``: origin = ``weight``, every other branch
        scaled to zero (as when a stock ``weight`` is loaded from a state dict)."""
        expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f'cannot write a kernel of shape {tuple(weight.shape)} into a '
                             f'{type(self).__name__} layer of shape {expected}.')
        for name, value in self.stock_state(weight.detach()).items():
            self.get_parameter(name).copy_(value)
        self.clear_kernel_cache()

    def _generate_full_precision(self) -> Tensor:
        device_type = self.branch_parameter().device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.generate_kernel()

    def branch_parameter(self) -> Tensor:
        """Any parameter of the layer (for its device and dtype)."""
        return next(self.parameters())

    def train(self, mode: bool = True):
        self._kernel_cache.clear()
        return super().train(mode)

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
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, self.groups, bias=bias is not None,
                         device=reference.device, dtype=reference.dtype)
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


def clear_kernel_cache(model: nn.Module) -> int:
    """Drop the cached kernel of every re-param layer in ``model``; returns how many.

    Never needed for correctness (the cache checks parameter values before every reuse); it
    frees the cached kernels and parameter copies, e.g. before saving memory for training.
    """
    layers = [m for m in model.modules() if isinstance(m, ReparamConv2d)]
    for layer in layers:
        layer.clear_kernel_cache()
    return len(layers)
