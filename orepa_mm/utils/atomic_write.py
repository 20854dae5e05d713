"""How every orepa_mm tool writes its outputs: all of them, or none, with the user's umask.

A run's outputs are an :class:`OutputSet`: every target name is checked before any work
(:meth:`OutputSet.check`: not empty, not given twice, not a directory, its folder creatable and
writable, the existing file replaceable); the files are written into a fresh temporary directory
beside the targets and moved into place together at the end (:meth:`OutputSet.write`). Existing
outputs are replaced, all or nothing: they are kept (hard links, or the renamed directory) until
every new file is in place, and put back if any move fails, so a failed or interrupted run leaves
the previous outputs exactly as they were and no temporary file or directory it created. Written
files get the user's umask (a serving container running as another user can read them).
"""
import contextlib
import errno
import os
import os.path as osp
import shutil
import signal
import tempfile
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import OrepaInputError, first_line

__all__ = ['OutputSet', 'check_writable_dir', 'write_files']

_STAGE_TAG = '.orepa-tmp-'


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


def check_writable_dir(out_dir: str) -> None:
    """Fail before any work when ``out_dir`` cannot be created or written.

    ``os.access`` is not enough (as root it answers yes for ``/proc``), so this probes: it
    creates the missing directories of the chain and a temporary file in ``out_dir``, then
    removes everything it created, whether the probe succeeded or not.
    """
    target = osp.abspath(out_dir)
    if osp.exists(target) and not osp.isdir(target):
        raise OrepaInputError(f'output directory {out_dir} is an existing file.')
    probe, missing = _missing_chain(target)
    if not osp.isdir(probe):
        raise OrepaInputError(f'output directory {out_dir} cannot be created: {probe} is a '
                              'file.')
    created = []
    try:
        for name in missing:
            probe = osp.join(probe, name)
            os.mkdir(probe)
            created.append(probe)
        fd, tmp = tempfile.mkstemp(prefix=_STAGE_TAG + 'probe-', dir=target)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        where = f'{exc.filename}: ' if exc.filename else ''
        raise OrepaInputError(f'output directory {out_dir} is not writable ({where}'
                              f'{_reason(exc)}).') from None
    finally:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(path)


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


def write_files(writers: Dict[str, Callable[[str], None]],
                flags: Optional[Dict[str, str]] = None,
                optional: Sequence[str] = (),
                fix: str = 'choose another output path',
                before_commit: Optional[Callable[[Dict[str, str]], None]] = None) -> Dict[str, str]:
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
