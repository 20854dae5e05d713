"""An exact cache for generated kernels: reused only while the parameters are provably unchanged.

A re-param layer's kernel is a pure function of its parameters. When no autograd graph is
needed through it (validation, a frozen stage, a teacher model), regenerating it every forward
is wasted work, but a cache is only acceptable if it can never serve a stale kernel. Version
counters and data pointers are not enough: writes through ``.data`` (EMA / mean-teacher
updates, ``p.data.mul_(0.9)``, NCCL broadcasts) change the values without bumping
``_version``. So the cache keeps a copy of the parameters it was computed from and compares
values (``torch.equal``) before every reuse: exact for every update a user can make, at the
cost of one parameter-sized copy and one read of the parameters per forward, far less than
generating the kernel (a read is O(params), generation is O(params x channels)).
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def _key(params: Sequence[Tensor]) -> Tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


class KernelCache:
    """One layer's cached kernel and the parameter values it was generated from."""

    __slots__ = ('_key', '_snapshot', '_kernel')

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        """Forget the kernel (and the parameter copy)."""
        self._key: Optional[Tuple] = None
        self._snapshot: List[Tensor] = []
        self._kernel: Optional[Tensor] = None

    def lookup(self, params: Sequence[Tensor]) -> Optional[Tensor]:
        """The cached kernel if ``params`` still hold exactly the values it was made from."""
        if self._kernel is None or _key(params) != self._key:
            return None
        if not all(torch.equal(p, s) for p, s in zip(params, self._snapshot)):
            return None
        return self._kernel

    def store(self, params: Sequence[Tensor], kernel: Tensor) -> Tensor:
        """Remember ``kernel`` as the function of the current values of ``params``."""
        self._key = _key(params)
        self._snapshot = [p.detach().clone() for p in params]
        self._kernel = kernel.detach()
        return self._kernel

    def holds(self, kernel: Tensor) -> bool:
        """Whether ``kernel`` is the cached tensor itself."""
        return kernel is self._kernel

    def __deepcopy__(self, memo) -> 'KernelCache':
        # A copied layer has new parameters: nothing cached carries over.
        return KernelCache()
