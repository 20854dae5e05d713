"""How every orepa_mm tool refuses bad input and writes its outputs: one policy, one place.

Refusal policy. Every problem a user can fix (a missing or broken config, checkpoint or
dataset, a malformed flag, an output location that cannot be written) is an
:class:`OrepaInputError`: ``str(err)`` is one sentence naming the path and the fix, and
``exit_code`` is :data:`EXIT_BAD_INPUT` (2, what argparse returns for a bad command line).
:func:`run_tool` is every tool's entry point: it prints that sentence as the one line
``error: ...`` on stderr and returns the code, with no traceback; Ctrl-C and SIGTERM end the
run with one line and ``128 + signal`` (130, 143), after the staged outputs were removed.

Write policy. A run's outputs are an :class:`OutputSet`: every target name is checked before
any work (:meth:`OutputSet.check`: not empty, not given twice, not a directory, its folder
creatable and writable, the existing file replaceable); the files are written into a fresh
temporary directory beside the targets and moved into place together at the end
(:meth:`OutputSet.write`). Existing outputs are replaced, all or nothing: they are kept (hard
links, or the renamed directory) until every new file is in place, and put back if any move
fails, so a failed or interrupted run leaves the previous outputs exactly as they were and no
temporary file or directory it created. Written files get the user's umask.

Nothing here imports the mm stack: the tools parse their command line first.
"""
import contextlib
import errno
import os
import os.path as osp
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    'EXIT_BAD_INPUT', 'EXIT_FAILED', 'EXIT_INTERRUPTED', 'OrepaInputError', 'OutputSet',
    'check_readable_file', 'run_tool'
]

#: A bad input: config, checkpoint, dataset, flag or output location (argparse's code too).
EXIT_BAD_INPUT = 2
#: The run failed for a reason that is not the input (a bug, out of memory): one line, the
#: traceback only with ``OREPA_MM_TRACEBACK=1``.
EXIT_FAILED = 1
#: Ctrl-C (SIGINT); SIGTERM gives 128 + 15 = 143, as a shell reports a signalled process.
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: Set to 1 to see the traceback of an unexpected failure instead of its one-line summary.
TRACEBACK_ENV = 'OREPA_MM_TRACEBACK'

_STAGE_TAG = '.orepa-tmp-'


class OrepaInputError(Exception):
    """A problem the user can fix: one sentence (path and fix), nothing written.

    The base of every refusal the tools print; subclasses may carry another ``exit_code``
    (``tools/reparameterize.py``: 3 already deployed, 4 verification failed).
    """
    exit_code = EXIT_BAD_INPUT


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and staged write unwinds."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


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


def run_tool(main: Callable[[], Optional[int]],
             refusals: Tuple[type, ...] = ()) -> int:
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


# -- outputs ------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _missing_chain(path: str) -> Tuple[str, List[str]]:
    """The nearest existing ancestor of ``path`` and the missing components below it."""
    missing = []
    probe = path
    while not osp.lexists(probe):
        missing.append(osp.basename(probe))
        parent = osp.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return probe, list(reversed(missing))


def _reason(exc: OSError) -> str:
    return exc.strerror or first_line(exc)


class _Target:
    __slots__ = ('path', 'flag', 'kind', 'optional', 'anchor', 'relative')

    def __init__(self, path: str, flag: str, kind: str, optional: bool):
        self.path, self.flag, self.kind, self.optional = path, flag, kind, optional
        self.anchor, self.relative = '', ''


