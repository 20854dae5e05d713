"""OREPA conv layers: the linear multi-branch block squeezed into one kernel every step.

Three blocks, chosen by kernel size exactly as the authors' code does (see ``build_orepa_conv``):

* :class:`OREPAConv2d`   k x k (odd k >= 3): up to six branches, each scaled per output channel.
* :class:`OREPAConv1x1`  1 x 1: origin + an identity-initialised linear 1x1-1x1 pair.
* :class:`OREPALargeConv2d`  k >= 7: the linear deep stem, (k-1)/2 stacked 3 x 3 OREPA kernels
  composed into one k x k kernel.

None has a norm layer of its own: the host model's norm after the conv is the single post-sum BN
that OREPA's linearization needs. Loading a stock ``<prefix>weight`` (torchvision, a deployed
checkpoint) initialises a layer so that its squeezed kernel equals that weight exactly.
"""
import math
from typing import Dict, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .kernels import compose_stacked, frequency_prior, grouped_identity, pad_to_kernel_size
from .kxk_kernel import KxKBranches, kxk_kernel
from .pointwise_kernel import pointwise_kernel
from .reparam_conv import ReparamConv2d

#: The k x k block's branches, in the row order of its scale vector (the authors' order).
KXK_BRANCHES = ('origin', 'avg', 'prior', '1x1_kxk', '1x1', 'dws')
#: Branches that are a learned 1x1 matrix times a fixed k x k pattern, and their parameter,
#: in KXK_BRANCHES order (the order of the patterns in KxKBranches).
SMALL_BRANCH_PARAMS = {'avg': 'avg_1x1', 'prior': 'prior_1x1', '1x1': 'conv_1x1'}
#: Published initial value of each branch's scale vector.
KXK_SCALE_INIT = {'origin': 0.25, 'avg': 0.25, 'prior': 0.0, '1x1_kxk': 0.5, '1x1': 1.0, 'dws': 0.5}


def _init_kaiming(param: Tensor, a: float, gain: float = 1.0):
    nn.init.kaiming_uniform_(param, a=a)
    if gain != 1.0:
        param.data.mul_(gain)


