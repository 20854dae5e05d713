"""Counting what a step dispatches: host-device synchronisations and kernel-launching ops.

Device independent: the same aten ops synchronise on CUDA (they return a Python value or a
data-dependent shape) and launch kernels there, so counting them on the CPU with a
``TorchDispatchMode`` tells what a GPU step would do.
"""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

#: aten ops that read a value back to the host (or size an output by the data): a sync on CUDA.
SYNCING_OPS = frozenset({
    '_local_scalar_dense', 'equal', 'is_nonzero', 'nonzero', 'nonzero_static', 'masked_select',
    'unique', '_unique', '_unique2', 'unique_consecutive', 'unique_dim', 'repeat_interleave',
    'allclose', 'item'
})
#: Ops that only make views or metadata: no kernel launch.
NON_LAUNCHING_OPS = frozenset({
    'view', '_unsafe_view', 'detach', 'alias', 'select', 'transpose', 'permute', 'unsqueeze',
    'squeeze', 't', 'expand', 'reshape', 'slice', 'empty', 'empty_strided', 'as_strided', 'unbind',
    'split', 'split_with_sizes', 'chunk', 'narrow', 'diagonal', 'unfold', '_reshape_alias',
    'view_as', 'expand_as', 'flatten', 'movedim', 'lift_fresh', 'empty_like', 'new_empty',
    'new_empty_strided', '_to_copy_noop', 'resolve_conj', 'resolve_neg'
})


def op_name(func) -> str:
    """``aten.mul.Tensor`` -> ``mul``."""
    return func.overloadpacket.__name__


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside it, by name (``counter.ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[op_name(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> Counter:
        return Counter({name: n for name, n in self.ops.items() if name in SYNCING_OPS})

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def launching(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in NON_LAUNCHING_OPS)
