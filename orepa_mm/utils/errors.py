"""How every orepa_mm tool refuses bad input: one error hierarchy, one exit-code policy.

Every problem a user can fix (a missing or broken config, checkpoint or dataset, a malformed
flag, an output location that cannot be written) is an :class:`OrepaInputError`: ``str(err)``
is one sentence naming the path and the fix, and ``exit_code`` is :data:`EXIT_BAD_INPUT` (2,
what argparse returns for a bad command line). :func:`run_tool` is every tool's entry point: it
prints that sentence as the one line ``error: ...`` on stderr and returns the code, with no
traceback; Ctrl-C and SIGTERM end the run with one line and ``128 + signal`` (130, 143), after
the staged outputs (:mod:`.atomic_write`) were removed.

Nothing here imports the mm stack: the tools parse their command line first.
"""
import contextlib
import os
import os.path as osp
import signal
import sys
import threading
import traceback
from typing import Callable, Iterator, Optional, Sequence, Tuple

__all__ = [
    'EXIT_ALREADY_DEPLOYED', 'EXIT_BAD_INPUT', 'EXIT_FAILED', 'EXIT_INTERRUPTED',
    'EXIT_VERIFICATION_FAILED', 'AlreadyDeployedError', 'OrepaInputError', 'ReparameterizeError',
    'VerificationError', 'first_line', 'check_readable_file', 'refusals_as', 'run_tool'
]

#: A bad input: config, checkpoint, dataset, flag or output location (argparse's code too).
EXIT_BAD_INPUT = 2
#: The run failed for a reason that is not the input (a bug, out of memory): one line, the
#: traceback only with ``OREPA_MM_TRACEBACK=1``.
EXIT_FAILED = 1
#: tools/reparameterize.py: the checkpoint is already re-parameterized (use it as is).
EXIT_ALREADY_DEPLOYED = 3
#: tools/reparameterize.py: the deployed model's outputs are beyond the tolerance.
EXIT_VERIFICATION_FAILED = 4
#: Ctrl-C (SIGINT); SIGTERM gives 128 + 15 = 143, as a shell reports a signalled process.
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: Set to 1 to see the traceback of an unexpected failure instead of its one-line summary.
TRACEBACK_ENV = 'OREPA_MM_TRACEBACK'


class OrepaInputError(Exception):
    """A problem the user can fix: one sentence (path and fix), nothing written.

    The base of every refusal the tools print; subclasses may carry another ``exit_code``
    (``tools/reparameterize.py``: 3 already deployed, 4 verification failed).
    """
    exit_code = EXIT_BAD_INPUT


class ReparameterizeError(OrepaInputError):
    """A conversion refused (:mod:`orepa_mm.apis.reparameterize`): one sentence, nothing
    written."""


class AlreadyDeployedError(ReparameterizeError):
    """The checkpoint is already re-parameterized: usable as is, nothing to do."""
    exit_code = EXIT_ALREADY_DEPLOYED


class VerificationError(ReparameterizeError):
    """The deployed model's outputs (or onnxruntime's) are beyond the tolerance; ``errors``
    holds every compared output."""
    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, message: str, errors: Sequence = ()):
        super().__init__(message)
        self.errors = list(errors)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and staged write unwinds."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def refusals_as(error: type) -> Iterator[None]:
    """Re-raise any :class:`OrepaInputError` of the block as ``error`` (a subclass), same
    sentence: an API documents one exception type for its refusals, whatever helper refused."""
    try:
        yield
    except error:
        raise
    except OrepaInputError as exc:
        raise error(str(exc)) from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without a trailing period."""
    text = str(exc).strip().strip('"\'')
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line.rstrip('.')


# -- the entry point ----------------------------------------------------------------------------
@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`_Terminated` in the main thread while the tool runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(message: str) -> None:
    line = ' '.join(str(message).split())  # one line, whatever the message held
    print(f'error: {line}', file=sys.stderr, flush=True)


def run_tool(main: Callable[[], Optional[int]], refusals: Tuple[type, ...] = ()) -> int:
    """Run a tool's body under the refusal policy and return its exit status.

    Args:
        main: the tool, after nothing but imports; returns its status (None is 0).
        refusals: exception types from outside orepa_mm that are bad input as well (their
            message must already be one sentence), e.g. ``MissingDatasetError``.

    :class:`OrepaInputError` (and ``refusals``): its sentence, its ``exit_code``. Ctrl-C,
    SIGTERM: ``interrupted``, 130 / 143. Anything else is not the user's input: one line with
    the exception and :data:`EXIT_FAILED`, or the traceback with ``OREPA_MM_TRACEBACK=1``.
    ``SystemExit`` (argparse's usage errors, ``--help``) passes through unchanged.
    """
    try:
        with _sigterm_as_interrupt():
            code = main()
        return 0 if code is None else int(code)
    except OrepaInputError as exc:
        _say(str(exc))
        return exc.exit_code
    except refusals as exc:  # noqa: B030 - a tuple of exception types
        _say(str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        signum = getattr(exc, 'signum', signal.SIGINT)
        name = signal.Signals(signum).name
        _say(f'interrupted by {name}; no output was written or replaced.')
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 - the policy: no traceback unless asked for
        if os.environ.get(TRACEBACK_ENV) == '1':
            traceback.print_exc()
        else:
            _say(f'unexpected {type(exc).__name__}: {first_line(exc)} (not a problem with the '
                 f'input as far as the checks know; {TRACEBACK_ENV}=1 shows the traceback).')
        return EXIT_FAILED


# -- inputs -------------------------------------------------------------------------------------
def check_readable_file(path: str, what: str, fix: str) -> str:
    """``path`` (``~`` expanded) when it is a readable file, else an :class:`OrepaInputError`.

    Args:
        what: the noun for the sentence, e.g. ``'config'``, ``'checkpoint'``.
        fix: the second half of the sentence, e.g. ``'pass the path of a config file'``.
    """
    if not isinstance(path, str) or not path.strip():
        raise OrepaInputError(f'the {what} path is empty; {fix}.')
    full = osp.expanduser(path)
    where = '' if osp.isabs(full) else f' (looked for in {os.getcwd()})'
    if osp.isdir(full):
        raise OrepaInputError(f'{what} {path} is a directory, not a file{where}; {fix}.')
    if not osp.exists(full):
        raise OrepaInputError(f'{what} {path} does not exist{where}; {fix}.')
    if not osp.isfile(full):
        raise OrepaInputError(f'{what} {path} is not a regular file; {fix}.')
    if not os.access(full, os.R_OK):
        raise OrepaInputError(f'{what} {path} is not readable (permission denied); {fix}.')
    return full
