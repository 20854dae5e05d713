# Copyright (c) OpenMMLab. All rights reserved.
"""Train an mmdet, mmseg or mmpretrain config (mmdet 3.3's tools/train.py).

Usage: python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]]
       [--amp] [--auto-scale-lr] [--cfg-options k=v ...] [--launcher L]

The config's ``default_scope`` picks the library. A missing dataset, a
missing checkpoint (``--resume CKPT``, ``load_from``, a ``Pretrained``
``init_cfg``), a checkpoint that is not a plain runner checkpoint, or an
unusable flag ends the run, before anything is built, with one sentence on
stderr and exit status 2.
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
from orepa_mm.tools_utils import (apply_train_args, build_runner,  # noqa: E402
                                  config_scope, exit_on_user_error,
                                  load_config, parse_train_args, train_splits)


def main(argv=None):
    args = parse_train_args(argv)
    with exit_on_user_error():
        register_safe_checkpoint_loader()  # idempotent; see checkpoint_loading
        cfg = load_config(args)
        config_scope(cfg)
        apply_train_args(cfg, args)
        check_dataset_paths(cfg, train_splits(cfg))
        check_checkpoint_paths(cfg, 'train', resume_arg=args.resume)

        runner = build_runner(cfg)
        runner.train()


if __name__ == '__main__':
    main()
