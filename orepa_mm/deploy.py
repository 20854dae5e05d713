"""Deployment: turn every orepa_mm re-param layer of any model into a stock ``nn.Conv2d``.

Duck-typed like timm's ``reparameterize_model``: any module with ``to_conv2d()`` is replaced,
under the same attribute name, by the conv it returns, so state-dict keys become the stock ones
(``...conv2.weight``) and the deployed model needs no orepa_mm at inference time.

Structural re-param blocks that hold re-param layers (mmpretrain's ``RepVGGBlock`` built with
``conv_cfg=dict(type='OREPA')``, OREPA-VGG) are deployed too, with their own
``switch_to_deploy()``: they fuse their branches into a conv they build with the same
``conv_cfg`` (so again a re-param layer, which takes the fused kernel through its writable
``weight``), and that conv is baked in turn. This is the one deploy walk of orepa_mm: the
backbones' ``switch_to_deploy`` and ``tools/reparameterize.py`` call it.
"""
import sys
from typing import Iterator, List, Tuple

import torch.nn as nn
from mmengine.utils import ProgressBar


def is_reparameterizable(module: nn.Module) -> bool:
    """Whether ``module`` is an orepa_mm re-param layer (has ``to_conv2d``)."""
    return callable(getattr(module, 'to_conv2d', None))


def has_own_deploy_step(module: nn.Module) -> bool:
    """Whether ``module`` is an orepa_mm module with a deploy step of its own
    (``switch_to_deploy``: OREPAVGG's branch fusion), which a model may need with no re-param
    layer in it (an OREPAVGG built with stock convs)."""
    return (type(module).__module__.startswith('orepa_mm.')
            and callable(getattr(module, 'switch_to_deploy', None)))


def reparam_sites(module: nn.Module) -> Iterator[Tuple[nn.Module, str, nn.Module]]:
    """(parent, name, layer) of every outermost re-param layer under ``module``."""
    for name, child in module.named_children():
        if is_reparameterizable(child):
            yield module, name, child
        else:
            yield from reparam_sites(child)


def _structural_blocks(module: nn.Module) -> List[nn.Module]:
    """Outermost descendants with their own ``switch_to_deploy`` that hold re-param layers."""
    found = []
    for child in module.children():
        if is_reparameterizable(child):
            continue
        if callable(getattr(child, 'switch_to_deploy', None)) and count_reparameterizable(child):
            found.append(child)
        else:
            found.extend(_structural_blocks(child))
    return found


def check_structural_block(block: nn.Module) -> None:
    """Refuse a structural block whose fusion would be silently wrong.

    Such blocks (RepVGG's) fuse their branches by reading each branch conv's ``weight`` and
    writing the result into a conv of their ``conv_cfg``; they ignore conv biases. A re-param
    layer with ``folds_bias = True`` (DBB: its branch BatchNorms fold into a bias) would lose it.
    Blocks whose ``switch_to_deploy`` is this walk (``deploys_by_walk``: OREPAResNet) bake
    biases as they are.
    """
    if getattr(block, 'deploys_by_walk', False):
        return
    for name, layer in block.named_modules():
        if getattr(layer, 'folds_bias', False):
            raise TypeError(f'{type(block).__name__} cannot be deployed with the '
                            f'{type(layer).__name__} layer at {name or "its root"}, because its '
                            "branch fusion drops the bias that layer folds from its BatchNorms; "
                            "train it with conv_cfg=dict(type='OREPA') or conv_cfg=None instead.")


def _bake(model: nn.Module, bar) -> int:
    sites = list(reparam_sites(model))
    for parent, name, layer in sites:
        setattr(parent, name, layer.to_conv2d())
        if bar is not None:
            bar.update()
    return len(sites)


def reparameterize_model(model: nn.Module, progress: bool = False) -> nn.Module:
    """Replace, in place, every re-param layer of ``model`` by its baked ``nn.Conv2d``.

    Kernels are computed in float64 and cast back to each layer's dtype. Structural re-param
    blocks holding re-param layers are switched to deploy (see the module docstring).
    Idempotent (a deployed model has nothing left to replace). ``progress`` shows mmengine's
    progress bar, one step per layer. Returns ``model``; a model that is itself a re-param
    layer cannot be replaced in place, so its conv is returned instead.
    """
    if is_reparameterizable(model):
        return model.to_conv2d()
    blocks = _structural_blocks(model)
    for block in blocks:
        check_structural_block(block)
    total = len(list(reparam_sites(model)))
    bar = ProgressBar(total, file=sys.stdout) if progress and total else None
    _bake(model, bar)
    for block in blocks:
        block.switch_to_deploy()
    _bake(model, None)  # the convs those blocks fused their branches into
    if bar is not None:
        sys.stdout.write('\n')
    return model


def count_reparameterizable(model: nn.Module) -> int:
    """Number of re-param layers in ``model`` (0 once deployed)."""
    return sum(is_reparameterizable(m) for m in model.modules())
