"""Conv biases the stock model has no place for, folded into the BatchNorm after the conv.

A DBB layer bakes into a conv *with* a bias (each of its branches ends in a BN), but the stock
structures DBB is dropped into through ``conv_cfg`` build that conv with ``bias=False``, since a
BN follows it (``ResNet(conv_cfg=dict(type='DBB'))``). The bias is not lost: in eval mode
``BN(conv(x) + b)`` with running mean ``m`` is exactly ``BN(conv(x))`` with running mean
``m - b`` (in train mode the batch mean absorbs ``b`` just as well), so it moves into that BN and
the baked model gets the stock state dict.

Only pairs that the stock code runs one right after the other are folded:

* mmdet / mmseg / mmpretrain ``ResNet`` and their ``BasicBlock`` / ``Bottleneck`` (and
  subclasses): ``convN -> normN`` (the stem's ``conv1 -> norm1``, the blocks' ``conv1..3``);
* ``nn.Sequential`` (plain forward): child ``i`` -> child ``i + 1``, which covers the deep stem
  (``stem.0 -> stem.1``) and ``downsample.0 -> downsample.1`` (``.1 -> .2`` with ``avg_down``);
* mmcv's ``ConvModule`` whose ``order`` runs ``conv`` then ``norm``.

Anywhere else a bias without a place is refused (:class:`BiasFoldError`), because nothing
proves that a BN, if any, sees the conv's output unchanged.
"""
import importlib
import re
from typing import Collection, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Modules whose ``convN`` feeds ``normN`` directly (stem and residual blocks).
_RESNET_MODULES = ('mmdet.models.backbones.resnet', 'mmseg.models.backbones.resnet',
                   'mmpretrain.models.backbones.resnet')
_RESNET_CLASSES = ('ResNet', 'BasicBlock', 'Bottleneck')


class BiasFoldError(ValueError):
    """A baked conv has a bias the stock model lacks and no BN after it (one sentence)."""


def _resnet_classes() -> Tuple[type, ...]:
    found = []
    for module_name in _RESNET_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.extend(getattr(module, name) for name in _RESNET_CLASSES if hasattr(module, name))
    return tuple(found)


def _next_in_sequential(parent: nn.Sequential, leaf: str) -> Optional[nn.Module]:
    if type(parent).forward is not nn.Sequential.forward:
        return None  # a subclass with its own forward may not chain its children
    names = list(parent._modules)
    index = names.index(leaf)
    return parent._modules[names[index + 1]] if index + 1 < len(names) else None


def _next_in_conv_module(parent: nn.Module) -> Optional[nn.Module]:
    order = tuple(getattr(parent, 'order', ()))
    if not getattr(parent, 'with_norm', False) or 'conv' not in order or 'norm' not in order:
        return None
    if order.index('norm') != order.index('conv') + 1:
        return None
    return parent.norm


def following_batch_norm(model: nn.Module, name: str) -> Optional[_BatchNorm]:
    """The BN that the stock code applies right after the conv ``name`` of ``model``; None
    when the structure is not one of those listed in the module docstring."""
    from mmcv.cnn import ConvModule
    parent_name, _, leaf = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    norm = None
    if isinstance(parent, nn.Sequential):
        norm = _next_in_sequential(parent, leaf)
    elif isinstance(parent, ConvModule) and leaf == 'conv':
        norm = _next_in_conv_module(parent)
    else:
        index = re.fullmatch(r'conv(\d+)', leaf)
        if index and isinstance(parent, _resnet_classes()):
            norm = getattr(parent, f'norm{index[1]}', None)
    return norm if isinstance(norm, _BatchNorm) else None


@torch.no_grad()
def fold_bias_into_batch_norm(conv: nn.Module, norm: _BatchNorm) -> None:
    """``running_mean -= conv.bias`` (in float64, then cast), then drop the conv's bias.

    A BN without running statistics always normalises by the batch mean, which absorbs the
    bias by itself: the bias is dropped only.
    """
    if norm.running_mean is not None:
        mean = norm.running_mean.double() - conv.bias.detach().double()
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
    conv.bias = None  # registers the parameter as None: not in the state dict any more


def fold_conv_biases(model: nn.Module, stock_keys: Collection[str]) -> List[str]:
    """Fold, in place, the bias of each conv of ``model`` whose ``<name>.bias`` is not among
    ``stock_keys`` (the stock model's state-dict keys) into the BN after it.

    Returns the names of the convs folded. Raises :class:`BiasFoldError` (nothing changed) when
    such a conv has no BN right after it in a known structure.
    """
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd) or module.bias is None:
            continue
        if f'{name}.bias' in stock_keys:
            continue
        norm = following_batch_norm(model, name)
        if norm is None:
            raise BiasFoldError(
                f'{name} bakes into a conv with a bias that the stock model lacks, and no '
                'BatchNorm follows it in a structure orepa_mm can fold into (a ResNet '
                'convN -> normN, a Sequential, a ConvModule conv -> norm); build that conv with '
                'bias=True or put a BN after it')
        pairs.append((name, module, norm))
    for _, conv, norm in pairs:
        fold_bias_into_batch_norm(conv, norm)
    return [name for name, _, _ in pairs]
