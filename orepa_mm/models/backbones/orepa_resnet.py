"""OREPA-ResNet: any OpenMMLab ResNet whose convs are OREPA convs, as in the paper.

The backbone stays the library's own ResNet (same arguments, defaults, stages, freezing,
norm_eval, with_cp, init_cfg, plugins, DCN stages); only three things differ:

* ``conv_cfg`` defaults to ``dict(type='OREPA')``, so every 3 x 3 (incl. a deep stem), 1 x 1 and
  the 7 x 7 stem conv is built as the matching OREPA block;
* BasicBlock (R18/R34) projection shortcuts stay plain conv + BN, as the authors did;
* in stages with ``dcn`` (``stage_with_dcn``), the deformable conv2 of each Bottleneck stays the
  library's DCN / DCNv2 and every other conv of the stage is OREPA. (The libraries' Bottleneck
  asserts ``conv_cfg must be None for DCN``, so such a stage is built with ``conv_cfg=None`` and
  its conv1 / conv3 / shortcut convs, and conv2 where ``fallback_on_stride`` keeps it a plain
  conv, are then rebuilt as ``conv_cfg`` layers under the same names.) An OREPA checkpoint
  without DCN (the converted official one) initialises each DCN conv2 with its squeezed kernel.

Plugins (ContextBlock, GeneralizedAttention, NonLocal2d, ...) are built by the library from
their own configs and stay stock. ``switch_to_deploy()`` bakes every OREPA conv into a stock
``nn.Conv2d`` under the same name, so the deployed state dict is the stock ResNet's (built with
the same ``dcn`` / ``plugins`` / ``norm_cfg``). The per-library classes (mmdet, mmseg,
mmpretrain) are one-liners in ``for_<library>.py``.
"""
from functools import partial

import torch.nn as nn
from mmcv.cnn import build_conv_layer

from ...cnn import ReparamConv2d
from ...deploy import reparameterize_model

#: The Bottleneck / BasicBlock attributes a ResNet block builds with its ``conv_cfg``
#: (plugins and the DCN conv2 are built from their own configs).
BLOCK_CONVS = ('conv1', 'conv2', 'conv3')


def _is_basic_block(block) -> bool:
    return any(cls.__name__ == 'BasicBlock' for cls in block.__mro__)


def _conv_like(conv: nn.Module, conv_cfg, bias=None) -> nn.Module:
    """A ``conv_cfg`` layer with ``conv``'s geometry (fresh weights)."""
    bias = conv.bias is not None if bias is None else bias
    return build_conv_layer(
        conv_cfg,
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=bias)


def _load_squeezed_kernel(module, state_dict, prefix, *args, conv_cfg=None):
    """Load-state-dict pre-hook of a DCN conv: an OREPA checkpoint's conv2 -> its kernel.

    A checkpoint of an OREPA ResNet (the converted official one, or one trained without DCN)
    holds conv2 as branch tensors; the DCN conv starts from their squeezed kernel (baked in
    float64), as it would from a stock checkpoint's ``conv2.weight``. Its offset conv is not in
    such a checkpoint and keeps its zero init (the libraries' own behaviour with stock weights).
    """
    if prefix + 'weight' in state_dict:
        return
    source = _conv_like(module, conv_cfg, bias=False)
    keys = list(source.state_dict())
    if not all(prefix + key in state_dict for key in keys):
        return  # not an OREPA conv2: reported as missing / unexpected keys as usual
    source.load_state_dict({key: state_dict.pop(prefix + key) for key in keys}, strict=True)
    state_dict[prefix + 'weight'] = source.to_conv2d().weight.detach()


def _rebuild_plain_convs(layer: nn.Sequential, conv_cfg) -> None:
    """Rebuild, under the same names, the plain convs a stage built with ``conv_cfg=None``.

    Only the convs the block builds with its ``conv_cfg`` (conv1/conv2/conv3 that are exactly
    ``nn.Conv2d``, and the shortcut conv) are touched: DCN convs and plugins keep theirs, and
    each DCN conv2 gets the pre-hook that loads an OREPA checkpoint's conv2 as its kernel.
    """
    for block in layer:
        for name in BLOCK_CONVS:
            conv = getattr(block, name, None)
            if type(conv) is nn.Conv2d:
                setattr(block, name, _conv_like(conv, conv_cfg))
            elif name == 'conv2' and getattr(block, 'with_dcn', False):
                conv.register_load_state_dict_pre_hook(
                    partial(_load_squeezed_kernel, conv_cfg=conv_cfg))
        shortcut = getattr(block, 'downsample', None)
        for idx, module in enumerate(shortcut if shortcut is not None else ()):
            if type(module) is nn.Conv2d:
                shortcut[idx] = _conv_like(module, conv_cfg)
        if hasattr(block, 'conv_cfg'):
            block.conv_cfg = conv_cfg


class OREPAResNetMixin:
    """Mix in before a library's ResNet class to get its OREPA version."""

    #: ``switch_to_deploy`` is orepa_mm's walk (see :func:`orepa_mm.deploy.check_structural_block`).
    deploys_by_walk = True

    def __init__(self, *args, conv_cfg=dict(type='OREPA'), **kwargs):
        super().__init__(*args, conv_cfg=conv_cfg, **kwargs)

    def make_res_layer(self, **kwargs):
        conv_cfg = kwargs.get('conv_cfg')
        if kwargs.get('dcn') is not None and conv_cfg is not None:
            # The library's Bottleneck only builds DCN with conv_cfg=None.
            layer = super().make_res_layer(**dict(kwargs, conv_cfg=None))
            _rebuild_plain_convs(layer, conv_cfg)
        else:
            layer = super().make_res_layer(**kwargs)
        if _is_basic_block(kwargs['block']):
            for block in layer:
                shortcut = getattr(block, 'downsample', None)
                if shortcut is None:
                    continue
                for idx, module in enumerate(shortcut):
                    if isinstance(module, ReparamConv2d):
                        shortcut[idx] = _conv_like(module, None)
        return layer

    def switch_to_deploy(self):
        """Bake every OREPA conv into a stock conv (idempotent); mmdeploy calls this."""
        reparameterize_model(self)
