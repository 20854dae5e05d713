# Copyright (c) OpenMMLab. All rights reserved.
"""Test (and evaluate) an mmdet, mmseg or mmpretrain checkpoint (mmdet 3.3's
tools/test.py).

Usage: python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE]
       [--show] [--show-dir DIR] [--wait-time S] [--tta]
       [--cfg-options k=v ...] [--launcher L]

The config's ``default_scope`` picks the library (and what ``--out`` and
``--show-dir`` mean, as in that library's own test.py). Bad input (a missing
or broken config, dataset or checkpoint, a checkpoint whose weights do not
fit the config's model, an unusable flag, an ``--out`` that cannot be
written) ends the run before anything is built, with one sentence on stderr
and exit status 2. ``--out`` follows the write policy of ``orepa_mm.utils.atomic_write``:
written beside its target and moved into place once the test has run.
"""
import warnings

# setuptools' "pkg_resources is deprecated" UserWarning, raised while the mm
# libraries import: nothing a user can act on. Must precede those imports.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

import sys  # noqa: E402

import orepa_mm  # noqa: E402,F401  registers OREPA modules and the safe loader
from orepa_mm.utils.checkpoint_io import register_safe_checkpoint_loader  # noqa: E402
from orepa_mm.utils.cli import (add_dump_results, apply_test_args, build_runner,
                                check_checkpoint_fits, check_checkpoints, check_test_outputs,
                                load_config, parse_test_args, stage_test_output)
from orepa_mm.utils.data_check import check_dataset_paths  # noqa: E402
from orepa_mm.utils.errors import run_tool  # noqa: E402


def test(argv=None) -> None:
    args = parse_test_args(argv)
    register_safe_checkpoint_loader()  # idempotent; see checkpoint_loading
    cfg = load_config(args)
    apply_test_args(cfg, args)
    outputs = check_test_outputs(cfg, args.out)
    weights = check_checkpoints(cfg, 'test')
    if weights is not None:
        check_checkpoint_fits(cfg, weights, args.checkpoint, args.config)
    check_dataset_paths(cfg, ('test', ))

    with outputs.write() as staged:
        out = stage_test_output(cfg, staged, args.out)
        runner = build_runner(cfg)
        add_dump_results(runner, cfg, out)
        runner.test()


def main(argv=None) -> int:
    return run_tool(lambda: test(argv))


if __name__ == '__main__':
    sys.exit(main())
