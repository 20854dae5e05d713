"""``ReparamKernelCacheHook``: validate and test an unconverted model at the plain model's cost.

A re-param layer generates its kernel every forward (never stale, no device sync); during a
validation or test epoch the parameters do not change, so generating once per epoch is enough.
The hook opens :func:`orepa_mm.cnn.kernel_cache.cached_kernels` for each val / test epoch and
closes it after. Its priority is below EMAHook's, so the cache is filled with whatever
parameters EMAHook swapped in for validation (the cache is filled lazily, at the first batch).
Add it to a config with ``custom_hooks=[dict(type='ReparamKernelCacheHook')]`` (the shipped
configs do).
"""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..cnn.kernel_cache import cached_kernels


@HOOKS.register_module()
class ReparamKernelCacheHook(Hook):
    """Reuse each re-param layer's kernel within a validation / test epoch (see module doc)."""

    priority = 'LOW'

    def __init__(self):
        self._context = None

    def _open(self, runner) -> None:
        self._close()
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self._context = cached_kernels(model)
        self._context.__enter__()

    def _close(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            context.__exit__(None, None, None)

    def before_train_epoch(self, runner) -> None:
        # Never cached in training, even if a validation epoch ended without its after-hook
        # (an exception caught by the caller): a frozen teacher's .data updates must be seen.
        self._close()

    def before_val_epoch(self, runner) -> None:
        self._open(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._close()

    def before_test_epoch(self, runner) -> None:
        self._open(runner)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._close()
