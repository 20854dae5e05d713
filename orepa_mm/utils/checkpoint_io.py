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

:func:`read_checkpoint` is what the tools read a checkpoint argument with: the
same loader, and one sentence for every way the file can be unusable (missing,
empty, truncated, not a PyTorch file, not a dict, refused for safety).
"""
import contextlib
import os.path as osp
import pickle
import pickletools
import re
import warnings
from importlib import import_module
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.optim.scheduler.param_scheduler import OneCycleParamScheduler
from mmengine.runner.checkpoint import CheckpointLoader

from .errors import OrepaInputError, check_readable_file, first_line

__all__ = [
    'CorruptCheckpointError', 'UnsafeCheckpointError', 'checkpoint_weights', 'load_from_local',
    'read_checkpoint', 'register_safe_checkpoint_loader', 'runner_checkpoint_safe_globals',
    'select_weights', 'unwrap_state_dict'
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


class UnsafeCheckpointError(OrepaInputError, pickle.UnpicklingError):
    """A checkpoint pickles something a runner checkpoint never contains.

    Subclasses :class:`pickle.UnpicklingError` so callers that already handle
    torch's weights-only failures keep working; ``str(err)`` is one sentence
    naming the file and the refused object, and saying it was refused for
    safety (not that the file is corrupt).
    """


class CorruptCheckpointError(OrepaInputError, pickle.UnpicklingError):
    """The file is not a (complete) PyTorch checkpoint: truncated, empty,
    another format, or not a dict of weights. One sentence, with the fix."""


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
    multiarray = import_module('numpy._core.multiarray' if int(np.__version__.split('.')[0]) >=
                               2 else 'numpy.core.multiarray')
    reconstruct, scalar = multiarray._reconstruct, multiarray.scalar
    dtype_classes = {
        type(np.dtype(code))
        for code in np.typecodes['AllInteger'] + np.typecodes['AllFloat'] + '?'
    }
    return [
        np.ndarray,
        np.dtype,
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
    (r'reduce for unrecognized function (.+?)(?: which belongs to|\n|$)', 'a call to {}'),
    (r'Can only create new object .*? but got (.+?)$', 'an instance of {}'),
    (r'Can only build .*? but got (.+?)$', 'an object of {}'),
)

# torch's wording when the bytes are not a torch.save stream it can parse at
# all (a PNG, a plain pickle, a truncated or foreign file): it refused no
# object, so the file is not called unsafe unless it names one (_raw_globals).
_NOT_A_PICKLE = (r'Unsupported operand', r'invalid load key', r'magic number',
                 r'pickle data was truncated', r'Ran out of input', r'unpickling stack underflow',
                 r'could not find MARK', r'EOF')
_STRING_OPS = ('SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'UNICODE', 'SHORT_BINSTRING',
               'BINSTRING', 'STRING')


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
        'are allowed), so it is refused for safety (loading it could run '
        'code); use a checkpoint from a source you trust.')


def _corrupt(filename: str, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f'cannot read checkpoint {filename}: it is truncated or not a PyTorch '
        f'checkpoint ({detail}); pass a complete .pth file (re-download or '
        're-save it).')


def _torch_detail(err: BaseException) -> str:
    """What went wrong in torch's words: its first clause, not its five sentences."""
    text = str(err)
    inner = re.search(r'(?:Unpickler error|error was):\s*(\S.*)', text)
    line = first_line(inner.group(1)) if inner else first_line(err)
    return f'{type(err).__name__}: {line.split(". ")[0][:120]}'


def _raw_globals(filename: str) -> Optional[List[str]]:
    """The globals a plain (non-torch) pickle file imports, read from its opcodes without
    unpickling anything; None when the file is not a complete pickle stream."""
    found: List[str] = []
    strings: List[str] = []
    try:
        with open(filename, 'rb') as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in _STRING_OPS:
                    strings = (strings + [str(arg)])[-2:]
                elif op.name == 'GLOBAL':
                    found.append(str(arg).replace(' ', '.'))
                elif op.name == 'STACK_GLOBAL':
                    found.append('.'.join(strings))
    except Exception:  # noqa: BLE001 - not a pickle: a PNG, a truncated file, ...
        return None
    return found


def _unreadable(filename: str, err: BaseException) -> pickle.UnpicklingError:
    """A file torch's weights-only unpickler could not parse: a plain pickle that imports
    code (unsafe), a plain pickle of data (not a torch checkpoint) or foreign bytes."""
    imports = _raw_globals(filename)
    if imports:
        return _refusal(filename, f'the global {imports[0]}')
    if imports is not None:
        return CorruptCheckpointError(
            f'cannot read checkpoint {filename}: it is a plain pickle, not a PyTorch '
            'checkpoint; save the weights with torch.save(dict(state_dict=...), path).')
    return _corrupt(filename, _torch_detail(err))


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
        with _runner_checkpoint_globals(), warnings.catch_warnings():
            # "Detected pickle protocol 4": torch's note on a plain pickle, not the user's.
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(filename, map_location=map_location, weights_only=True)
    except _RefusedGetattr as err:
        raise _refusal(filename, str(err)) from None
    except pickle.UnpicklingError as err:
        what = _describe_refusal(str(err))
        if what == 'pickled data' and re.search('|'.join(_NOT_A_PICKLE), str(err)):
            raise _unreadable(filename, err) from None
        raise _refusal(filename, what) from None


