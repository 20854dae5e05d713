"""Every command and link in README.md and docs/*.md names something that exists.

A reader copies commands from the docs; a renamed flag, tool, make target or config breaks them
silently. The checker reads the fenced shell blocks (```bash, ```sh, ```shell) and checks:

* ``python tools/X.py ... --flag``: tools/X.py exists and takes ``--flag`` (its argparse options,
  read in process from its ``build_parser`` / ``parse_args`` / ``main`` function, else from
  ``python tools/X.py --help``);
* any ``tools/...`` path (``bash tools/X.sh``) and any ``configs/...py`` path exists;
* ``make T``: T is a target of the Makefile;

and every relative markdown link resolves to an existing file (anchors are not checked).
A command that is deliberately illustrative says so: a ``# illustrative`` comment on its line,
or a block whose info string holds the word (```bash illustrative). Commands after a ``cd`` in
a block run in another tree (an mmdeploy checkout) and are not checked.

``check_markdown(text, path)`` is the reusable entry point: it returns one message per problem.
"""
import argparse
import contextlib
import functools
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {'bash', 'sh', 'shell'}
DOC_PAGES = ('install', 'configs', 'deploy', 'training', 'int8', 'benchmarks', 'demo',
             'development')

_FENCE = re.compile(r'^\s*(`{3,}|~{3,})\s*(.*)$')
_ILLUSTRATIVE = re.compile(r'#\s*illustrative\b')
_FLAG = re.compile(r'(?<![\w-])--[A-Za-z0-9][\w-]*')
_CONFIG = re.compile(r'(?<![\w./-])configs/[\w./-]+\.py\b')
_TOOL = re.compile(r'^(?:\./)?(tools/[\w./-]+)$')
_ENV_ASSIGN = re.compile(r'^[A-Za-z_]\w*=')
_LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
_REF_LINK = re.compile(r'^\s*\[[^\]]+\]:\s*(\S+)', re.M)
_INLINE_CODE = re.compile(r'(`+).+?\1')
_SEPARATORS = {'&&', '||', ';', '|', '&'}


