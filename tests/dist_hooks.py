"""Test-only hooks for the multi-process tests (imported by the runs via custom_imports)."""
import os

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class DumpRankState(Hook):
    """After training, every rank writes its parameters, buffers and DDP settings."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def after_train(self, runner):
        wrapper = runner.model
        model = wrapper.module if is_model_wrapper(wrapper) else wrapper
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(
            dict(
                params={
                    n: p.detach().clone()
                    for n, p in model.named_parameters()
                },
                buffers={
                    n: b.clone()
                    for n, b in model.named_buffers()
                },
                wrapper=type(wrapper).__name__,
                find_unused_parameters=getattr(wrapper, 'find_unused_parameters', None),
                norms=sorted(
                    {type(m).__name__
                     for m in model.modules() if 'Norm' in type(m).__name__})),
            os.path.join(self.out_dir, f'rank{runner.rank}.pth'))


@HOOKS.register_module(force=True)
class ReseedEveryEpoch(Hook):
    """Seeds torch/numpy from (seed, epoch) before each epoch, so that a resumed run draws the
    same random numbers as an uninterrupted one (mmengine does not checkpoint RNG states)."""

    def __init__(self, seed=0):
        self.seed = seed

    def before_train_epoch(self, runner):
        seed = self.seed * 1000 + runner.epoch
        torch.manual_seed(seed)
        np.random.seed(seed)
