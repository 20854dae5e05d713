"""Numeric helpers shared by the test modules: relative error and randomised models.

Default initialisations hide mistakes (unit BN statistics, zero residuals, identity factors),
so equivalence tests first randomise every parameter and every BN statistic.
"""
import torch
import torch.nn as nn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def random_bn_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters for every BN of ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return module


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter ~ N(0, 0.5^2) (branches and scales included), then random BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return random_bn_statistics(module, seed + 1)
