"""Training-loop pieces mmengine lacks for OREPA users (CPU mixed precision)."""
from .optim_wrapper import BF16OptimWrapper

__all__ = ['BF16OptimWrapper']
