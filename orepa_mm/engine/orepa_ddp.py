"""Data-parallel OREPA at the plain model's communication cost: all-reduce kernel gradients.

Stock ``DistributedDataParallel`` all-reduces the gradient of every parameter. An OREPA layer's
kernel ``K = f(theta)`` is a function of many branch parameters (ResNet-50: 68.6M parameters
for a 25.6M-parameter deployed model), so stock DDP moves ~2.7x the plain model's bytes. But
``K`` is identical on every replica and the branch gradient is linear in the kernel gradient,
``dL/dtheta = J(theta)^T dL/dK`` with the same ``J`` on every rank, so

    mean_r J^T g_r  ==  J^T mean_r g_r

(exactly in real arithmetic; to rounding in floating point). :class:`OREPADistributedDataParallel`
all-reduces ``dL/dK`` (K-sized: the plain model's bytes) and back-propagates the averaged kernel
gradient to the branches locally, on every rank alike.

How (all of it from the wrapper; the conv layers are not modified):

* The re-param layers whose forward is the kernel conv of :class:`ReparamConv2d` (OREPA k x k,
  1 x 1 and large-kernel blocks, OREPA-VGG's dense branch) are the wrapper's. At the start of
  its forward it generates each trainable layer's ``K`` and a detached leaf copy ``K_d`` (the
  "kernel proxy"); an instance ``forward`` set on each layer runs the class forward with
  ``self.kernel()`` returning ``K_d``. So the loss graph ends at ``K_d`` and the branch
  parameters stay out of it (also inside activation-checkpointed blocks, whose recomputation
  only ever sees the leaf). Frozen layers (no parameter requires grad) keep their cached
  kernel. DDP is told to ignore these layers' branch parameters and constant buffers (``bias``
  stays with DDP); the wrapper broadcasts them from rank 0 once, at construction.
* A hook on each ``K_d`` fires when its gradient is complete. Kernel gradients are packed into
  buckets (DDP's sizes: 1 MiB first, then ``bucket_cap_mb``; fixed, in reverse layer order,
  identical on every rank) and each bucket's asynchronous all-reduce starts as soon as all its
  layers are ready, on a process group of its own (so its collectives never interleave with
  DDP's or SyncBN's), overlapping the rest of the backward pass.
* At the end of the backward pass (an autograd engine callback, as DDP's own), each bucket is
  waited for in order and its averaged kernel gradients are back-propagated through the
  kernel graphs (``torch.autograd.backward(K, mean g)``), accumulating into the branch
  ``.grad``. ``loss.backward()`` returns with every gradient final, as with DDP.
* Every other parameter (norms, heads, plain convs, DBB layers, biases) goes through the stock
  DDP reducer underneath.
* Each bucket carries one extra element per layer, "this rank's loss reached the kernel",
  summed by the same all-reduce: a layer no rank used keeps its gradients as they were (as
  DDP leaves a globally unused parameter), one used on some ranks only is back-propagated with
  the others' average (its kernel regenerated where this rank had none).

``no_sync()`` (gradient accumulation, mmengine's ``accumulative_counts``): kernel gradients of
non-synchronised steps are summed per layer, K-sized, and all-reduced with the next
synchronised step's, then back-propagated once (exact: the branch parameters, hence ``J``, do
not change between micro-steps). Meanwhile the branch ``.grad`` are left as they were
(materialised as zeros where they were ``None``); zeroing them, as ``optimizer.zero_grad()``
does, also drops the held kernel gradients.
"""
import functools
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from mmengine.registry import MODEL_WRAPPERS
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..cnn.reparam_conv import ReparamConv2d
from .cpu_distributed import CPUDistributedDataParallel

NAME = 'OREPADistributedDataParallel'
#: DDP's bucket sizes: a small first bucket (communication starts early), then 25 MiB.
FIRST_BUCKET_BYTES = 1024 * 1024
DEFAULT_BUCKET_CAP_MB = 25

#: layer -> the reducer that owns it (weak: a deep copy of a layer is not in here, so an EMA
#: copy or a deployed copy of the model runs the class forward).
_OWNERS: 'weakref.WeakKeyDictionary[nn.Module, _KernelGradReducer]' = \
    weakref.WeakKeyDictionary()


