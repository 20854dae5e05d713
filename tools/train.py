# Copyright (c) OpenMMLab. All rights reserved.
"""Train an mmdet, mmseg or mmpretrain config (mmdet 3.3's tools/train.py).

Usage: python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]]
       [--amp] [--auto-scale-lr] [--cfg-options k=v ...] [--launcher L]

The config's ``default_scope`` picks the library. Bad input (a missing or
broken config, a malformed ``--cfg-options`` value, a work dir that is a file,
a missing dataset, a missing, unreadable or unsafe checkpoint: ``--resume
CKPT``, ``load_from``, a ``Pretrained`` ``init_cfg``) ends the run before
anything is built or written, with one sentence on stderr and exit status 2
(see ``orepa_mm.utils.errors``; Ctrl-C: 130).
"""
import warnings

# setuptools' "pkg_resources is deprecated" UserWarning, raised while the mm
# libraries import: nothing a user can act on. Must precede those imports.
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)

import sys  # noqa: E402

import orepa_mm  # noqa: E402,F401  registers OREPA modules and the safe loader
from orepa_mm.utils.checkpoint_io import register_safe_checkpoint_loader  # noqa: E402
from orepa_mm.utils.cli import (apply_train_args, build_runner, check_checkpoints, config_scope,
                                load_config, parse_train_args, train_splits)
from orepa_mm.utils.data_check import check_dataset_paths  # noqa: E402
from orepa_mm.utils.errors import run_tool  # noqa: E402


def train(argv=None) -> None:
    args = parse_train_args(argv)
    register_safe_checkpoint_loader()  # idempotent; see checkpoint_loading
    cfg = load_config(args)
    config_scope(cfg)
    apply_train_args(cfg, args)
    check_dataset_paths(cfg, train_splits(cfg))
    check_checkpoints(cfg, 'train', resume_arg=args.resume)

    runner = build_runner(cfg)
    runner.train()


def main(argv=None) -> int:
    return run_tool(lambda: train(argv))


if __name__ == '__main__':
    sys.exit(main())