def _branch_state(layer: nn.Module) -> Dict[str, Tensor]:
    """Copies of the layer's branch parameters (every parameter but ``bias``), by name, with
    non-finite values (a diverged run) set to 0: a stock weight loads with every other branch
    scaled to 0, which is exact only for finite branches (0 * NaN is NaN)."""
    state = {}
    for name, p in layer.named_parameters():
        if name == 'bias':
            continue
        if p.is_meta:
            raise ValueError(f'{type(layer).__name__}.{name} is on the meta device, so a stock '
                             'weight cannot be loaded around it; materialise the model first '
                             '(model.to_empty(device=...), then init_weights()).')
        state[name] = torch.nan_to_num(p.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    return state


class _StockWeightLoadingMixin:
    """Turns a stock ``<prefix>weight`` in a state dict into this layer's branch parameters.

    Used when a torchvision / mm ResNet checkpoint or a deployed checkpoint initialises an
    OREPA model: the origin branch carries the weight, every other branch's scale is zero, and
    all other branch parameters keep their current values (so nothing is reported missing).
    """

    def stock_state(self, weight: Tensor) -> Dict[str, Tensor]:
        """Branch tensors (names relative to this module) whose kernel equals ``weight``: the
        origin is ``weight``, its scale 1, every other branch's scale row 0. ``bias`` is not
        a branch: a stock checkpoint's ``bias`` loads as it is."""
        state = _branch_state(self)
        state['origin'] = weight
        # A real (O-strided) tensor: an expanded view would share memory across channels,
        # and an optimizer step on it (after load_state_dict(assign=True)) would fail.
        scales = torch.zeros_like(self.branch_scales)
        scales[0] = 1.0
        state['branch_scales'] = scales
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        stock_key = prefix + 'weight'
        if stock_key in state_dict and (prefix + 'origin') not in state_dict:
            weight = state_dict.pop(stock_key)
            expected = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            if tuple(weight.shape) != expected:
                error_msgs.append(f'size mismatch for {stock_key}: copying a param with shape '
                                  f'{tuple(weight.shape)}, the {type(self).__name__} layer '
                                  f'expects {expected}.')
            else:
                for name, value in self.stock_state(weight).items():
                    state_dict[prefix + name] = value
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class OREPAConv2d(_StockWeightLoadingMixin, ReparamConv2d):
    """The k x k OREPA block (k odd, >= 3).

    Branches (rows of ``branch_scales``, in this order, those listed in ``branches``):
    origin kxk; 1x1 then kxk average; 1x1 times a fixed frequency prior; 1x1 then kxk
    (first factor = identity + a zero-initialised residual); 1x1 (centred); depthwise kxk
    expanding each channel ``expand_ratio`` times then pointwise.

    Args:
        branches: which branches to build. RepVGG's dense branch drops '1x1' (RepVGG keeps its
            own 1x1 and identity branches).
        internal_channels: width T of the 1x1->kxk branch; default in_channels when
            groups <= 4 else 2 * in_channels, as published.
        expand_ratio: channel expansion of the depthwise-separable branch (8, as published).
        kaiming_a: negative slope of the Kaiming-uniform init (0 in OREPA, 1 in OREPA-VGG).
        kernel_init_gain: multiplies the initial branch weights (authors' ``init_hyper_para``).
        scale_init_gain: the initial scales are multiplied by its square root
            (authors' ``init_hyper_gamma``).
        single_init: start with origin scale 1 and every other scale 0 (authors' option).
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size=3,
                 stride=1,
                 padding=None,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = False,
                 branches: Sequence[str] = KXK_BRANCHES,
                 internal_channels=None,
                 expand_ratio: int = 8,
                 kaiming_a: float = 0.0,
                 kernel_init_gain: float = 1.0,
                 scale_init_gain: float = 1.0,
                 single_init: bool = False,
                 init_cfg=None):
        k = kernel_size if isinstance(kernel_size, int) else kernel_size[0]
        if k < 3 or k % 2 == 0:
            raise ValueError(f'OREPAConv2d needs an odd kernel size >= 3, got {kernel_size}; '
                             'use OREPAConv1x1 for 1 x 1 convs.')
        if padding is None:
            padding = dilation * (k // 2)
        super().__init__(in_channels, out_channels, k, stride, padding, dilation, groups, bias,
                         init_cfg)
        unknown = set(branches) - set(KXK_BRANCHES)
        if unknown or 'origin' not in branches:
            raise ValueError(f'branches must include "origin" and come from {KXK_BRANCHES}, '
                             f'got {tuple(branches)}.')
        self.branches = tuple(b for b in KXK_BRANCHES if b in branches)
        self.internal_channels = internal_channels or (in_channels if groups <= 4 else 2 *
                                                       in_channels)
        self.expand_ratio = expand_ratio
        i_g, t = in_channels // groups, self.internal_channels
        o, e = out_channels, expand_ratio

        self.origin = nn.Parameter(torch.empty(o, i_g, k, k))
        if 'avg' in self.branches:
            self.avg_1x1 = nn.Parameter(torch.empty(o, i_g, 1, 1))
        if 'prior' in self.branches:
            self.prior_1x1 = nn.Parameter(torch.empty(o, i_g, 1, 1))
        if '1x1_kxk' in self.branches:
            # The first factor is identity + this residual, so it starts as the identity.
            self.expand_1x1_residual = nn.Parameter(torch.zeros(t, i_g, 1, 1))
            self.expand_kxk = nn.Parameter(torch.empty(o, t // groups, k, k))
        if '1x1' in self.branches:
            self.conv_1x1 = nn.Parameter(torch.empty(o, i_g, 1, 1))
        if 'dws' in self.branches:
            self.dw_kxk = nn.Parameter(torch.empty(in_channels * e, 1, k, k))
            self.pw_1x1 = nn.Parameter(torch.empty(o, in_channels * e // groups, 1, 1))
        self.branch_scales = nn.Parameter(torch.empty(len(self.branches), o))
        self.small_branches = tuple(b for b in self.branches if b in SMALL_BRANCH_PARAMS)
        for name, value in self._constant_buffers().items():
            self.register_buffer(name, value, persistent=False)
        self.reset_parameters(kaiming_a, kernel_init_gain, scale_init_gain, single_init)

    def _constant_buffers(self) -> Dict[str, Tensor]:
        o, k = self.out_channels, self.kernel_size[0]
        constants = {'small_patterns': None}
        if '1x1_kxk' in self.branches:
            constants['expand_identity'] = grouped_identity(self.internal_channels,
                                                            self.in_channels // self.groups)
        if self.small_branches:
            # Fixed spatial patterns (nb, O, k*k) of the branches that are a 1x1 matrix times a
            # pattern: average, frequency prior, centred 1x1.
            patterns = {
                'avg': torch.full((o, k * k), 1.0 / (k * k)),
                'prior': frequency_prior(o, k).flatten(1),
                '1x1': pad_to_kernel_size(torch.ones(o, 1, 1), k).flatten(1)
            }
            constants['small_patterns'] = torch.stack([patterns[b] for b in self.small_branches])
        return constants

    def reset_parameters(self,
                         kaiming_a=0.0,
                         kernel_init_gain=1.0,
                         scale_init_gain=1.0,
                         single_init=False):
        """The published initialisation (Kaiming-uniform branches, fixed scale vectors)."""
        for name in ('origin', 'avg_1x1', 'prior_1x1', 'expand_kxk', 'conv_1x1'):
            if hasattr(self, name):
                _init_kaiming(getattr(self, name), kaiming_a, kernel_init_gain)
        if hasattr(self, 'dw_kxk'):
            # A product of two factors: each gets the square root of the gain.
            _init_kaiming(self.dw_kxk, kaiming_a, math.sqrt(kernel_init_gain))
            _init_kaiming(self.pw_1x1, kaiming_a, math.sqrt(kernel_init_gain))
        with torch.no_grad():
            for row, name in enumerate(self.branches):
                value = KXK_SCALE_INIT[name] * math.sqrt(scale_init_gain)
                if single_init:
                    value = 1.0 if name == 'origin' else 0.0
                self.branch_scales[row].fill_(value)

    def scale(self, branch: str) -> Tensor:
        """The (O,) scale vector of a branch."""
        return self.branch_scales[self.branches.index(branch)]

    @property
    def prior(self) -> Tensor:
        """The fixed frequency-prior patterns D (O, k, k) of the 'prior' branch."""
        k = self.kernel_size[0]
        return self.small_patterns[self.small_branches.index('prior')].view(-1, k, k)

    def generate_kernel(self) -> Tensor:
        row = {branch: r for r, branch in enumerate(self.branches)}  # rows of branch_scales
        return kxk_kernel(
            KxKBranches(
                origin=self.origin,
                branch_scales=self.branch_scales,
                avg_1x1=getattr(self, 'avg_1x1', None),
                prior_1x1=getattr(self, 'prior_1x1', None),
                centre_1x1=getattr(self, 'conv_1x1', None),
                patterns=self.small_patterns,
                expand_residual=getattr(self, 'expand_1x1_residual', None),
                expand_identity=getattr(self, 'expand_identity', None),
                expand_kxk=getattr(self, 'expand_kxk', None),
                depthwise=getattr(self, 'dw_kxk', None),
                pointwise=getattr(self, 'pw_1x1', None),
                pattern_rows=tuple(row[b] for b in self.small_branches),
                expand_row=row.get('1x1_kxk'),
                dws_row=row.get('dws')), self.groups)


class OREPAConv1x1(_StockWeightLoadingMixin, ReparamConv2d):
    """The 1 x 1 OREPA block: origin + a linear 1x1-1x1 pair whose square factor starts as I.

    Published for groups = 1 only (bottleneck 1x1 convs and projection shortcuts); grouped
    1 x 1 convs are refused with a clear error (build them with ``conv_cfg=None``).
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size=1,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = False,
                 kaiming_a: float = 1.0,
                 single_init: bool = False,
                 init_cfg=None):
        if _pair_first(kernel_size) != 1:
            raise ValueError(f'OREPAConv1x1 needs kernel_size 1, got {kernel_size}.')
        if groups != 1:
            raise ValueError(f'OREPA 1x1 blocks support groups=1 only (as published), got '
                             f'groups={groups}; build this layer with conv_cfg=None.')
        super().__init__(in_channels, out_channels, 1, stride, padding, dilation, groups, bias,
                         init_cfg)
        o, i = out_channels, in_channels
        self.origin = nn.Parameter(torch.empty(o, i, 1, 1))
        # The square factor of the pair is the identity: (I, I) first when O > I, else (O, O).
        inner = i if o > i else o
        self.linear_first = nn.Parameter(torch.empty(inner, i, 1, 1))
        self.linear_second = nn.Parameter(torch.empty(o, inner, 1, 1))
        self.branch_scales = nn.Parameter(torch.empty(2, o))
        self.reset_parameters(kaiming_a, single_init)

    def reset_parameters(self, kaiming_a=1.0, single_init=False):
        _init_kaiming(self.origin, kaiming_a)
        with torch.no_grad():
            if self.out_channels > self.in_channels:
                self.linear_first.copy_(torch.eye(self.in_channels).view_as(self.linear_first))
                _init_kaiming(self.linear_second, kaiming_a)
            else:
                _init_kaiming(self.linear_first, kaiming_a)
                self.linear_second.copy_(torch.eye(self.out_channels).view_as(self.linear_second))
            self.branch_scales[0].fill_(1.0)
            self.branch_scales[1].fill_(0.0 if single_init else 0.5)

    def generate_kernel(self) -> Tensor:
        kernel = pointwise_kernel(
            self.origin.flatten(1), self.branch_scales, self.linear_second.flatten(1),
            self.linear_first.flatten(1))
        return kernel.view(self.out_channels, self.in_channels, 1, 1)


