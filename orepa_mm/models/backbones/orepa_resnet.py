"""OREPA-ResNet: any OpenMMLab ResNet whose convs are OREPA convs, as in the paper.

The backbone stays the library's own ResNet (same arguments, defaults, stages, freezing,
norm_eval, with_cp, init_cfg); only two things differ:

* ``conv_cfg`` defaults to ``dict(type='OREPA')``, so every 3 x 3 (incl. a deep stem), 1 x 1 and
  the 7 x 7 stem conv is built as the matching OREPA block;
* BasicBlock (R18/R34) projection shortcuts stay plain conv + BN, as the authors did.

``switch_to_deploy()`` bakes every OREPA conv into a stock ``nn.Conv2d`` under the same name,
so the deployed state dict is the stock ResNet's. The per-library classes (mmdet, mmseg,
mmpretrain) are one-liners in :mod:`orepa_mm.registry`.
"""
import torch.nn as nn
from mmcv.cnn import build_conv_layer

from ...cnn import ReparamConv2d
from ...deploy import reparameterize_model


def _is_basic_block(block) -> bool:
    return any(cls.__name__ == 'BasicBlock' for cls in block.__mro__)


def _plain_conv_like(conv: ReparamConv2d) -> nn.Module:
    return build_conv_layer(None, conv.in_channels, conv.out_channels, conv.kernel_size,
                            stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                            groups=conv.groups, bias=conv.bias is not None)


class OREPAResNetMixin:
    """Mix in before a library's ResNet class to get its OREPA version."""

    def __init__(self, *args, conv_cfg=dict(type='OREPA'), **kwargs):
        super().__init__(*args, conv_cfg=conv_cfg, **kwargs)

    def make_res_layer(self, **kwargs):
        layer = super().make_res_layer(**kwargs)
        if _is_basic_block(kwargs['block']):
            for block in layer:
                shortcut = getattr(block, 'downsample', None)
                if shortcut is None:
                    continue
                for idx, module in enumerate(shortcut):
                    if isinstance(module, ReparamConv2d):
                        shortcut[idx] = _plain_conv_like(module)
        return layer

    def switch_to_deploy(self):
        """Bake every OREPA conv into a stock conv (idempotent); mmdeploy calls this."""
        reparameterize_model(self)