def kernel_forward_layers(module: nn.Module) -> List[Tuple[str, ReparamConv2d]]:
    """(name, layer) of the re-param layers whose gradients go through their kernel.

    A layer qualifies when its forward is :meth:`ReparamConv2d.forward` (a conv with
    ``self.kernel()``) and not overridden on the instance; layers inside another re-param
    layer (the stacked 3 x 3 kernels of the large-kernel stem) belong to that layer. DBB,
    whose branches run on the features, does not qualify and stays with DDP.
    """
    found = []

    def visit(prefix: str, m: nn.Module):
        if isinstance(m, ReparamConv2d):
            if type(m).forward is ReparamConv2d.forward and 'forward' not in vars(m):
                found.append((prefix, m))
            return  # nested re-param layers belong to their parent
        for name, child in m.named_children():
            visit(f'{prefix}.{name}' if prefix else name, child)

    visit('', module)
    return found


def _proxy_forward(self, *args, **kwargs):
    """Instance forward of an owned layer: the class forward with the kernel proxy."""
    reducer = _OWNERS.get(self)
    proxy = reducer.kernel_for(self) if reducer is not None else None
    if proxy is None:
        return type(self).forward(self, *args, **kwargs)
    used = []

    def kernel():
        used.append(True)
        return proxy

    self.__dict__['kernel'] = kernel
    try:
        out = type(self).forward(self, *args, **kwargs)
    finally:
        self.__dict__.pop('kernel', None)
    if not used:
        raise RuntimeError(f'{NAME}: {type(self).__name__}.forward no longer takes its kernel '
                           'from self.kernel(), so its branch gradients would not be reduced.')
    return out


# pickle names a bound method by its function's __name__: let a pickled layer load as plain.
_proxy_forward.__name__ = 'forward'

_EAGER: Dict[str, object] = {}


def _run_eagerly_under_compile():
    """Kernel proxies and gradient hooks are not traceable: under torch.compile (e.g.
    mmengine's ``compile=True``, which compiles ``train_step``) the wrapper's forward and the
    layers' instance forward run eagerly. Applied when the first wrapper is built, because
    ``torch.compiler.disable`` imports Dynamo (~0.5 s), which ``import orepa_mm`` should not."""
    if not _EAGER:
        _EAGER['proxy_forward'] = torch.compiler.disable(_proxy_forward)
        cls = OREPADistributedDataParallel
        cls.forward = torch.compiler.disable(cls.forward)
    return _EAGER['proxy_forward']


