"""orepa_mm: OREPA (Online Convolutional Re-parameterization, CVPR 2022) for OpenMMLab.

``import orepa_mm`` (or ``custom_imports=dict(imports=['orepa_mm'])`` in a config) registers
the conv types (``conv_cfg=dict(type='OREPA')``, ``'OREPAVGGConv'``, ``'DBB'``) and the
backbones (``OREPAResNet``, ``OREPAResNetV1c``, ``OREPAResNetV1d``, ``OREPAVGG``) into the
registries of mmcv/mmengine, mmdet, mmseg and mmpretrain, and makes mmengine's checkpoint
loader accept runner checkpoints under torch >= 2.6 without unpickling arbitrary objects.
"""
from .cnn import cached_kernels
from .deploy import count_reparameterizable, reparameterize_model
from .engine import BF16OptimWrapper  # noqa: F401  (registers the CPU --amp wrapper)
from .registry import register_all_modules
from .utils.checkpoint_io import register_safe_checkpoint_loader

__version__ = '0.1.0'
__all__ = [
    'reparameterize_model', 'count_reparameterizable', 'cached_kernels', 'register_all_modules',
    'register_safe_checkpoint_loader'
]

register_all_modules()
register_safe_checkpoint_loader()
