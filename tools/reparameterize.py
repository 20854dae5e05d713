"""Re-parameterize a trained orepa_mm model into a verified stock checkpoint + config.

    python tools/reparameterize.py CONFIG CHECKPOINT --out DIR [--ema | --no-ema]
        [--device cpu|cuda] [--input-size H W] [--rtol 1e-9] [--onnx]

Works for mmdet detectors, mmseg segmentors and mmpretrain classifiers built from orepa_mm
backbones or with ``conv_cfg=dict(type='OREPA')`` (``'OREPAVGGConv'``, ``'DBB'``) anywhere.
Writes, only after the deployed model reproduced the train-time model's outputs:

* ``DIR/deploy.pth``         stock state dict + the original meta + ``meta['reparameterized']``
  (source checkpoint and config, EMA used, tolerance, per-output errors, orepa_mm version);
* ``DIR/deploy_config.py``   the same model with stock modules and no ``orepa_mm`` import;
* ``DIR/deploy_backbone.onnx`` with ``--onnx``: backbone (+ neck), checked with onnxruntime.

EMA weights (mmengine ``EMAHook``) are used when the checkpoint has them, unless ``--no-ema``.
The verification input has the config's test size (``--input-size`` overrides it).

Exit codes (the same in every orepa_mm tool, see orepa_mm.utils.errors):
    0    converted, verified and written;
    2    bad input or bad command line: missing/unreadable/corrupt/unsafe file, config and
         checkpoint do not match, nothing to re-parameterize, an output name that cannot be
         written (one sentence on stderr, found before any work);
    3    the checkpoint is already re-parameterized: nothing to do, use it as is;
    4    verification failed: an output is beyond --rtol (compared in float64), or beyond 1e-4
         in float32 where it cannot run in float64 (or onnxruntime);
    130  interrupted (Ctrl-C; 143 for SIGTERM).
Nothing is written unless the exit code is 0. Existing outputs in DIR are replaced all
together once the new ones are verified and written (a stale deploy_backbone.onnx is removed
when --onnx is not given); until then, and on any failure, they stay as they were.

Next step, from an mmdeploy checkout (see the printed command for your task):
    python tools/deploy.py configs/mmdet/detection/detection_onnxruntime_dynamic.py \\
        DIR/deploy_config.py DIR/deploy.pth demo.jpg --work-dir DIR/mmdeploy --device cpu \\
        --dump-info
"""
import argparse
import os.path as osp
import sys
import warnings

# setuptools' "pkg_resources is deprecated" UserWarning, raised while the mm libraries import:
# nothing a user can act on. Must precede those imports (in main()).
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='exit codes: 0 written, 2 bad input or usage, 3 already deployed, '
        '4 verification failed, 130 interrupted')
    parser.add_argument('config', help='train-time config file')
    parser.add_argument('checkpoint', help='train-time checkpoint file')
    parser.add_argument('--out', required=True, help='output directory')
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument(
        '--ema',
        dest='use_ema',
        action='store_true',
        default=None,
        help='require EMA weights and use them (default: use them if present)')
    ema.add_argument(
        '--no-ema',
        dest='use_ema',
        action='store_false',
        help='use the raw model weights even if EMA weights are present')
    parser.add_argument(
        '--device',
        default='cpu',
        choices=['cpu', 'cuda'],
        help='device for building and verifying (default: cpu)')
    parser.add_argument(
        '--input-size',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help="verification input size (default: the config's test size)")
    parser.add_argument(
        '--rtol',
        type=float,
        default=None,
        help='largest accepted relative error of any output, both models in '
        'float64 (default: 1e-9, orepa_mm.apis.reparameterize.DEFAULT_RTOL); '
        'the float32 agreement is reported beside it')
    parser.add_argument(
        '--onnx',
        action='store_true',
        help='also export backbone (+neck) to ONNX and check onnxruntime')
    return parser.parse_args(argv)


def reparameterize(args: argparse.Namespace) -> int:
    from orepa_mm.apis import VerificationError, reparameterize_checkpoint
    from orepa_mm.apis.reparameterize import DEFAULT_RTOL, DEPLOY_CHECKPOINT, format_errors
    rtol = DEFAULT_RTOL if args.rtol is None else args.rtol
    existed = osp.isfile(osp.join(args.out, DEPLOY_CHECKPOINT))

    try:
        with warnings.catch_warnings():
            # Library deprecation chatter would bury the one line that matters on stderr.
            warnings.simplefilter('ignore')
            result = reparameterize_checkpoint(
                args.config,
                args.checkpoint,
                args.out,
                use_ema=args.use_ema,
                device=args.device,
                input_size=tuple(args.input_size) if args.input_size else None,
                rtol=rtol,
                export_onnx=args.onnx)
    except VerificationError as exc:
        if exc.errors:
            print('\n'.join(format_errors(exc.errors, rtol)))
        raise
    print()
    print(result.table())
    if existed:
        print(f'(the previous outputs in {args.out} were replaced)')
    print()
    print('next, with mmdeploy (from its repository root):')
    print(f'  {result.mmdeploy_command()}')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after argument parsing so --help and usage errors stay instant.
    from orepa_mm.utils.errors import run_tool
    return run_tool(lambda: reparameterize(args))


if __name__ == '__main__':
    sys.exit(main())
