"""Registration of orepa_mm into the OpenMMLab registries, done once on ``import orepa_mm``.

* Conv types go into mmengine's root ``MODELS`` registry, where mmcv's ``build_conv_layer``
  finds them from any scope (mmdet, mmseg, mmpretrain or none): ``OREPA``, ``OREPAVGGConv``,
  ``DBB`` and the explicit block classes.
* Backbones go into the ``MODELS`` registry of each of mmdet, mmseg and mmpretrain that is
  importable, under the same names, so ``custom_imports=dict(imports=['orepa_mm'])`` in a
  config of any of them makes ``type='OREPAResNet'`` (etc.) available.
* mmpretrain's ``RepVGGBlock.switch_to_deploy`` is made to bake the OREPA layers it leaves
  (see :func:`~orepa_mm.models.backbones.orepa_vgg.make_repvgg_blocks_deploy_to_stock_convs`).

Registration is idempotent: a second call (re-import, reload in tests) changes nothing.
"""
import importlib.util
from typing import List

from mmengine.registry import MODELS as ROOT_MODELS

from .cnn import (DBBConv2d, OREPAConv1x1, OREPAConv2d, OREPALargeConv2d, build_dbb_conv,
                  build_orepa_conv, build_orepa_vgg_conv)

CONV_TYPES = {
    'OREPA': build_orepa_conv,
    'OREPAVGGConv': build_orepa_vgg_conv,
    'DBB': build_dbb_conv,
    'OREPAConv2d': OREPAConv2d,
    'OREPAConv1x1': OREPAConv1x1,
    'OREPALargeConv2d': OREPALargeConv2d,
    'DBBConv2d': DBBConv2d,
}


def _register(registry, name, module):
    if registry.get(name) is not module and name not in registry.module_dict:
        registry.register_module(name=name, module=module)


def register_all_modules() -> List[str]:
    """Register conv types and backbones; returns the libraries whose registries were filled."""
    for name, module in CONV_TYPES.items():
        _register(ROOT_MODELS, name, module)
    filled = []
    if importlib.util.find_spec('mmpretrain') is None:
        return filled  # OREPAVGG builds on mmpretrain's RepVGG
    for library in ('mmdet', 'mmseg', 'mmpretrain'):
        if importlib.util.find_spec(library) is None:
            continue
        registry = importlib.import_module(f'{library}.registry').MODELS
        backbones = importlib.import_module(f'orepa_mm.models.backbones.for_{library}')
        for name, cls in backbones.BACKBONES.items():
            _register(registry, name, cls)
        filled.append(library)
    from .models.backbones.orepa_vgg import make_repvgg_blocks_deploy_to_stock_convs
    make_repvgg_blocks_deploy_to_stock_convs()
    return filled
