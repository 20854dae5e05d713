"""INT8 post-training quantization of a deployed model's backbone + neck: what it costs, where.

    python tools/quantization_check.py DEPLOY_DIR [--calib N] [--images M] [--eval]
        [--out FILE.json] [--save-onnx FILE.onnx] [--keep-fp32 LAYER ...]
        [--calibration minmax|entropy|percentile] [--top K] [--rank-by spread|sqnr]
        [--threads T]

DEPLOY_DIR is what ``tools/reparameterize.py ... --out DEPLOY_DIR`` wrote (``deploy.pth`` +
``deploy_config.py``). The backbone (+ neck) is exported to ONNX and quantized with ONNX
Runtime's ``quantize_static`` (QDQ, int8 weights per output channel, uint8 activations per
tensor), calibrated on the first N images of the config's val dataset; then it prints

* per output: cosine similarity and SQNR (dB) of INT8 against fp32 on M other val images;
* the layers most at risk: per deployed conv, the spread of its per-output-channel weight
  ranges, the calibrated range of its input activation, and its own SQNR;
* with ``--eval``: the task metric (the config's val_evaluator on the whole val set) with the
  fp32 and with the INT8 backbone + neck in ONNX Runtime, heads in PyTorch.

Exit codes (the same in every orepa_mm tool, see orepa_mm.utils.errors): 0 checked (and --out /
--save-onnx written); 2 bad input or bad command line (missing directory, not a deploy
directory, no val data, an output name that cannot be written, ... : one sentence on stderr,
nothing written); 130 interrupted. --out and --save-onnx are checked before any work and
written together at the end (an existing file is replaced only by a complete new one).
"""
import argparse
import sys
import warnings

# setuptools' "pkg_resources is deprecated" UserWarning, raised while the mm libraries import:
# nothing a user can act on. Must precede those imports (in main()).
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='exit codes: 0 checked, 2 bad input or usage, 130 interrupted')
    parser.add_argument('deploy_dir', help='directory written by tools/reparameterize.py --out')
    parser.add_argument(
        '--calib',
        type=int,
        default=8,
        help='calibration images, the first ones of the val dataset (default 8)')
    parser.add_argument(
        '--images',
        type=int,
        default=8,
        help='val images (after the calibration ones) INT8 is compared with fp32 '
        'on (default 8)')
    parser.add_argument(
        '--eval',
        action='store_true',
        help='also evaluate the task metric on the whole val set, fp32 and INT8 '
        'backbone + neck')
    parser.add_argument('--out', help='write the report as JSON to this file')
    parser.add_argument('--save-onnx', help='write the INT8 backbone + neck (ONNX, QDQ) here')
    parser.add_argument(
        '--keep-fp32',
        nargs='+',
        default=[],
        metavar='LAYER',
        help='layers (module names from the report, or a prefix) left in float')
    parser.add_argument(
        '--calibration',
        default='minmax',
        choices=['minmax', 'entropy', 'percentile'],
        help='ONNX Runtime calibration method (default minmax)')
    parser.add_argument('--top', type=int, default=10, help='layers listed (default 10)')
    parser.add_argument(
        '--rank-by',
        default='spread',
        choices=['spread', 'sqnr'],
        help='order of the layer list: weight range spread (default) or lowest '
        'layer SQNR first')
    parser.add_argument(
        '--threads', type=int, default=1, help='CPU threads for torch and ONNX Runtime (default 1)')
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> int:
    import torch

    from orepa_mm.apis.quantization import QuantizationCheckError, quantization_check
    if args.top < 0:
        raise QuantizationCheckError(f'--top must be 0 or more (layers listed), got {args.top}.')
    torch.set_num_threads(max(1, args.threads))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        report = quantization_check(
            args.deploy_dir,
            calib=args.calib,
            images=args.images,
            run_eval=args.eval,
            out=args.out,
            save_onnx=args.save_onnx,
            threads=args.threads,
            calibration=args.calibration,
            keep_fp32=args.keep_fp32)
    print()
    print(report.table(top=args.top, rank_by=args.rank_by))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after argument parsing so --help and usage errors stay instant.
    from orepa_mm.utils.errors import run_tool
    return run_tool(lambda: check(args))


if __name__ == '__main__':
    sys.exit(main())