class OREPALargeConv2d(_StockWeightLoadingMixin, ReparamConv2d):
    """The linear deep stem: (k-1)/2 stacked 3 x 3 OREPA kernels composed into one k x k kernel.

    Internal width is out_channels; the stride and dilation apply once, to the composed
    kernel (groups = 1, as published for the ResNet stem). ``origin`` is a direct k x k kernel
    scaled by ``origin_scale``; both start at zero, a bilinear pair whose gradients are zero
    there, so from-scratch training is exactly the published block. A stock k x k weight loads
    into them (origin scale 1, stacked path scaled to zero) so that the kernel equals it.
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size=7,
                 stride=1,
                 padding=None,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = False,
                 init_cfg=None,
                 **orepa_kwargs):
        k = _pair_first(kernel_size)
        if k < 5 or k % 2 == 0:
            raise ValueError(f'OREPALargeConv2d needs an odd kernel size >= 5, got {kernel_size}.')
        if groups != 1:
            raise ValueError(f'The OREPA large-kernel block supports groups=1 only (as '
                             f'published), got groups={groups}.')
        if padding is None:
            padding = dilation * (k // 2)
        super().__init__(in_channels, out_channels, k, stride, padding, dilation, groups, bias,
                         init_cfg)
        num_layers = (k - 1) // 2
        widths = [in_channels] + [out_channels] * num_layers
        self.stem_layers = nn.ModuleList(
            OREPAConv2d(widths[n], widths[n + 1], 3, **orepa_kwargs) for n in range(num_layers))
        self.origin = nn.Parameter(torch.zeros(out_channels, in_channels, k, k))
        self.origin_scale = nn.Parameter(torch.zeros(out_channels))

    def generate_kernel(self) -> Tensor:
        kernel = self.stem_layers[0].generate_kernel()
        for layer in self.stem_layers[1:]:
            kernel = compose_stacked(kernel, layer.generate_kernel())
        # Contiguous like a stock conv's weight (composing transposes): weight.view(-1) works.
        return (kernel + self.origin * self.origin_scale.view(-1, 1, 1, 1)).contiguous()

    def stock_state(self, weight: Tensor) -> Dict[str, Tensor]:
        state = _branch_state(self)
        state['origin'] = weight
        state['origin_scale'] = torch.ones_like(self.origin_scale)
        last = f'stem_layers.{len(self.stem_layers) - 1}.branch_scales'
        state[last] = torch.zeros_like(state[last])
        return state


def _pair_first(kernel_size) -> int:
    return kernel_size if isinstance(kernel_size, int) else kernel_size[0]


def build_orepa_conv(in_channels: int, out_channels: int, kernel_size, *args, **kwargs):
    """``conv_cfg=dict(type='OREPA')``: the block the authors use for this kernel size.

    1 -> :class:`OREPAConv1x1`; 3 or 5 -> :class:`OREPAConv2d`; >= 7 -> :class:`OREPALargeConv2d`.
    Extra config keys (``branches``, ``kaiming_a``, ...) go to the chosen block.
    """
    k = _pair_first(kernel_size)
    if k == 1:
        block = OREPAConv1x1
    elif k >= 7:
        block = OREPALargeConv2d
    else:
        block = OREPAConv2d
    return block(in_channels, out_channels, kernel_size, *args, **kwargs)


#: OREPA-VGG's dense branch: RepVGG keeps its own 1 x 1 and identity branches.
OREPA_VGG_BRANCHES = ('origin', 'avg', 'prior', '1x1_kxk', 'dws')


def build_orepa_vgg_conv(in_channels: int, out_channels: int, kernel_size, *args, **kwargs):
    """``conv_cfg=dict(type='OREPAVGGConv')``: the conv type of a RepVGG block in OREPA-VGG.

    k x k -> :class:`OREPAConv2d` with the five OREPA-VGG branches and the authors' OREPA-VGG
    init (Kaiming a = 1); 1 x 1 (RepVGG's own 1x1 branch) -> a plain ``nn.Conv2d``.
    """
    if _pair_first(kernel_size) == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, *args, **kwargs)
    kwargs.setdefault('branches', OREPA_VGG_BRANCHES)
    kwargs.setdefault('kaiming_a', 1.0)
    return OREPAConv2d(in_channels, out_channels, kernel_size, *args, **kwargs)
