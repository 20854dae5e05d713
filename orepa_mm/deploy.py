"""Deployment: turn every orepa_mm re-param layer of any model into a stock ``nn.Conv2d``.

Duck-typed like timm's ``reparameterize_model``: any module with ``to_conv2d()`` is replaced,
under the same attribute name, by the conv it returns, so state-dict keys become the stock ones
(``...conv2.weight``) and the deployed model needs no orepa_mm at inference time.
"""
import torch.nn as nn


def is_reparameterizable(module: nn.Module) -> bool:
    """Whether ``module`` is an orepa_mm re-param layer (has ``to_conv2d``)."""
    return callable(getattr(module, 'to_conv2d', None))


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Replace, in place, every re-param layer of ``model`` by its baked ``nn.Conv2d``.

    Kernels are computed in float64 and cast back to each layer's dtype. Idempotent (a deployed
    model has nothing left to replace). Returns ``model``; a model that is itself a re-param
    layer cannot be replaced in place, so its conv is returned instead.
    """
    if is_reparameterizable(model):
        return model.to_conv2d()
    for name, child in list(model.named_children()):
        if is_reparameterizable(child):
            setattr(model, name, child.to_conv2d())
        else:
            reparameterize_model(child)
    return model


def count_reparameterizable(model: nn.Module) -> int:
    """Number of re-param layers in ``model`` (0 once deployed)."""
    return sum(is_reparameterizable(m) for m in model.modules())