class OutputSet:
    """The outputs of one run, written together or not at all (module docstring).

    ``add`` every target, ``check()`` before any work, then ``with outputs.write() as staged:``
    write each ``staged[path]`` (plain files; ``kind='dir'`` targets are folders to fill); the
    set is moved into place when the block ends without an exception, and discarded otherwise.
    A target added with ``optional=True`` that the block leaves unwritten is removed from the
    destination (a stale file of an earlier run, e.g. an ONNX export not asked for this time).
    """

    def __init__(self, fix: str = 'choose another output path'):
        self._targets: List[_Target] = []
        self._fix = fix
        self.replaced: List[str] = []  # targets that existed and were replaced (or removed)

    def add(self, path: str, flag: str, kind: str = 'file', optional: bool = False) -> str:
        """Register ``path`` (given by ``flag``, for the sentences); returns its absolute form."""
        if not isinstance(path, str) or not path.strip():
            raise OrepaInputError(f'{flag} is empty; name the output {kind} it should write.')
        full = osp.abspath(osp.expanduser(path))
        for other in self._targets:
            if osp.realpath(other.path) == osp.realpath(full):
                given = other.flag if other.flag == flag else f'{other.flag} and {flag}'
                raise OrepaInputError(f'{path} is given twice as an output ({given}); name '
                                      'a different path for each output.')
        self._targets.append(_Target(full, flag, kind, optional))
        return full

    @property
    def paths(self) -> List[str]:
        return [t.path for t in self._targets]

    # -- before any work
    def check(self) -> 'OutputSet':
        """Refuse, in one sentence, any target that could not be written or replaced."""
        for target in self._targets:
            self._check_target(target)
        return self

    def _check_target(self, target: _Target) -> None:
        path, flag = target.path, target.flag
        shown = f'{path} ({flag})'
        if target.kind == 'file' and osp.isdir(path):
            raise OrepaInputError(f'cannot write output {shown}: it is an existing directory; '
                                  f'remove it or {self._fix}.')
        if target.kind == 'dir' and osp.lexists(path) and not osp.isdir(path):
            raise OrepaInputError(f'cannot write output directory {shown}: it is an existing '
                                  f'file; remove it or {self._fix}.')
        anchor, missing = _missing_chain(osp.dirname(path))
        if not osp.isdir(anchor):
            raise OrepaInputError(f'cannot write output {shown}: {anchor} is a file, not a '
                                  f'folder; {self._fix}.')
        target.anchor = anchor
        target.relative = osp.join(*missing, osp.basename(path))
        try:
            fd, probe = tempfile.mkstemp(prefix=_STAGE_TAG + 'probe-', dir=anchor)
            os.close(fd)
        except OSError as exc:
            raise OrepaInputError(f'cannot write output {shown}: {anchor} is not writable '
                                  f'({_reason(exc)}); {self._fix}.') from None
        try:
            if not missing and osp.isfile(path):
                self._probe_replaceable(path, probe, shown)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(probe)

    def _probe_replaceable(self, path: str, probe: str, shown: str) -> None:
        """An immutable or append-only file cannot be hard-linked either: found up front."""
        os.unlink(probe)
        try:
            os.link(path, probe)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise OrepaInputError(f'cannot replace output {shown}: {_reason(exc)} (an '
                                      'immutable or append-only file?); make it replaceable or '
                                      f'{self._fix}.') from None

    # -- the write
    @contextlib.contextmanager
    def write(self) -> Iterator[Dict[str, str]]:
        """Stage the set, yield ``{target: staged path}``, move it into place on success.

        An exception in the block (the tool's own, or an interrupt) discards the stage; a
        failure to stage or to move is an :class:`OrepaInputError` naming the path.
        """
        if any(not t.anchor for t in self._targets):
            self.check()
        stages: Dict[str, str] = {}
        try:
            with self._refusing():
                staged = self._stage(stages)
            yield staged
            with self._refusing():
                _fix_modes(stages.values())
                with _signals_blocked():
                    self._commit(stages, staged)
        finally:
            with _signals_blocked():  # a second Ctrl-C must not interrupt the clean-up
                for stage in stages.values():
                    shutil.rmtree(stage, ignore_errors=True)

    @contextlib.contextmanager
    def _refusing(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            where = exc.filename or 'the outputs'
            raise OrepaInputError(f'cannot write {where} ({_reason(exc)}); nothing was '
                                  f'replaced; {self._fix}.') from None

    def _stage(self, stages: Dict[str, str]) -> Dict[str, str]:
        """A fresh temporary folder in each anchor; the staged path of every target."""
        for target in self._targets:
            if target.anchor not in stages:
                stages[target.anchor] = tempfile.mkdtemp(prefix=_STAGE_TAG, dir=target.anchor)
        staged = {}
        for target in self._targets:
            where = osp.join(stages[target.anchor], target.relative)
            os.makedirs(osp.dirname(where), exist_ok=True)
            if target.kind == 'dir':
                os.makedirs(where, exist_ok=True)
            staged[target.path] = where
        return staged

    def _commit(self, stages: Dict[str, str], staged: Dict[str, str]) -> None:
        """Move every staged output into place; on any failure put the previous ones back."""
        done: List[Tuple[str, Optional[str]]] = []  # (target, backup or None)
        moved_dirs: List[Tuple[str, str]] = []  # (created folder, its stage path)
        try:
            for target in self._targets:
                stage = stages[target.anchor]
                new = staged[target.path]
                top = target.relative.split(os.sep)[0]
                if top != target.relative:  # the folder does not exist yet: move it in whole
                    folder = osp.join(target.anchor, top)
                    if any(folder == f for f, _ in moved_dirs):
                        continue
                    os.rename(osp.join(stage, top), folder)
                    moved_dirs.append((folder, osp.join(stage, top)))
                    continue
                exists = osp.lexists(target.path)
                if target.optional and not self._written(new, target.kind):
                    if exists:
                        backup = self._backup(target, stage)
                        if osp.lexists(target.path):
                            os.unlink(target.path)
                        done.append((target.path, backup))
                    continue
                backup = self._backup(target, stage) if exists else None
                os.replace(new, target.path)  # a folder was moved aside: its name is free
                done.append((target.path, backup))
        except BaseException:
            for path, backup in reversed(done):
                with contextlib.suppress(OSError):
                    if backup is None:
                        _remove(path)
                    elif osp.isdir(backup) and not osp.islink(backup):
                        _remove(path)
                        os.rename(backup, path)
                    else:
                        os.replace(backup, path)
            for folder, where in reversed(moved_dirs):
                with contextlib.suppress(OSError):
                    os.rename(folder, where)
            raise
        self.replaced = [path for path, backup in done if backup is not None]

    @staticmethod
    def _written(staged: str, kind: str) -> bool:
        return osp.isdir(staged) and bool(os.listdir(staged)) if kind == 'dir' \
            else osp.lexists(staged)

    @staticmethod
    def _backup(target: _Target, stage: str) -> str:
        """Keep the previous output until the commit is through: a hard link to a file (the
        name never goes missing), the folder itself moved aside (a folder cannot be linked)."""
        backup = osp.join(stage, '.previous', target.relative)
        os.makedirs(osp.dirname(backup), exist_ok=True)
        if osp.isdir(target.path) and not osp.islink(target.path):
            os.rename(target.path, backup)
            return backup
        try:
            os.link(target.path, backup, follow_symlinks=False)
        except OSError:
            shutil.copy2(target.path, backup, follow_symlinks=False)
        return backup


def _remove(path: str) -> None:
    if osp.isdir(path) and not osp.islink(path):
        shutil.rmtree(path)
    elif osp.lexists(path):
        os.unlink(path)


def _fix_modes(stages) -> None:
    """Files written through ``mkstemp`` (0600) or folders from ``mkdtemp`` (0700) would keep
    those modes: give every staged entry what a plain ``open`` / ``mkdir`` gives."""
    mask = _umask()
    for stage in stages:
        for root, dirs, files in os.walk(stage):
            for name in dirs:
                os.chmod(osp.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(osp.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT / SIGTERM wait until the moves are through (or rolled back): a signal can then
    only arrive before the first or after the last one."""
    if threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, 'pthread_sigmask'):
        yield
        return
    blocked = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def write_files(writers: Dict[str, Callable[[str], None]], flags: Optional[Dict[str, str]] = None,
                optional: Sequence[str] = (), fix: str = 'choose another output path',
                before_commit: Optional[Callable[[Dict[str, str]], None]] = None
                ) -> Dict[str, str]:
    """Write ``{path: write(staged_path)}`` as one :class:`OutputSet`; returns the paths.

    ``optional`` paths without a writer are removed when they exist (stale outputs);
    ``before_commit`` sees ``{path: staged path}`` and may raise to discard the whole set.
    """
    outputs = OutputSet(fix)
    flags = flags or {}
    for path in list(writers) + [p for p in optional if p not in writers]:
        outputs.add(path, flags.get(path, 'output'), optional=path in optional)
    outputs.check()
    with outputs.write() as staged:
        for path, write in writers.items():
            write(staged[path])
        if before_commit is not None:
            before_commit({p: staged[p] for p in writers})
    return {path: osp.abspath(path) for path in writers}