def fenced_blocks(text):
    """Yield (info string, first line number, lines) of each fenced code block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info, start, body = match.group(1), match.group(2).strip(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield info, start + 1, body
        i += 1


def prose(text):
    """The text outside fenced blocks and inline code spans: where links live."""
    kept, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(_INLINE_CODE.sub('', line))
        else:
            kept.append('')  # keep line numbers
    return kept


def logical_lines(body, first_line):
    """Join backslash continuations; yield (line number, command line)."""
    pending, start = '', None
    for offset, line in enumerate(body):
        if start is None:
            start = first_line + offset
        if line.rstrip().endswith('\\'):
            pending += line.rstrip()[:-1] + ' '
            continue
        yield start, pending + line
        pending, start = '', None
    if pending:
        yield start, pending


def segments(tokens):
    """Split a command line's tokens into simple commands at ``&&``, ``|``, ``;``, ``( )``.

    Yields (tokens, in_subshell): a ``cd`` inside ``( ... )`` does not outlive it.
    """
    current, depth, started_in = [], 0, 0
    for token in tokens:
        if token in _SEPARATORS:
            yield current, started_in > 0
            current, started_in = [], depth
            continue
        if not current:
            started_in = depth + len(token) - len(token.lstrip('('))
        depth = max(0, depth + token.count('(') - token.count(')'))
        current.append(token.strip('()'))
    yield current, started_in > 0


@functools.lru_cache(maxsize=None)
def makefile_targets(makefile=ROOT / 'Makefile'):
    targets = set()
    for line in Path(makefile).read_text().splitlines():
        match = re.match(r'^([A-Za-z0-9_.\- ]+?)\s*:(?!=)', line)
        if match and not line.startswith('\t'):
            targets.update(match.group(1).split())
    return frozenset(targets)


class _Captured(BaseException):
    """Raised where a tool parses its arguments; a BaseException, so that a tool's own
    ``except Exception`` (its one-sentence error handler) lets it through."""

    def __init__(self, parser):
        super().__init__()
        self.parser = parser


@contextlib.contextmanager
def _capture_parser():
    """Make ArgumentParser.parse_args / parse_known_args hand back the parser instead."""
    originals = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = originals


def _options_of(parser):
    return {
        option
        for action in parser._actions if action.help != argparse.SUPPRESS
        for option in action.option_strings
    }


def _options_from_function(path):
    """The options of a tool whose parser an importable function builds, or None.

    ``build_parser()`` returns it; ``parse_args(argv)`` and ``main(argv)`` build it and call
    ``parse_args`` on it, which is intercepted there (nothing after argument parsing runs).
    In process, this costs no interpreter start-up; tools without such a function are read
    from ``--help``.
    """
    source = path.read_text()
    names = [
        n for n in ('build_parser', 'parse_args', 'main')
        if re.search(rf'^def {n}\(', source, re.M)
    ]
    if not names:
        return None
    spec = importlib.util.spec_from_file_location(f'_docs_tool_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if names[0] == 'build_parser':
        return _options_of(module.build_parser())
    function = getattr(module, names[0])
    with _capture_parser():
        try:
            function([]) if inspect.signature(function).parameters else function()
        except _Captured as captured:
            return _options_of(captured.parser)
        except BaseException:  # noqa: B036  the tool did something else first: ask --help
            return None
    return None


def _help_process(path):
    return subprocess.Popen([sys.executable, str(path), '--help'],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True,
                            cwd=ROOT)


def _options_from_help(path, process=None):
    process = process or _help_process(path)
    stdout, stderr = process.communicate(timeout=120)
    if process.returncode != 0:
        raise AssertionError(f'{path} --help failed:\n{stderr[-2000:]}')
    return set(_FLAG.findall(stdout)) | {'-h'}


_OPTIONS = {}  # tool path -> frozenset of its option strings


def prefetch_tool_options(tools):
    """Read the options of several tools at once: their ``--help`` processes run concurrently
    (each imports torch and the mm stack, seconds apiece)."""
    pending = {}
    for tool in {Path(t) for t in tools} - set(_OPTIONS):
        if not tool.is_file():
            continue
        options = _options_from_function(tool)
        if options is not None:
            _OPTIONS[tool] = frozenset(options)
        else:
            pending[tool] = _help_process(tool)
    for tool, process in pending.items():
        _OPTIONS[tool] = frozenset(_options_from_help(tool, process))


def tool_options(tool):
    """The option strings (``--flag``) the command-line tool at ``tool`` (a Path) accepts."""
    prefetch_tool_options([tool])
    return _OPTIONS[Path(tool)]


def tools_named(text):
    """Every tools/X.py a markdown text names (for :func:`prefetch_tool_options`)."""
    return [ROOT / name for name in set(re.findall(r'\btools/[\w-]+\.py\b', text))]


def _check_python_tool(tokens, where):
    """``python [opts] tools/X.py args``: the tool exists and takes every ``--flag``."""
    for i, token in enumerate(tokens[1:], 1):
        if token.startswith('-'):
            if token == '-m':
                return []
            continue
        match = _TOOL.match(token)
        if not match or not token.endswith('.py'):
            return []
        tool = ROOT / match.group(1)
        if not tool.is_file():
            return []  # reported by the path check
        known = tool_options(tool)
        flags = [f for arg in tokens[i + 1:] for f in _FLAG.findall(arg)]
        return [f'{where}: {match.group(1)} has no option {f}' for f in flags if f not in known]
    return []


def _check_make(tokens, where):
    targets = [t for t in tokens[1:] if not t.startswith('-') and '=' not in t]
    return [
        f'{where}: Makefile has no target {t!r}' for t in targets if t not in makefile_targets()
    ]


def check_command(line, where):
    """Problems with one shell command line (continuations joined); [] when it is fine."""
    return _check_command(line, where)[0]


def _check_command(line, where):
    """(problems, whether the line ends in another directory: a ``cd`` outside ``( )``)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as error:
        return [f'{where}: cannot parse {line.strip()!r} ({error})'], False
    problems = []
    for tokens, in_subshell in segments(tokens):
        tokens = [t for t in tokens if t]
        while tokens and (_ENV_ASSIGN.match(tokens[0]) or tokens[0] in ('env', 'time')):
            tokens = tokens[1:]
        if not tokens:
            continue
        if tokens[0] == 'cd' and not in_subshell:
            return problems, True
        for token in tokens:
            bare = token.strip('[]"\'')
            tool = _TOOL.match(bare)
            if tool and not (ROOT / tool.group(1)).exists():
                problems.append(f'{where}: {tool.group(1)} does not exist')
            for config in _CONFIG.findall(bare):
                if not any(c in config for c in '*?{') and not (ROOT / config).exists():
                    problems.append(f'{where}: {config} does not exist')
        command = os.path.basename(tokens[0])
        if re.fullmatch(r'python[\d.]*', command) or tokens[0] in ('$(PY)', '$PY'):
            problems += _check_python_tool(tokens, where)
        elif command == 'make':
            problems += _check_make(tokens, where)
    return problems, False