class _BackwardStart(torch.autograd.Function):
    """Identity on the wrapper's outputs whose backward tells the reducer backward began (and
    queues its end-of-backward callback on the outermost graph task)."""

    @staticmethod
    def forward(ctx, callback, *tensors):
        ctx.callback = callback
        return tuple(t.clone() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.callback()
        return (None, *grads)


class _Layout:
    """Fixed bucket assignment of the trainable kernel layers (identical on every rank)."""

    def __init__(self, trainable: Tuple[int, ...], numels: Sequence[int],
                 keys: Sequence[tuple], element_size: Sequence[int], cap_bytes: int):
        self.trainable = trainable
        self.buckets: List[List[int]] = []
        self.bucket_of: Dict[int, int] = {}
        self.offset: Dict[int, int] = {}
        self.bucket_numel: List[int] = []
        self.bucket_key: List[tuple] = []
        current, size, cap = [], 0, FIRST_BUCKET_BYTES
        for idx in reversed(trainable):  # backward order: last layers' gradients come first
            nbytes = numels[idx] * element_size[idx]
            if current and (size + nbytes > cap or keys[idx] != keys[current[0]]):
                self._close(current, numels, keys)
                current, size, cap = [], 0, cap_bytes
            current.append(idx)
            size += nbytes
        if current:
            self._close(current, numels, keys)
        # One persistent buffer per bucket (as DDP's): a fresh one each step would cost the
        # page faults of touching new memory every step.
        self.flats: List[Optional[Tensor]] = [None] * len(self.buckets)

    def _close(self, layers, numels, keys):
        b, offset = len(self.buckets), 0
        for idx in layers:
            self.bucket_of[idx], self.offset[idx] = b, offset
            offset += numels[idx]
        self.buckets.append(layers)
        self.bucket_numel.append(offset)
        self.bucket_key.append(keys[layers[0]])


class _Proxy:
    __slots__ = ('kernel', 'proxy', 'versions')

    def __init__(self, kernel, proxy, versions):
        self.kernel, self.proxy, self.versions = kernel, proxy, versions


class _Round:
    """One forward/backward: the kernel proxies, the gradients received, the buckets sent."""

    def __init__(self, layout: _Layout, sync: bool):
        self.layout = layout
        self.sync = sync
        self.proxies: Dict[int, _Proxy] = {}
        self.grads: Dict[int, Tensor] = {}
        self.missing = [len(b) for b in layout.buckets]
        self.next_bucket = 0
        self.works = []
        self.started = False
        self.closed = False


class _KernelGradReducer:
    """Kernel proxies, bucketed asynchronous all-reduce of kernel gradients, local backprop."""

    def __init__(self, module: nn.Module, process_group=None, bucket_cap_mb=None):
        named = kernel_forward_layers(module)
        self.names = [name for name, _ in named]
        self.layers = [layer for _, layer in named]
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        self.params = [layer.kernel_parameters() for layer in self.layers]
        self.numels, self.keys, self.element_size, self.shapes = [], [], [], []
        for layer in self.layers:
            ref = layer.branch_parameter()
            shape = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
            self.shapes.append(torch.Size(shape))
            self.numels.append(self.shapes[-1].numel())
            self.keys.append((ref.dtype, ref.device))
            self.element_size.append(ref.element_size())
        cap = DEFAULT_BUCKET_CAP_MB if bucket_cap_mb is None else bucket_cap_mb
        self.cap_bytes = int(cap * 1024 * 1024)
        self.ignored_names, self.broadcast_tensors = self._owned_state(module)
        first = next(module.parameters(), None)
        self.device = first.device if first is not None else torch.device('cpu')
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        # A group of its own: these collectives are issued from autograd hooks and never
        # need to be ordered against DDP's or SyncBN's on the model's group.
        self.group = dist.new_group(ranks=ranks)
        self.world_size = dist.get_world_size(self.group)
        self.layout: Optional[_Layout] = None
        self.round: Optional[_Round] = None
        self.accumulated: Dict[int, Tensor] = {}
        self.marks: Dict[int, list] = {}

    def _owned_state(self, module):
        owned_params, owned_names, buffers = set(), set(), []
        for prefix, layer in zip(self.names, self.layers):
            join = (lambda n, p=prefix: f'{p}.{n}' if p else n)
            for name, p in layer.named_parameters(remove_duplicate=False):
                if name != 'bias':
                    owned_params.add(id(p))
                    owned_names.add(join(name))
            for name, b in layer.named_buffers(remove_duplicate=False):
                owned_names.add(join(name))
                buffers.append(b)
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in owned_params and name not in owned_names:
                raise ValueError(f'{NAME} cannot train {name!r}: it is a branch parameter of '
                                 'a re-param layer shared with another module; wrap this model '
                                 'with DistributedDataParallel instead.')
        tensors = list({id(p): p for layer_params in self.params for p in layer_params}.values())
        tensors += list({id(b): b for b in buffers}.values())
        return owned_names, tensors

    # -- set-up --------------------------------------------------------------------------------
    def attach(self, broadcast: bool = True):
        """Same branch values on every rank (rank 0's, as DDP does for the other parameters
        unless ``init_sync=False``), a layout check, the layer hooks."""
        self._check_same_layers()
        if broadcast and self.broadcast_tensors:
            src = dist.get_global_rank(self.group, 0)
            by_kind: Dict[tuple, List[Tensor]] = {}
            for t in self.broadcast_tensors:
                by_kind.setdefault((t.dtype, t.device), []).append(t)
            with torch.no_grad():
                for tensors in by_kind.values():
                    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
                    dist.broadcast(flat, src=src, group=self.group)
                    offset = 0
                    for t in tensors:
                        t.copy_(flat[offset:offset + t.numel()].view_as(t))
                        offset += t.numel()
        for layer in self.layers:
            layer.clear_kernel_cache()
            _OWNERS[layer] = self
            layer.__dict__['forward'] = _run_eagerly_under_compile().__get__(layer)

    def _check_same_layers(self):
        signature = [len(self.layers), sum(self.numels),
                     sum((i + 1) * n for i, n in enumerate(self.numels))]
        local = torch.tensor(signature, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        if any(not torch.equal(g, local) for g in gathered):
            raise RuntimeError(f'{NAME}: the ranks built different re-param layers '
                               f'({[g.tolist()[:2] for g in gathered]} [layers, kernel '
                               'elements]); every rank must wrap the same model.')

    # -- forward ---------------------------------------------------------------------------
    def begin(self, sync: bool) -> _Round:
        """Called by the wrapper's forward (with grad enabled)."""
        round_ = self.round
        if round_ is not None and round_.started and not round_.closed:
            # its backward stopped with an error before the end: nothing to finish
            round_.closed = True
            round_ = self.round = None
        trainable = tuple(i for i, params in enumerate(self.params)
                          if any(p.requires_grad for p in params))
        if self.layout is None or self.layout.trainable != trainable:
            self.layout = _Layout(trainable, self.numels, self.keys, self.element_size,
                                  self.cap_bytes)
            for idx in list(self.accumulated):
                if idx not in self.layout.bucket_of:
                    self.accumulated.pop(idx)
                    self.marks.pop(idx, None)
        if round_ is None or round_.closed or round_.layout is not self.layout:
            round_ = self.round = _Round(self.layout, sync)
        # else: a forward whose backward has not started goes on in the same round; its
        # proxies are reused where the parameters are unchanged (two forwards, one backward).
        round_.sync = sync
        return round_

    def make_proxies(self, round_: _Round):
        """Generate every trainable layer's kernel and its proxy, before the module's forward.

        Outside the model's own code, so an activation-checkpointed block only ever sees the
        proxy (a leaf): its recomputation saves what its forward saved, and the kernel graphs
        keep their saved tensors for the local backprop. Proxies whose parameters are
        unchanged since an earlier forward of this round are kept.
        """
        for idx in round_.layout.trainable:
            self._proxy(round_, idx)

    def _proxy(self, round_: _Round, idx: int) -> Optional[Tensor]:
        versions = tuple(p._version for p in self.params[idx])
        entry = round_.proxies.get(idx)
        if entry is not None and entry.versions == versions:
            return entry.proxy
        if torch.compiler.is_compiling():
            raise RuntimeError(f'{NAME}: kernel proxies cannot be traced by torch.compile '
                               '(the wrapper runs its forward eagerly; do not compile the '
                               're-param layers on their own).')
        with torch.enable_grad():
            kernel = self.layers[idx].kernel()
        if not kernel.requires_grad:
            raise RuntimeError(f'{NAME}: {self.names[idx]} stopped requiring grad during a '
                               'forward; change requires_grad between steps.')
        proxy = kernel.detach().requires_grad_()
        entry = _Proxy(kernel, proxy, versions)
        proxy.register_hook(functools.partial(self._on_grad, round_, idx, entry))
        round_.proxies[idx] = entry
        return proxy

    def kernel_for(self, layer) -> Optional[Tensor]:
        """The kernel proxy ``layer`` convolves with, or None for the class forward.

        Proxies are used from the wrapper's forward until the end of its backward: in the
        forward, in a direct call of the module before backward (as DDP's hooks also reduce
        such uses), and when a checkpointed block is recomputed during backward.
        """
        round_ = self.round
        if round_ is None or round_.closed:
            return None
        idx = self.index[layer]
        if idx not in round_.layout.bucket_of:
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.params[idx]):
                raise RuntimeError(f'{NAME}: {self.names[idx]} started requiring grad during '
                                   'a step; change requires_grad between steps.')
            return None  # frozen: its kernel is a constant (cached by the layer)
        if not torch.is_grad_enabled():
            entry = round_.proxies.get(idx)
            fresh = entry is not None and entry.versions == tuple(
                p._version for p in self.params[idx])
            return entry.proxy if fresh else None
        return self._proxy(round_, idx)

    def mark_outputs(self, round_: _Round, output):
        """Route the outputs through :class:`_BackwardStart` when the forward made proxies."""
        if not round_.proxies:
            return output
        leaves, spec = tree_flatten(output)
        positions = [i for i, x in enumerate(leaves)
                     if isinstance(x, Tensor) and x.requires_grad]
        if not positions:
            return output
        marked = _BackwardStart.apply(functools.partial(self._start_backward, round_),
                                      *[leaves[i] for i in positions])
        for i, t in zip(positions, marked):
            leaves[i] = t
        return tree_unflatten(leaves, spec)

    # -- backward --------------------------------------------------------------------------
    def _check_open(self, round_: _Round):
        if round_ is not self.round or round_.closed:
            raise RuntimeError(f'{NAME}: this backward reaches a forward whose kernel '
                               'gradients were already reduced (a second backward through '
                               'one forward), which DistributedDataParallel does not support '
                               'either; run the forward again.')

    def _start_backward(self, round_: _Round):
        self._check_open(round_)
        if torch.is_grad_enabled():
            raise RuntimeError(f'{NAME} does not support create_graph=True (double backward '
                               'through the kernels); use DistributedDataParallel.')
        if not round_.started:
            round_.started = True
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(self._finalize, round_))

    def _on_grad(self, round_: _Round, idx: int, entry: _Proxy, grad: Tensor):
        self._check_open(round_)
        if round_.proxies.get(idx) is not entry:
            raise RuntimeError(f'{NAME}: backward reached the kernel of {self.names[idx]} from '
                               'a forward made before its parameters changed.')
        self._start_backward(round_)
        if idx in round_.grads:  # a second gradient for one kernel (reentrant checkpoints)
            if round_.sync and round_.layout.bucket_of[idx] < round_.next_bucket:
                raise RuntimeError(f'{NAME}: {self.names[idx]} received a gradient after its '
                                   'bucket was sent (a layer shared between reentrant '
                                   'checkpoint segments); use use_reentrant=False.')
            round_.grads[idx] = round_.grads[idx] + grad
            return
        round_.grads[idx] = grad
        if round_.sync:
            round_.missing[round_.layout.bucket_of[idx]] -= 1
            while (round_.next_bucket < len(round_.layout.buckets)
                   and round_.missing[round_.next_bucket] == 0):
                self._launch(round_)

    def _take_accumulated(self, idx: int) -> Optional[Tensor]:
        """The kernel gradient held from no_sync steps, unless the branch grads were reset."""
        acc = self.accumulated.pop(idx, None)
        marks = self.marks.pop(idx, ())
        if acc is not None and any(p.grad is not g or g._version != v for p, g, v in marks):
            return None  # zero_grad() since: the held gradient goes with the others
        return acc

    def _launch(self, round_: _Round):
        """Pack the next bucket (gradients + one used-flag per layer) and start its
        asynchronous all-reduce."""
        b = round_.next_bucket
        layout = round_.layout
        layers = layout.buckets[b]
        dtype, device = layout.bucket_key[b]
        numel = layout.bucket_numel[b]
        flat = layout.flats[b]
        if flat is None:
            flat = layout.flats[b] = torch.empty(numel + len(layers), dtype=dtype,
                                                 device=device)
        used = []
        for idx in layers:
            dst = flat[layout.offset[idx]:layout.offset[idx] + self.numels[idx]]
            grad, acc = round_.grads.get(idx), self._take_accumulated(idx)
            if grad is None and acc is None:
                dst.zero_()
            elif acc is None:
                dst.copy_(grad.reshape(-1))
            elif grad is None:
                dst.copy_(acc)
            else:
                torch.add(acc, grad.reshape(-1), out=dst)
            used.append(0.0 if grad is None and acc is None else 1.0)
        flat[numel:].copy_(torch.tensor(used, dtype=dtype))
        flat.div_(self.world_size)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        round_.works.append((b, flat, work))
        round_.next_bucket += 1

    def _finalize(self, round_: _Round):
        """End of backward: send what is left, then per bucket wait and back-propagate."""
        if round_.closed:
            return
        try:
            if not round_.sync:
                self._hold_unsynced(round_)
                return
            while round_.next_bucket < len(round_.layout.buckets):
                self._launch(round_)
            for b, flat, work in round_.works:
                work.wait()
                self._backprop(round_, b, flat)
        finally:
            round_.closed = True
            round_.proxies.clear()
            round_.grads.clear()
            round_.works.clear()
            if self.round is round_:
                self.round = None

    def _backprop(self, round_: _Round, b: int, flat: Tensor):
        layout = round_.layout
        layers = layout.buckets[b]
        numel = layout.bucket_numel[b]
        used = flat[numel:].tolist()
        kernels, grads = [], []
        with torch.enable_grad():
            for idx, flag in zip(layers, used):
                if flag <= 0:
                    continue  # used on no rank: its gradients stay as they are, as with DDP
                entry = round_.proxies.get(idx)
                kernel = entry.kernel if entry is not None else self.layers[idx].kernel()
                start = layout.offset[idx]
                kernels.append(kernel)
                grads.append(flat[start:start + self.numels[idx]].view(self.shapes[idx]))
            if kernels:
                torch.autograd.backward(kernels, grads)
        # A kernel that passed a gradient through unchanged could have had its view of the
        # (reused) bucket stored as a parameter's .grad: give such a gradient its own memory.
        storage = flat.untyped_storage().data_ptr()
        for idx in layers:
            for p in self.params[idx]:
                if p.grad is not None and p.grad.untyped_storage().data_ptr() == storage:
                    p.grad = p.grad.clone()

    def _hold_unsynced(self, round_: _Round):
        """A no_sync step: add its kernel gradients to the held ones, touch no branch grad."""
        for idx, grad in round_.grads.items():
            acc = self._take_accumulated(idx)
            grad = grad.reshape(-1)
            self.accumulated[idx] = grad.clone() if acc is None else acc.add_(grad)
            marks = []
            for p in self.params[idx]:
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    marks.append((p, p.grad, p.grad._version))
            self.marks[idx] = marks


