"""High-level entry points: from a train-time checkpoint to a deployable one.

:func:`reparameterize_checkpoint` is what ``tools/reparameterize.py`` runs (and what a demo can
call directly); :func:`deploy_config` rewrites a train-time config into the stock one the
deployed checkpoint belongs to.
"""
from ..utils.errors import (EXIT_ALREADY_DEPLOYED, EXIT_BAD_INPUT, EXIT_VERIFICATION_FAILED,
                            AlreadyDeployedError, ReparameterizeError, VerificationError)
from .deploy_config import deploy_config
from .reparameterize import ReparameterizeResult, reparameterize_checkpoint
from .verification import OutputError

__all__ = [
    'reparameterize_checkpoint', 'deploy_config', 'ReparameterizeResult', 'OutputError',
    'ReparameterizeError', 'AlreadyDeployedError', 'VerificationError', 'EXIT_BAD_INPUT',
    'EXIT_ALREADY_DEPLOYED', 'EXIT_VERIFICATION_FAILED'
]
