"""Multi-process training on CPUs (gloo), which mmengine 0.10.7 cannot start by itself.

mmengine's ``init_dist('pytorch')`` calls ``torch.cuda.set_device`` and its DDP wrapper passes
``device_ids=[LOCAL_RANK]``; both fail without a GPU. torch's ``SyncBatchNorm`` refuses CPU
tensors once a process group exists. On a GPU none of this is used; on CPUs (CI, laptops,
clusters without accelerators) ``prepare_cpu_distributed`` starts the gloo process group itself
and selects :class:`CPUDistributedDataParallel`, which drops ``device_ids`` and gives SyncBN
layers a CPU all-reduce path.
"""
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from torch.nn.modules.batchnorm import _BatchNorm


def _statistics_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16 activations (as CUDA SyncBN computes them), else ``x``'s own."""
    return torch.promote_types(x.dtype, torch.float32)


class CPUSyncBatchNorm(_BatchNorm):
    """A SyncBatchNorm that synchronises CPU tensors (gloo all-reduce).

    Same state as ``nn.SyncBatchNorm`` (an instance is converted by swapping its class), but not
    a subclass of it: DDP refuses ``nn.SyncBatchNorm`` in CPU modules. Batch statistics are the
    global ones: per-channel sums of x and x^2 and the element count are all-reduced
    (differentiably, so the gradient is the synchronised one too), then the running statistics
    are updated as ``nn.SyncBatchNorm`` does. Eval mode and single processes use plain BN.

    Mixed precision (``--amp``: bf16 activations under CPU autocast) is handled as CUDA's
    SyncBN handles half inputs: the statistics (sums, mean, variance, the all-reduce) are
    float32 (float64 stays float64), since bf16 keeps 8 bits and a sum over a batch of maps
    would lose the mean; the running statistics stay in their own dtype; the output has the
    input's dtype.
    """

    process_group = None

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or \
                dist.get_world_size(self.process_group or dist.group.WORLD) == 1:
            return super().forward(x)
        xs = x.to(_statistics_dtype(x))
        mean, var, total = self._global_statistics(xs)
        if self.track_running_stats:
            self._update_running_statistics(mean.detach(), var.detach(), total)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.to(xs.dtype)
        out = (xs - mean.view(shape)) * scale.view(shape)
        if self.affine:
            out = out + self.bias.to(xs.dtype).view(shape)
        return out.to(x.dtype)  # one rounding to the input's dtype, at the end

    def _global_statistics(self, x: torch.Tensor):
        """Per-channel mean and (biased) variance over all processes' batches, and the global
        element count per channel, all in ``x``'s dtype (float32 or float64)."""
        from torch.distributed.nn.functional import all_reduce
        dims = [0] + list(range(2, x.dim()))
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), x.square().sum(dims), count])
        stats = all_reduce(stats, group=self.process_group or dist.group.WORLD)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean.square()).clamp_min(0)
        return mean, var, total

    @torch.no_grad()
    def _update_running_statistics(self, mean, var, total) -> None:
        self.num_batches_tracked.add_(1)
        momentum = (1.0 /
                    float(self.num_batches_tracked) if self.momentum is None else self.momentum)
        unbiased = var * (total / (total - 1).clamp_min(1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


@MODEL_WRAPPERS.register_module(force=True)
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for models on the CPU: no ``device_ids``, CPU-capable SyncBN."""

    def __init__(self, module: nn.Module, device_ids=None, **kwargs):
        on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
        if on_cpu:
            device_ids = None
            for m in module.modules():
                if isinstance(m, nn.SyncBatchNorm):
                    m.__class__ = CPUSyncBatchNorm
        super().__init__(module=module, device_ids=device_ids, **kwargs)


def prepare_cpu_distributed(cfg, launcher: str) -> bool:
    """On a machine without CUDA, start the gloo process group for ``launcher='pytorch'``
    (torchrun's environment) and select :class:`CPUDistributedDataParallel`.

    Returns whether it did anything. A config's own ``model_wrapper_cfg`` is kept.
    """
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if launcher != 'pytorch':
        raise RuntimeError(f'launcher={launcher!r} needs GPUs; on CPUs use torchrun with '
                           '--launcher pytorch (tools/dist_train.sh).')
    if not dist.is_initialized():
        dist.init_process_group(
            backend='gloo', rank=int(os.environ['RANK']), world_size=int(os.environ['WORLD_SIZE']))
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='CPUDistributedDataParallel',
            broadcast_buffers=False,  # what mmengine's default DDP wrapper uses
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    return True