@MODEL_WRAPPERS.register_module(force=True)
class OREPADistributedDataParallel(CPUDistributedDataParallel):
    """``DistributedDataParallel`` that all-reduces OREPA kernel gradients, not branch ones.

    Same use as mmengine's ``MMDistributedDataParallel`` / torch's DDP (``forward``,
    ``loss.backward()``, optimizer step, ``no_sync``, ``train_step`` / ``val_step`` /
    ``test_step``, ``.module``; on CPUs no ``device_ids`` and CPU SyncBN, as
    :class:`CPUDistributedDataParallel`). Per step it communicates what the deployed (plain)
    model would: each re-param layer's kernel gradient instead of its branch gradients. The
    result equals stock DDP's to floating-point rounding, and replicas stay bit-identical.

    Select it with ``model_wrapper_cfg = dict(type='OREPADistributedDataParallel')``; keyword
    arguments go to ``DistributedDataParallel`` (``bucket_cap_mb`` also sizes the kernel
    buckets). Not supported (refused): ``detect_anomalous_params``, DDP's
    ``mixed_precision`` (use AMP), ``join()``, communication hooks, ``torch.compile``,
    ``create_graph=True`` backward.
    """

    def __init__(self, module: nn.Module, device_ids=None, detect_anomalous_params=False,
                 **kwargs):
        if detect_anomalous_params:
            raise ValueError(f'{NAME} does not support detect_anomalous_params: the branch '
                             'parameters are outside the loss graph by design.')
        if kwargs.get('mixed_precision') is not None:
            raise ValueError(f'{NAME} does not support DDP mixed_precision; use AMP '
                             '(--amp / an AMP optim wrapper) instead.')
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f'{NAME} needs an initialised process group (start with '
                               'torchrun and --launcher pytorch).')
        reducer = _KernelGradReducer(module, kwargs.get('process_group'),
                                     kwargs.get('bucket_cap_mb'))
        ignore = set(getattr(module, '_ddp_params_and_buffers_to_ignore', ()))
        ignore |= reducer.ignored_names
        if not any(p.requires_grad for n, p in module.named_parameters() if n not in ignore):
            raise ValueError(f'{NAME} needs at least one ordinary trainable parameter (a norm, '
                             'head or bias) besides the re-param kernels.')
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignore))
        super().__init__(module=module, device_ids=device_ids, **kwargs)
        self._kernel_reducer = reducer
        reducer.attach(broadcast=kwargs.get('init_sync', True))
        self._orepa_ready = True

    @property
    def kernel_layer_names(self) -> List[str]:
        """Names (in ``.module``) of the layers whose kernel gradients this wrapper reduces."""
        return list(self._kernel_reducer.names)

    def forward(self, *inputs, **kwargs):  # run eagerly under torch.compile: see above
        reducer = self._kernel_reducer
        round_ = reducer.begin(self.require_backward_grad_sync) \
            if torch.is_grad_enabled() else None
        if round_ is not None:
            reducer.make_proxies(round_)
        output = super().forward(*inputs, **kwargs)
        if round_ is not None:
            output = reducer.mark_outputs(round_, output)
        return output

    def join(self, *args, **kwargs):
        raise NotImplementedError(f'{NAME} does not support join() (uneven inputs): give every '
                                  'rank the same number of iterations.')

    def register_comm_hook(self, state, hook):
        if getattr(self, '_orepa_ready', False):
            raise NotImplementedError(f'{NAME} does not support communication hooks (the '
                                      'kernel gradients are reduced outside DDP\'s buckets).')
        return super().register_comm_hook(state, hook)
