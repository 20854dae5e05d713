"""Convert the authors' OREPA ImageNet checkpoint (.pth.tar) into an orepa_mm backbone checkpoint.

    python tools/convert_official_checkpoint.py RepVGG-A0_OREPA.pth.tar checkpoints/orepa_vgg_a0.pth

The result loads with ``init_cfg=dict(type='Pretrained', checkpoint=DST)`` into the matching
``OREPAResNet`` / ``OREPAVGG`` with no missing or unexpected keys. The architecture is inferred
from the keys; the classifier head is dropped and reported. A file that is not an authors'
checkpoint, or that does not map completely, is refused: one sentence on stderr, exit status 2,
nothing written. A checkpoint mmengine or orepa_mm wrote (a runner checkpoint from
tools/train.py, this tool's own output, a deployed checkpoint) is named as such: those need no
conversion. DST follows the tools' write policy (``orepa_mm.utils.atomic_write``): checked
before the source is read, written beside itself and moved into place; an existing DST is
replaced only by a complete new file (and the tool says so).
"""
import argparse
import os
import sys
import warnings

# setuptools' "pkg_resources is deprecated" UserWarning, raised while the mm libraries import:
# nothing a user can act on. Must precede those imports.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

import torch  # noqa: E402

import orepa_mm  # noqa: E402,F401  (registers the backbones the check builds)
from orepa_mm.apis.official_checkpoint import OfficialCheckpointError, convert_official_state_dict
from orepa_mm.utils.atomic_write import OutputSet
from orepa_mm.utils.checkpoint_check import describe_checkpoint  # noqa: E402
from orepa_mm.utils.checkpoint_io import UnsafeCheckpointError, load_from_local  # noqa: E402
from orepa_mm.utils.errors import OrepaInputError, check_readable_file, run_tool

EXPECTED = ("this tool converts the authors' ImageNet checkpoints (ResNet-50_OREPA.pth.tar and "
            "the like: a state_dict of 'module.stage0...' tensors)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help="the authors' checkpoint (.pth.tar)")
    parser.add_argument('dst', help='where to write the orepa_mm checkpoint (.pth)')
    return parser.parse_args(argv)


def fail(message: str):
    raise OrepaInputError(message)


# What to do instead, by the kind describe_checkpoint() names.
NO_CONVERSION = {
    'runner':
    'which needs no conversion: pass it to tools/test.py or tools/reparameterize.py, '
    'or use it as load_from',
    'deployed':
    'which needs no conversion: use it as is with its deploy_config.py',
    'converted':
    "which needs no further conversion: use it as is with "
    "init_cfg=dict(type='Pretrained', checkpoint=...)",
}


def read_checkpoint(src: str):
    """The file's contents, without running pickled code.

    The authors' checkpoints are plain tensors and load weights-only. mmengine's runner
    checkpoints also pickle numpy values and HistoryBuffer logs, which weights-only refuses;
    orepa_mm's runner-checkpoint loader allows exactly those, so such a file is read (and then
    named for what it is) instead of being called corrupt.
    """
    try:
        with warnings.catch_warnings():  # torch's notes on the pickle protocol: not the user's
            warnings.simplefilter('ignore')
            return torch.load(src, map_location='cpu', weights_only=True)
    except Exception as first:  # noqa: BLE001
        try:
            return load_from_local(src, map_location='cpu')
        except UnsafeCheckpointError:
            raise
        except Exception:  # noqa: BLE001 - not a runner checkpoint either: report the first
            raise first from None


def convert(args: argparse.Namespace) -> int:
    outputs = OutputSet('choose another DST path')
    dst = outputs.add(args.dst, 'DST')
    check_readable_file(args.src, 'source checkpoint', 'pass the path of the downloaded .pth.tar')
    if os.path.realpath(args.src) == os.path.realpath(dst):
        fail(f'DST {args.dst} is the source checkpoint itself; write the converted checkpoint '
             'to another path.')
    outputs.check()
    try:
        checkpoint = read_checkpoint(args.src)
    except UnsafeCheckpointError as exc:  # carrying pickled code: never run
        fail(f'{str(exc).rstrip(".")}; {EXPECTED}.')
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt
        fail(f'cannot read {args.src} as a tensor checkpoint ({type(exc).__name__}); '
             're-download the file.')
    found = describe_checkpoint(checkpoint)
    if found is not None:
        fail(f'{args.src} is {found.description}, {NO_CONVERSION[found.kind]}; {EXPECTED}.')
    try:
        state_dict, report = convert_official_state_dict(checkpoint)
    except OfficialCheckpointError as exc:
        fail(f'{args.src} is not a convertible OREPA checkpoint: {exc}.')
    meta = dict(converted_from=os.path.basename(args.src), architecture=report.architecture)
    with outputs.write() as staged:
        torch.save(dict(state_dict=state_dict, meta=meta), staged[dst])
    for line in report.lines():
        print(line)
    replaced = ' (replaced the previous file)' if outputs.replaced else ''
    print(f'wrote {args.dst}{replaced}: {len(state_dict)} tensors; use it with '
          f"init_cfg=dict(type='Pretrained', checkpoint='{args.dst}')")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: convert(args))


if __name__ == '__main__':
    sys.exit(main())
