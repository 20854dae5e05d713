# Copyright (c) OpenMMLab. All rights reserved.
"""Test (and evaluate) an mmdet, mmseg or mmpretrain checkpoint (mmdet 3.3's
tools/test.py).

Usage: python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE]
       [--show] [--show-dir DIR] [--wait-time S] [--tta]
       [--cfg-options k=v ...] [--launcher L]

The config's ``default_scope`` picks the library (and what ``--out`` and
``--show-dir`` mean, as in that library's own test.py). A missing dataset or
checkpoint, a checkpoint that is not a plain runner checkpoint, or an
unusable flag ends the run with one sentence on stderr and exit status 2.
"""
import warnings

# setuptools' "pkg_resources is deprecated" UserWarning, raised while the mm
# libraries import: nothing a user can act on. Must precede those imports.
warnings.filterwarnings(
    'ignore', message='pkg_resources is deprecated', category=UserWarning)

import orepa_mm  # noqa: E402,F401  registers OREPA modules and the safe loader
from orepa_mm.checkpoint_check import check_checkpoint_paths  # noqa: E402
from orepa_mm.checkpoint_loading import \
    register_safe_checkpoint_loader  # noqa: E402
from orepa_mm.data_check import check_dataset_paths  # noqa: E402
from orepa_mm.tools_utils import (add_dump_results,  # noqa: E402
                                  apply_test_args, build_runner,
                                  exit_on_user_error, load_config,
                                  parse_test_args)


def main(argv=None):
    args = parse_test_args(argv)
    with exit_on_user_error():
        register_safe_checkpoint_loader()  # idempotent; see checkpoint_loading
        cfg = load_config(args)
        apply_test_args(cfg, args)
        check_checkpoint_paths(cfg, 'test')
        check_dataset_paths(cfg, ('test', ))

        runner = build_runner(cfg)
        add_dump_results(runner, cfg, args.out)
        runner.test()


if __name__ == '__main__':
    main()
