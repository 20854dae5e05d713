"""The Diverse Branch Block (DBB) baseline as a conv type: ``conv_cfg=dict(type='DBB')``.

DBB is what OREPA improves on: the same kind of linear branches, but every branch has its own
BatchNorm and runs on the feature map during training, so its cost grows with the branches.
It exists here so that plain / DBB / OREPA are compared inside the same host model
(``tools/benchmark.py``); deploying folds every branch BN into one ``nn.Conv2d`` with bias.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .kernels import (average_kernel, compose_1x1_kxk, fold_batch_norm, grouped_identity,
                      pad_to_kernel_size)
from .reparam_conv import ReparamConv2d


def _fold(kernel: Tensor, bn: nn.Module, bias=None):
    """Fold ``bn`` after a conv (``kernel``, ``bias``); ``bn`` may already be fused into that
    conv by mmcv's ``fuse_conv_bn`` (then it is an ``nn.Identity`` and the bias is the conv's)."""
    if isinstance(bn, nn.Identity):
        return kernel, bias if bias is not None else kernel.new_zeros(kernel.shape[0])
    return fold_batch_norm(kernel, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                           bn.eps)


def _plus(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else a if b is None else a + b


class BNAndPad(nn.Module):
    """BatchNorm, then pad with the value a zero input takes after that BN.

    A 1x1 conv + BN followed by an unpadded k x k op is only foldable into one padded conv if
    the padding carries the BN's output for a zero input; this layer does exactly that.
    """

    def __init__(self, channels: int, pad: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn = self.bn
        pad_value = (bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt())
        out = F.pad(out, [self.pad] * 4)
        border = torch.ones_like(out[:1, :1])
        border[..., self.pad:-self.pad, self.pad:-self.pad] = 0
        return out + border * pad_value.view(1, -1, 1, 1)


class DBBConv2d(ReparamConv2d):
    """DBB for k x k convs (k odd >= 3, padding k // 2, dilation 1), as published.

    Branches, each ending in its own BN: origin kxk; 1x1 (when groups < out_channels);
    1x1 -> BN&pad -> kxk average; identity-based 1x1 -> BN&pad -> kxk.

    Its function in eval mode is a conv with ``weight`` *and* the bias folded from the branch
    BNs (``equivalent_kernel_bias()``; ``to_conv2d()`` bakes both), so ``folds_bias`` is True:
    structures that fuse convs but drop biases (RepVGG's fusion) refuse it. Its ``weight``
    cannot be written and a stock checkpoint cannot initialise it (both raise).
    """

    folds_bias = True

    def __init__(self,
                 in_channels,
                 out_channels,
                 kernel_size=3,
                 stride=1,
                 padding=None,
                 dilation=1,
                 groups=1,
                 bias=False,
                 init_cfg=None):
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        padding = k // 2 if padding is None else padding
        if k < 3 or k % 2 == 0 or padding != k // 2 or dilation != 1:
            raise ValueError('DBBConv2d supports odd k >= 3 with padding k // 2 and dilation 1 '
                             f'(as published); got k={kernel_size}, padding={padding}, '
                             f'dilation={dilation}.')
        super().__init__(in_channels, out_channels, k, stride, padding, dilation, groups, bias,
                         init_cfg)
        i_g = in_channels // groups
        # Registration order matters to mmcv's fuse_conv_bn, which fuses each BN child into
        # the last conv child before it: every BN below directly follows its own conv, or
        # follows a fused pair (avg_bn is registered before avg_1x1, whose output it never
        # sees directly: pad and pool come between).
        self.origin = nn.Conv2d(
            in_channels, out_channels, k, stride, padding, groups=groups, bias=False)
        self.origin_bn = nn.BatchNorm2d(out_channels)
        self.with_1x1 = groups < out_channels
        if self.with_1x1:
            self.conv_1x1 = nn.Conv2d(
                in_channels, out_channels, 1, stride, groups=groups, bias=False)
            self.conv_1x1_bn = nn.BatchNorm2d(out_channels)
            self.avg_bn = nn.BatchNorm2d(out_channels)
            self.avg_1x1 = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=False)
            self.avg_pad = BNAndPad(out_channels, padding)
            self.avg_pool = nn.AvgPool2d(k, stride)
        else:
            self.avg_pool = nn.AvgPool2d(k, stride, padding)
            self.avg_bn = nn.BatchNorm2d(out_channels)
        # Identity-based first 1x1 of the 1x1 -> kxk branch: weight = residual + identity.
        self.expand_1x1_residual = nn.Parameter(torch.zeros(in_channels, i_g, 1, 1))
        for name, value in self._constant_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.expand_pad = BNAndPad(in_channels, padding)
        self.expand_kxk = nn.Conv2d(in_channels, out_channels, k, stride, groups=groups, bias=False)
        self.expand_bn = nn.BatchNorm2d(out_channels)

    def _constant_buffers(self):
        return {
            'expand_identity': grouped_identity(self.in_channels, self.in_channels // self.groups)
        }

    def forward(self, x: Tensor) -> Tensor:
        out = self.origin_bn(self.origin(x))
        if self.with_1x1:
            out = out + self.conv_1x1_bn(self.conv_1x1(x))
            out = out + self.avg_bn(self.avg_pool(self.avg_pad(self.avg_1x1(x))))
        else:
            out = out + self.avg_bn(self.avg_pool(x))
        first = (self.expand_1x1_residual.flatten(1) + self.expand_identity)[..., None, None]
        mid = self.expand_pad(F.conv2d(x, first, groups=self.groups))
        out = out + self.expand_bn(self.expand_kxk(mid))
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def generate_kernel(self) -> Tensor:
        return self.equivalent_kernel_bias()[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + 'weight' in state_dict and prefix + 'origin.weight' not in state_dict:
            # Raised, not reported: mmengine's non-strict loading only warns about keys, and a
            # DBB layer left at its random init would then be silently wrong.
            raise TypeError(f'{prefix}weight is a stock conv weight, which cannot initialise the '
                            'DBB layer there (its branches have their own BatchNorms); build '
                            'that model with conv_cfg=None to start from stock weights.')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def equivalent_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        k, g = self.kernel_size[0], self.groups
        kernel, bias = _fold(self.origin.weight, self.origin_bn, self.origin.bias)
        avg = average_kernel(self.out_channels if self.with_1x1 else self.in_channels, k,
                             g if self.with_1x1 else self.groups).to(kernel)
        if self.with_1x1:
            k1, b1 = _fold(self.conv_1x1.weight, self.conv_1x1_bn, self.conv_1x1.bias)
            kernel, bias = kernel + pad_to_kernel_size(k1, k), bias + b1
            first, first_bias = _fold(self.avg_1x1.weight, self.avg_pad.bn)
            # avg pool of (1x1 conv + bias): per-channel average, so compose then fold.
            avg_kernel = compose_1x1_kxk(first.flatten(1), avg, g)
            k_avg, b_avg = _fold(avg_kernel, self.avg_bn, _through_kernel(first_bias, avg))
        else:
            k_avg, b_avg = _fold(avg, self.avg_bn)
        kernel, bias = kernel + k_avg, bias + b_avg
        first = (self.expand_1x1_residual.flatten(1) + self.expand_identity)[..., None, None]
        first, first_bias = _fold(first, self.expand_pad.bn)
        k_exp = compose_1x1_kxk(first.flatten(1), self.expand_kxk.weight, g)
        k_exp, b_exp = _fold(
            k_exp, self.expand_bn,
            _plus(_through_kernel(first_bias, self.expand_kxk.weight), self.expand_kxk.bias))
        kernel, bias = kernel + k_exp, bias + b_exp
        if self.bias is not None:
            bias = bias + self.bias
        return kernel, bias


def _through_kernel(bias_in: Tensor, kernel: Tensor) -> Tensor:
    """Output bias of a conv ``kernel`` (O, C/g, k, k) applied to a constant map ``bias_in``."""
    out_channels, c_per_group = kernel.shape[:2]
    groups = bias_in.shape[0] // c_per_group
    per_group = bias_in.view(groups, 1, c_per_group)
    summed = kernel.sum((2, 3)).view(groups, out_channels // groups, c_per_group)
    return (summed * per_group).sum(-1).flatten()


def build_dbb_conv(in_channels, out_channels, kernel_size, *args, **kwargs):
    """``conv_cfg=dict(type='DBB')``: DBB for 3 x 3 / 5 x 5, a plain conv for 1 x 1 and >= 7,
    as in the authors' benchmark code (the host model's norm follows either)."""
    k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
    if k == 1 or k >= 7:
        return nn.Conv2d(in_channels, out_channels, kernel_size, *args, **kwargs)
    return DBBConv2d(in_channels, out_channels, kernel_size, *args, **kwargs)
