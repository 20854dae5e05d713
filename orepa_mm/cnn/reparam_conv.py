"""What every orepa_mm re-parameterizable conv shares: the conv interface and the deploy bake.

A re-param conv looks like ``nn.Conv2d`` to the rest of the OpenMMLab ecosystem (``weight``,
``in_channels``, ``kernel_size``, ``stride``, ... exist), so ConvModule, mmpretrain's RepVGG
fusion and FLOP counters work unchanged, and ``to_conv2d()`` bakes it into a stock
``nn.Conv2d`` under the same attribute name, which is what ``reparameterize_model`` relies on.
"""
import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor
from torch.nn.modules.utils import _pair


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
        self._kernel_cache: Optional[Tuple[tuple, Tensor]] = None

    # -- kernel -------------------------------------------------------------------------------
    def generate_kernel(self) -> Tensor:
        """The equivalent (O, I/g, k, k) kernel of all branches (differentiable)."""
        raise NotImplementedError

    def _cache_key(self) -> tuple:
        # A tensor's version counter moves on every in-place update (optimizer step,
        # load_state_dict) and its data pointer on .to()/.cuda(): together they say
        # whether a cached kernel is stale, without comparing values.
        return tuple((t.data_ptr(), t._version) for t in self.parameters())

    @property
    def weight(self) -> Tensor:
        """The squeezed kernel, generated in fp32 under autocast.

        With autograd off (validation, inference) it is computed once and reused until a
        parameter changes, so an unconverted model evaluates at the cost of the plain one.
        """
        if torch.is_grad_enabled():
            self._kernel_cache = None
            return self._generate_full_precision()
        key = self._cache_key()
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, self._generate_full_precision())
        return self._kernel_cache[1]

    def _generate_full_precision(self) -> Tensor:
        device_type = self.branch_parameter().device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return self.generate_kernel()

    def branch_parameter(self) -> Tensor:
        """Any parameter of the layer (for its device and dtype)."""
        return next(self.parameters())

    def train(self, mode: bool = True):
        self._kernel_cache = None
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
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