def check_links(text, path):
    """Every relative link of the markdown file at ``path`` resolves to an existing file."""
    problems, base = [], Path(path).parent
    for number, line in enumerate(prose(text), 1):
        targets = _LINK.findall(line) + _REF_LINK.findall(line)
        for target in targets:
            if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I) or target.startswith('#'):
                continue
            file = target.split('#', 1)[0]
            if not (base / file).exists():
                problems.append(f'{Path(path).name}:{number}: link {target} does not resolve')
    return problems


def check_markdown(text, path):
    """All problems of one markdown text; ``path`` locates it (relative links, messages)."""
    name = Path(path).name
    prefetch_tool_options(tools_named(text))
    problems = check_links(text, path)
    for info, first_line, body in fenced_blocks(text):
        words = info.split()
        if not words or words[0] not in SHELL_LANGS or 'illustrative' in words:
            continue
        for number, line in logical_lines(body, first_line):
            if _ILLUSTRATIVE.search(line):
                continue
            found, moved = _check_command(line, f'{name}:{number}')
            problems += found
            if moved:  # the rest of the block runs in another tree (an mmdeploy checkout)
                break
    return problems


def doc_files():
    return [ROOT / 'README.md'] + sorted((ROOT / 'docs').glob('*.md'))


@pytest.fixture(scope='module')
def all_tool_options():
    """One concurrent round of ``--help`` runs for every tool any page names."""
    prefetch_tool_options([t for p in doc_files() for t in tools_named(p.read_text())])


@pytest.mark.parametrize('path', doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_commands_and_links(path, all_tool_options):
    assert check_markdown(path.read_text(), path) == []


def test_docs_pages_and_summaries():
    """The eight pages exist; each opens with a title and a two-line summary."""
    for page in DOC_PAGES:
        lines = (ROOT / 'docs' / f'{page}.md').read_text().splitlines()
        assert lines[0].startswith('# '), page
        assert lines[1] == '' and lines[2] and lines[3] and not lines[4], page


def test_readme_is_short():
    assert len((ROOT / 'README.md').read_text().splitlines()) <= 200


FIXTURE_CASES = {
    'unknown flag': ('```bash\npython tools/reparameterize.py CFG CKPT --out D --no-such-flag\n```',
                     ['reparameterize.py has no option --no-such-flag']),
    'unknown flag, continued line':
    ('```sh\npython tools/reparameterize.py CFG CKPT \\\n    --out D --bogus\n```',
     ['has no option --bogus']),
    'missing tool':
    ('```bash\npython tools/no_such_tool.py --x\n```', ['tools/no_such_tool.py does not exist']),
    'missing script': ('```shell\nbash tools/no_such.sh\n```', ['tools/no_such.sh does not exist']),
    'missing make target':
    ('```bash\nmake test && make no-such-target\n```', ["no target 'no-such-target'"]),
    'missing config': ('```bash\npython tools/reparameterize.py configs/no.py K --out D\n```',
                       ['configs/no.py does not exist']),
    'broken link': ('See [the page](docs/no_such_page.md#part).', ['link docs/no_such_page.md']),
    'illustrative line':
    ('```bash\npython tools/reparameterize.py C K --bad  # illustrative\n```', []),
    'illustrative block': ('```bash illustrative\npython tools/reparameterize.py C K --bogus\n```',
                           []),
    'after cd': ('```bash\ncd mmdeploy\npython tools/deploy.py configs/mmdet/x.py --bogus\n```',
                 []),
    'not a shell block': ('```text\n$ python tools/reparameterize.py --bogus\n```', []),
    'known flags': ('```bash\npython tools/reparameterize.py C K --out D [--ema|--no-ema] '
                    '--input-size 1 2\nmake demo\n```\n[ok](README.md#install)', []),
}


def test_options_from_help_of_a_tool_without_parser_function():
    tool = ROOT / 'tests' / 'docs_fixture' / 'help_only_tool.py'
    assert _options_from_function(tool) is None
    assert tool_options(tool) == {'-h', '--help', '--alpha', '--beta-gamma'}


@pytest.mark.parametrize('case', sorted(FIXTURE_CASES))
def test_checker_reports(case):
    """The checker fails where it should (and only there): fixture texts, one fault each."""
    text, expected = FIXTURE_CASES[case]
    problems = check_markdown(text, ROOT / 'README.md')
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected):
        assert fragment in problem
