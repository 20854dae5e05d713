"""Load mmengine runner checkpoints under torch's ``weights_only`` unpickler.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``. mmengine
0.10.7's local loader (``mmengine.runner.checkpoint.load_from_local``) calls
``torch.load(filename, map_location=...)`` without an allowlist, so every
checkpoint a Runner writes fails to load (``--resume``, ``load_from``,
``init_cfg=dict(type='Pretrained')``, ``tools/test.py``): the ``message_hub``
entry pickles ``mmengine.logging.history_buffer.HistoryBuffer`` objects that
hold numpy arrays, and their statistic methods are pickled as
``getattr(HistoryBuffer, 'min')`` and so on.

Turning ``weights_only`` off would let any checkpoint run code on load, so
this module instead re-registers mmengine's local-file scheme with a loader
that keeps ``weights_only=True`` and allowlists, only for the duration of
that one ``torch.load`` call, exactly the globals runner checkpoints contain:

* numpy arrays and scalars of bool, integer, float and complex dtypes
  (``_reconstruct``, ``ndarray``, ``dtype`` and the concrete dtype classes,
  ``scalar``), under their numpy 1 and numpy 2 module paths;
* ``HistoryBuffer`` itself;
* a restricted ``builtins.getattr`` that only returns HistoryBuffer's own
  statistic methods (and the two static annealing functions that
  ``OneCycleParamScheduler.state_dict()`` contains) and raises otherwise.

Anything else (for example an object whose ``__reduce__`` calls
``os.system``) is refused before it is called, with an
:class:`UnsafeCheckpointError` naming the file and the offending global.
"""
import contextlib
import os.path as osp
import pickle
import re
from importlib import import_module
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.optim.scheduler.param_scheduler import OneCycleParamScheduler
from mmengine.runner.checkpoint import CheckpointLoader

__all__ = [
    'UnsafeCheckpointError', 'load_from_local', 'register_safe_checkpoint_loader',
    'runner_checkpoint_safe_globals'
]

SafeGlobal = Union[Callable, Tuple[Callable, str]]

# The only ``getattr(owner, name)`` lookups a runner checkpoint performs:
# HistoryBuffer pickles its default statistics (registered in
# ``HistoryBuffer._set_default_statistics``), and OneCycleParamScheduler's
# state_dict holds ``anneal_func``, one of its two static methods.
_GETATTR_ALLOWED: Tuple[Tuple[type, FrozenSet[str]], ...] = (
    (HistoryBuffer, frozenset({'min', 'max', 'current', 'mean'})),
    (OneCycleParamScheduler, frozenset({'_annealing_cos', '_annealing_linear'})),
)

