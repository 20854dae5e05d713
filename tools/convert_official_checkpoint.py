"""Convert the authors' OREPA ImageNet checkpoint (.pth.tar) into an orepa_mm backbone checkpoint.

    python tools/convert_official_checkpoint.py RepVGG-A0_OREPA.pth.tar checkpoints/orepa_vgg_a0.pth

The result loads with ``init_cfg=dict(type='Pretrained', checkpoint=DST)`` into the matching
``OREPAResNet`` / ``OREPAVGG`` with no missing or unexpected keys. The architecture is inferred
from the keys; the classifier head is dropped and reported. A file that is not an authors'
checkpoint, or that does not map completely, is refused: non-zero exit, nothing written.
"""
import argparse
import os
import sys
import tempfile

import torch

import orepa_mm  # noqa: F401  (registers the backbones the check builds)
from orepa_mm.official_checkpoint import OfficialCheckpointError, convert_official_state_dict


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help="the authors' checkpoint (.pth.tar)")
    parser.add_argument('dst', help='where to write the orepa_mm checkpoint (.pth)')
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f'error: {message}', file=sys.stderr)
    return 1


def save_atomically(obj, dst: str):
    """Write to a temporary file beside ``dst``, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.pth', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isfile(args.src):
        return fail(f'{args.src} does not exist; pass the path of the downloaded .pth.tar.')
    try:
        checkpoint = torch.load(args.src, map_location='cpu', weights_only=True)
    except Exception as exc:  # truncated, corrupt, or carrying pickled code
        return fail(f'cannot read {args.src} as a tensor checkpoint ({type(exc).__name__}); '
                    're-download the file.')
    try:
        state_dict, report = convert_official_state_dict(checkpoint)
    except OfficialCheckpointError as exc:
        return fail(f'{args.src} is not a convertible OREPA checkpoint: {exc}.')
    meta = dict(converted_from=os.path.basename(args.src), architecture=report.architecture)
    try:
        save_atomically(dict(state_dict=state_dict, meta=meta), args.dst)
    except OSError as exc:
        return fail(f'cannot write {args.dst} ({exc.strerror or exc}); choose a writable path.')
    for line in report.lines():
        print(line)
    print(f'wrote {args.dst}: {len(state_dict)} tensors; use it with '
          f"init_cfg=dict(type='Pretrained', checkpoint='{args.dst}')")
    return 0


if __name__ == '__main__':
    sys.exit(main())
