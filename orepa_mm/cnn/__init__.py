"""Re-parameterizable conv types: OREPA (online) and the DBB baseline (offline)."""
from .dbb import DBBConv2d, build_dbb_conv
from .kernel_cache import cached_kernels
from .orepa import (KXK_BRANCHES, OREPA_VGG_BRANCHES, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d,
                    build_orepa_conv, build_orepa_vgg_conv)
from .reparam_conv import ReparamConv2d

__all__ = [
    'ReparamConv2d', 'OREPAConv2d', 'OREPAConv1x1', 'OREPALargeConv2d', 'build_orepa_conv',
    'DBBConv2d', 'build_dbb_conv', 'KXK_BRANCHES', 'OREPA_VGG_BRANCHES', 'build_orepa_vgg_conv',
    'cached_kernels'
]