_ALLOWED_CONTENT = ('tensors, containers, numpy arrays and mmengine '
                    'HistoryBuffer logs')


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint pickles something a runner checkpoint never contains.

    Subclasses :class:`pickle.UnpicklingError` so callers that already handle
    torch's weights-only failures keep working; ``str(err)`` is one sentence
    naming the file and the refused object.
    """


class _RefusedGetattr(Exception):
    """Raised by the restricted getattr while unpickling.

    Deliberately not an ``UnpicklingError``: torch re-wraps those into a long
    generic message, while this one travels out of ``torch.load`` unchanged so
    :func:`load_from_local` can name the exact lookup that was refused.
    """


def _restricted_getattr(obj: Any, name: Any, *default: Any) -> Any:
    """Stand-in for ``builtins.getattr`` inside the weights-only unpickler.

    Allowlisting the real ``getattr`` would let a pickle reach any attribute
    of any allowlisted object (e.g. ``HistoryBuffer.register_statistics``),
    so only the lookups listed in ``_GETATTR_ALLOWED`` are answered.
    """
    if not default and isinstance(name, str):
        for owner, names in _GETATTR_ALLOWED:
            if obj is owner and name in names:
                return getattr(owner, name)
    owner_name = getattr(obj, '__qualname__', type(obj).__qualname__)
    raise _RefusedGetattr(f'getattr({owner_name}, {name!r})')


def _numpy_safe_globals() -> List[SafeGlobal]:
    """numpy objects that arrays and scalars of numeric dtypes pickle as.

    Pickles name ``numpy.core.multiarray`` (numpy < 2) or
    ``numpy._core.multiarray`` (numpy >= 2) depending on the numpy that
    *wrote* them, so both spellings map to the installed functions. The
    concrete dtype classes are needed because the unpickler only BUILDs
    instances of allowlisted types, and ``np.dtype('f8')`` is a
    ``numpy.dtypes.Float64DType``. Object, string and structured dtypes are
    left out: runner checkpoints never hold them.
    """
    # numpy 2 keeps numpy.core only as a deprecated alias of numpy._core,
    # while numpy 1.26 ships a numpy._core stub without multiarray.
    multiarray = import_module(
        'numpy._core.multiarray' if int(np.__version__.split('.')[0]) >= 2
        else 'numpy.core.multiarray')
    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    dtype_classes = {
        type(np.dtype(code))
        for code in np.typecodes['AllInteger'] + np.typecodes['AllFloat'] + '?'
    }
    return [
        np.ndarray, np.dtype,
        (reconstruct, 'numpy.core.multiarray._reconstruct'),
        (reconstruct, 'numpy._core.multiarray._reconstruct'),
        (scalar, 'numpy.core.multiarray.scalar'),
        (scalar, 'numpy._core.multiarray.scalar'),
        *sorted(dtype_classes, key=lambda cls: cls.__name__),
    ]


def runner_checkpoint_safe_globals() -> List[SafeGlobal]:
    """Everything beyond torch's defaults that an mmengine runner checkpoint
    pickles, in the form ``torch.serialization.safe_globals`` accepts."""
    return [
        *_numpy_safe_globals(),
        HistoryBuffer,
        OneCycleParamScheduler,  # only as the owner of getattr lookups
        (_restricted_getattr, 'builtins.getattr'),
    ]


def _registers_getattr(entry: SafeGlobal) -> bool:
    """Whether a safe-globals entry would answer the ``builtins.getattr`` global."""
    if isinstance(entry, tuple):
        return len(entry) == 2 and entry[1] == 'builtins.getattr'
    return entry is getattr


@contextlib.contextmanager
def _runner_checkpoint_globals() -> Iterator[None]:
    """Allowlist runner-checkpoint globals around a single ``torch.load``.

    Built on ``torch.serialization.safe_globals`` so nothing stays
    allowlisted afterwards. Entries the process already registered are not
    added again (leaving the context would otherwise remove them), and any
    process-wide registration of ``builtins.getattr`` is shadowed for the
    duration, because torch resolves the name from an unordered set and the
    restricted version must be the one that answers.
    """
    registered = torch.serialization.get_safe_globals()
    shadowed = [entry for entry in registered if _registers_getattr(entry)]
    wanted = [g for g in runner_checkpoint_safe_globals() if g not in registered]
    if shadowed:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(
            [entry for entry in registered if entry not in shadowed])
    try:
        with torch.serialization.safe_globals(wanted):
            yield
    finally:
        if shadowed:
            torch.serialization.add_safe_globals(shadowed)


# torch's wording of the weights-only refusals it raises, mapped to a short
# description of what the file tried to do (first match wins).
_TORCH_REFUSALS = (
    (r'GLOBAL (\S+) was not an allowed global', 'the global {}'),
    (r'unsupported GLOBAL (\S+) whose module', 'the global {}'),
    (r'reduce for unrecognized function (.+?)(?: which belongs to|\n|$)',
     'a call to {}'),
    (r'Can only create new object .*? but got (.+?)$', 'an instance of {}'),
    (r'Can only build .*? but got (.+?)$', 'an object of {}'),
)


def _describe_refusal(message: str) -> str:
    """Reduce torch's multi-paragraph weights-only error to its subject."""
    for pattern, template in _TORCH_REFUSALS:
        match = re.search(pattern, message, flags=re.MULTILINE)
        if match:
            return template.format(match.group(1).rstrip('.'))
    return 'pickled data'


def _refusal(filename: str, what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f'Refusing to load checkpoint {filename}: it pickles {what}, which an '
        f'mmengine runner checkpoint never contains (only {_ALLOWED_CONTENT} '
        'are allowed).')


def load_from_local(filename: str, map_location: Any = None) -> Dict:
    """Drop-in for ``mmengine.runner.checkpoint.load_from_local``.

    Same signature and errors as mmengine's, but loads with
    ``weights_only=True`` and the runner-checkpoint allowlist. The name is
    kept because ``CheckpointLoader.load_checkpoint`` logs
    ``__name__[10:]`` as the backend ("local").

    Raises:
        FileNotFoundError: ``filename`` is not a file.
        UnsafeCheckpointError: the file pickles anything outside the
            allowlist; nothing after the refused object is unpickled.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    try:
        with _runner_checkpoint_globals():
            return torch.load(
                filename, map_location=map_location, weights_only=True)
    except _RefusedGetattr as err:
        raise _refusal(filename, str(err)) from None
    except pickle.UnpicklingError as err:
        raise _refusal(filename, _describe_refusal(str(err))) from None


def register_safe_checkpoint_loader() -> None:
    """Make mmengine's local-file scheme use :func:`load_from_local`.

    Idempotent: re-registering the same function under the same prefix
    (``''``, mmengine's catch-all for local paths) just overwrites it. Other
    schemes (``http://``, ``s3://``, ...) are left alone.
    """
    CheckpointLoader.register_scheme(
        prefixes='', loader=load_from_local, force=True)