def read_checkpoint(path: str,
                    what: str = 'checkpoint',
                    fix: str = 'pass a checkpoint written by tools/train.py') -> Dict:
    """The checkpoint a tool was given, or an :class:`~orepa_mm.utils.errors.OrepaInputError`
    sentence: missing / a directory / unreadable, empty, truncated or not a PyTorch file,
    refused for safety (:class:`UnsafeCheckpointError`), or not a dict."""
    full = check_readable_file(path, what, fix)
    if osp.getsize(full) == 0:
        raise CorruptCheckpointError(f'cannot read {what} {path}: it is empty (0 bytes); {fix}.')
    try:
        checkpoint = load_from_local(full, map_location='cpu')
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as err:  # noqa: BLE001 - zip errors, EOF, foreign formats
        raise _corrupt(path, _torch_detail(err)) from None
    if not isinstance(checkpoint, Mapping):
        raise CorruptCheckpointError(
            f'{what} {path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict '
            f'with a state_dict); {fix}.')
    return checkpoint


def unwrap_state_dict(checkpoint: Any) -> Optional[Dict[str, torch.Tensor]]:
    """The model weights of a loaded checkpoint, the one way every tool reads them:
    ``checkpoint['state_dict']`` (or the checkpoint itself when it is a bare state dict), with
    DDP's ``module.`` prefixes stripped as mmengine's ``load_checkpoint`` does by default.
    None unless that is a non-empty mapping of tensors."""
    state = checkpoint.get('state_dict', checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return {re.sub(r'^module\.', '', k): v for k, v in state.items()}


def checkpoint_weights(
        checkpoint: Mapping,
        path: str,
        what: str = 'checkpoint',
        fix: str = 'pass a checkpoint written by tools/train.py') -> Dict[str, torch.Tensor]:
    """:func:`unwrap_state_dict`, or one sentence when the checkpoint holds no weights."""
    state = unwrap_state_dict(checkpoint)
    if state is None:
        raise CorruptCheckpointError(
            f'{what} {path} holds no model weights (no state_dict of tensors); {fix}.')
    return state


def select_weights(checkpoint: Mapping, path: str,
                   use_ema: Optional[bool]) -> Tuple[Dict[str, torch.Tensor], bool, str]:
    """The weights to deploy, whether they are the EMA ones, and a line saying which.

    mmengine's ``EMAHook`` saves the averaged weights *under* ``state_dict`` and moves the raw
    model's weights into ``ema_state_dict`` (keys ``module.<name>``, plus ``steps``), so that
    plain loading gets the EMA model (``EMAHook.before_save_checkpoint`` /
    ``_swap_ema_state_dict``). Hence: EMA wanted -> ``state_dict``; ``use_ema=False`` -> the
    raw weights swapped back from ``ema_state_dict``. ``use_ema=None`` uses EMA when present.
    Keys come without DDP's ``module.`` prefix (:func:`unwrap_state_dict`).
    """
    state = checkpoint_weights(checkpoint, path)
    ema = checkpoint.get('ema_state_dict')
    has_ema = isinstance(ema, dict) and any(k.startswith('module.') for k in ema)
    if not has_ema:
        if use_ema:
            raise OrepaInputError(f'checkpoint {path} has no EMA weights (no '
                                  '`ema_state_dict`); run without --ema.')
        return state, False, 'model weights (the checkpoint has no EMA weights)'
    steps = ema.get('steps')
    steps = f', {int(steps)} EMA steps' if isinstance(steps, torch.Tensor) else ''
    if use_ema is False:
        raw = dict(state)
        raw.update({k[len('module.'):]: v for k, v in ema.items() if k.startswith('module.')})
        return raw, False, f'raw model weights (--no-ema; EMA weights ignored{steps})'
    return state, True, f'EMA weights (mmengine EMAHook{steps})'


def register_safe_checkpoint_loader() -> None:
    """Make mmengine's local-file scheme use :func:`load_from_local`.

    Idempotent: re-registering the same function under the same prefix
    (``''``, mmengine's catch-all for local paths) just overwrites it. Other
    schemes (``http://``, ``s3://``, ...) are left alone. A torch without an
    allow-list (before 2.4: mmdeploy's environment) keeps mmengine's own loader,
    whose ``torch.load`` there reads runner checkpoints as it always did.
    """
    if not hasattr(torch.serialization, 'safe_globals'):  # pragma: no cover - torch < 2.4
        return
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
