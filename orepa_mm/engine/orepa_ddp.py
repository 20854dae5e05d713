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

How (from the wrapper, through the one hook the re-param base class has for it; the layers'
code and classes are not changed):

* The re-param layers whose forward is the kernel conv of :class:`ReparamConv2d` (OREPA k x k,
  1 x 1 and large-kernel blocks, OREPA-VGG's dense branch) are the wrapper's: each one's
  :attr:`~ReparamConv2d.kernel_source` is a weak reference to the wrapper's reducer. At the
  start of the wrapper's forward the reducer generates each trainable layer's ``K`` and a
  detached leaf copy ``K_d`` (the "kernel proxy"); until the end of the backward,
  ``layer.kernel()`` -- hence the layer's forward and its ``weight`` -- is ``K_d``. So the loss
  graph ends at ``K_d`` and the branch parameters stay out of it (also inside
  activation-checkpointed blocks, whose recomputation only ever sees the leaf). Frozen layers
  (no parameter requires grad) generate their own kernels. DDP is told to ignore these
  layers' branch parameters and constant buffers (``bias`` stays with DDP); the wrapper
  broadcasts them from rank 0 once, at construction.
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
* No module-level state: the layers, the process group and the held gradients are the
  reducer's, and the reducer is the wrapper's. Deleting the wrapper frees them (the layers'
  weak ``kernel_source`` then resolves to nothing and they generate their own kernels again;
  the process group is destroyed). A copy of a layer (EMA, deploy, ``DataParallel`` replica)
  is not owned: it generates its own kernel.

Gradient accumulation (``no_sync()``, mmengine's ``accumulative_counts``): the kernel gradients
of non-synchronised steps are summed per layer (K-sized) and all-reduced with the next
synchronised step's, then back-propagated once, *in addition to* what the branch ``.grad``
hold by then (exact: the branch parameters, hence ``J``, do not change between micro-steps).
Loss terms that reach the branch parameters without the kernel (an L2 term over all
parameters) are accumulated by autograd into ``.grad`` as usual and are not all-reduced: such
a term must be the same on every rank, as a regulariser of the parameters is (terms on
``layer.weight``, data-dependent or not, go through the kernel proxy and are reduced).
Whether the user reset the gradients in between is read from the branch ``.grad``, without a
device sync: while a kernel gradient is held, ``.grad`` is materialised (zeros where it was
None) and a hook re-marks its (tensor, version) after every autograd accumulation, so any
other change is the user's:

* every ``.grad`` of the layer set to None (``zero_grad()``, with torch's and mmengine's
  default ``set_to_none=True``): the held kernel gradient is dropped with them, exactly as
  the micro-steps' gradients are;
* anything else -- changed in place (``zero_grad(set_to_none=False)``, a rescaling or
  clipping) or replaced, or only some of a layer's gradients reset -- raises: the held kernel
  gradient is not in ``.grad``, so its share of the change is unknown (``.grad.zero_()`` and
  ``.grad.mul_(0.5)`` of all-zero materialised gradients look the same), and guessing would be
  silently wrong. Before the first micro-step of a cycle nothing is held, so every form of
  ``zero_grad`` works there, as do clipping and unscaling after the synchronised backward.

A layer frozen between micro-steps keeps its held kernel gradient, which is reduced and
back-propagated at the synchronised step (what DDP with ``find_unused_parameters=True`` does
for a parameter used only in ``no_sync`` steps); a change of ``requires_grad`` of only some of
one layer's parameters during accumulation raises.
"""
import contextlib
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

from ..cnn.precision import is_compiling
from ..cnn.reparam_conv import ReparamConv2d
from .cpu_distributed import CPUDistributedDataParallel

NAME = 'OREPADistributedDataParallel'
#: DDP's bucket sizes: a small first bucket (communication starts early), then 25 MiB.
FIRST_BUCKET_BYTES = 1024 * 1024
DEFAULT_BUCKET_CAP_MB = 25


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
    """Fixed bucket assignment of the reduced kernel layers (identical on every rank)."""

    def __init__(self, reduced: Tuple[int, ...], numels: Sequence[int], keys: Sequence[tuple],
                 element_size: Sequence[int], cap_bytes: int):
        self.reduced = reduced
        self.buckets: List[List[int]] = []
        self.bucket_of: Dict[int, int] = {}
        self.offset: Dict[int, int] = {}
        self.bucket_numel: List[int] = []
        self.bucket_key: List[tuple] = []
        current, size, cap = [], 0, FIRST_BUCKET_BYTES
        for idx in reversed(reduced):  # backward order: last layers' gradients come first
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

    def __init__(self, layout: _Layout, trainable: frozenset, sync: bool):
        self.layout = layout
        self.trainable = trainable
        self.sync = sync
        self.proxies: Dict[int, _Proxy] = {}
        self.grads: Dict[int, Tensor] = {}
        self.missing = [len(b) for b in layout.buckets]
        self.next_bucket = 0
        self.works = []
        self.started = False
        self.closed = False


class _Held:
    """A layer's kernel gradient summed over ``no_sync`` steps, and what its branch ``.grad``
    were (tensor, version) when autograd last wrote them: any other change is the user's."""

    __slots__ = ('grad', 'params', 'marks', 'handles')

    def __init__(self, grad: Tensor, params: Sequence[Tensor]):
        self.grad = grad
        self.params = tuple(params)
        self.marks: List[Tuple[Tensor, int]] = [None] * len(self.params)
        self.handles = []
        for j in range(len(self.params)):
            self.mark(j)

    def mark(self, j: int):
        grad = self.params[j].grad
        self.marks[j] = (grad, grad._version)

    def changed(self) -> List[int]:
        """Positions of the parameters whose ``.grad`` changed since autograd last wrote it."""
        return [
            j for j, (p, (grad, version)) in enumerate(zip(self.params, self.marks))
            if p.grad is not grad or grad._version != version
        ]


def _before_accumulation(reducer_ref, idx: int, held: _Held, grad: Tensor):
    """Hook on a branch parameter while its layer holds a kernel gradient: before autograd
    adds to ``.grad``, see whether the user reset it since (weak: the layers never keep the
    reducer alive)."""
    reducer = reducer_ref()
    if reducer is not None and reducer.held.get(idx) is held:
        reducer.verify_held(idx)


def _after_accumulation(held: _Held, j: int, param: Tensor):
    """Autograd wrote ``.grad``: that change is not the user's."""
    held.mark(j)


def _release(group, held: Dict[int, _Held], retired: list):
    """When the reducer is freed: its hooks go, its process group is destroyed."""
    for entry in held.values():
        retired.extend(entry.handles)
    for handle in retired:
        handle.remove()
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(ValueError, RuntimeError):  # already destroyed with WORLD
            dist.destroy_process_group(group)


@contextlib.contextmanager
def _requiring_grad(params: Sequence[Tensor]):
    """Frozen parameters require grad for the duration (a kernel gradient held from before
    they were frozen is back-propagated to them)."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class _KernelGradReducer:
    """Kernel proxies, bucketed asynchronous all-reduce of kernel gradients, local backprop.

    The ``kernel_source`` of the layers it owns: :meth:`kernel_for`.
    """

    def __init__(self, module: nn.Module, process_group=None, bucket_cap_mb=None):
        named = kernel_forward_layers(module)
        self.names = [name for name, _ in named]
        self.layers = [layer for _, layer in named]
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
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
        #: layer -> its kernel gradient held from no_sync steps
        self.held: Dict[int, _Held] = {}
        #: layer -> its parameters that required grad in a no_sync step since the last
        #: synchronised one (reduced at the next synchronised step, frozen or not by then)
        self.pending: Dict[int, Tuple[Tensor, ...]] = {}
        self._retired = []  # hook handles of released held gradients, removed at safe points
        self._generating: Optional[int] = None
        self._ref = weakref.ref(self)
        finalizer = weakref.finalize(self, _release, self.group, self.held, self._retired)
        finalizer.atexit = False  # at exit, destroy_process_group() takes every group

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
        unless ``init_sync=False``), a layout check, then this reducer as the layers'
        kernel source."""
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
            layer.kernel_source = self._ref

    def _check_same_layers(self):
        signature = [
            len(self.layers),
            sum(self.numels),
            sum((i + 1) * n for i, n in enumerate(self.numels))
        ]
        local = torch.tensor(signature, dtype=torch.float64, device=self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        if any(not torch.equal(g, local) for g in gathered):
            raise RuntimeError(f'{NAME}: the ranks built different re-param layers '
                               f'({[g.tolist()[:2] for g in gathered]} [layers, kernel '
                               'elements]); every rank must wrap the same model.')

    # -- the layers' kernel source ----------------------------------------------------------
    def kernel_for(self, layer) -> Optional[Tensor]:
        """The kernel proxy ``layer`` convolves with, or None: the layer generates its own.

        Proxies are used from the wrapper's forward until the end of its backward: in the
        forward, in a direct call of the module before backward (as DDP's hooks also reduce
        such uses), in ``layer.weight`` (a loss term on it is reduced with the kernel
        gradient), and when a checkpointed block is recomputed during backward. None for a
        layer this reducer does not own (a copy made by deepcopy or DataParallel carries the
        same weak reference), for a frozen layer, and for the reducer's own generation.
        """
        idx = self._index.get(id(layer))
        if idx is None or self.layers[idx] is not layer or idx == self._generating:
            return None
        round_ = self.round
        if round_ is None or round_.closed:
            return None
        if idx not in round_.trainable:
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.params[idx]):
                raise RuntimeError(f'{NAME}: {self.names[idx]} started requiring grad during '
                                   'a step; change requires_grad between steps.')
            return None
        if not torch.is_grad_enabled():
            entry = round_.proxies.get(idx)
            fresh = entry is not None and entry.versions == tuple(p._version
                                                                  for p in self.params[idx])
            return entry.proxy if fresh else None
        return self._proxy(round_, idx)

    def _generate(self, idx: int) -> Tensor:
        """The layer's own kernel, with autograd (this reducer steps aside meanwhile)."""
        self._generating = idx
        try:
            with torch.enable_grad():
                return self.layers[idx].kernel()
        finally:
            self._generating = None

    # -- forward ---------------------------------------------------------------------------
    def begin(self, sync: bool) -> _Round:
        """Called by the wrapper's forward (with grad enabled)."""
        self._remove_retired()
        round_ = self.round
        if round_ is not None and round_.started and not round_.closed:
            # its backward stopped with an error before the end: nothing to finish
            round_.closed = True
            round_ = self.round = None
        for name, layer in zip(self.names, self.layers):
            if layer.kernel_source is not self._ref:
                raise RuntimeError(f'{NAME}: {name} now takes its kernel from another wrapper '
                                   'of the same model; use only the newest wrapper.')
        trainable = frozenset(i for i, params in enumerate(self.params)
                              if any(p.requires_grad for p in params))
        self._check_whole_layers_froze(trainable)
        reduced = tuple(sorted(trainable | set(self.pending)))
        if self.layout is None or self.layout.reduced != reduced:
            self.layout = _Layout(reduced, self.numels, self.keys, self.element_size,
                                  self.cap_bytes)
        if round_ is None or round_.closed or round_.layout is not self.layout \
                or round_.trainable != trainable:
            round_ = self.round = _Round(self.layout, trainable, sync)
        # else: a forward whose backward has not started goes on in the same round; its
        # proxies are reused where the parameters are unchanged (two forwards, one backward).
        round_.sync = sync
        return round_

    def _check_whole_layers_froze(self, trainable: frozenset):
        for idx in trainable & set(self.pending):
            now = {id(p) for p in self.params[idx] if p.requires_grad}
            if now != {id(p) for p in self.pending[idx]}:
                raise RuntimeError(f'{NAME}: only some parameters of {self.names[idx]} changed '
                                   'requires_grad during gradient accumulation (no_sync); '
                                   'freeze or unfreeze whole layers, or change requires_grad '
                                   'after the synchronised step.')

    def make_proxies(self, round_: _Round):
        """Generate every trainable layer's kernel and its proxy, before the module's forward.

        Outside the model's own code, so an activation-checkpointed block only ever sees the
        proxy (a leaf): its recomputation saves what its forward saved, and the kernel graphs
        keep their saved tensors for the local backprop. Proxies whose parameters are
        unchanged since an earlier forward of this round are kept.
        """
        for idx in sorted(round_.trainable):
            self._proxy(round_, idx)

    def _proxy(self, round_: _Round, idx: int) -> Tensor:
        versions = tuple(p._version for p in self.params[idx])
        entry = round_.proxies.get(idx)
        if entry is not None and entry.versions == versions:
            return entry.proxy
        if is_compiling():
            raise RuntimeError(f'{NAME}: kernel proxies cannot be traced by torch.compile '
                               '(the wrapper runs its forward eagerly; do not compile the '
                               're-param layers on their own).')
        kernel = self._generate(idx)
        if not kernel.requires_grad:
            raise RuntimeError(f'{NAME}: {self.names[idx]} stopped requiring grad during a '
                               'forward; change requires_grad between steps.')
        proxy = kernel.detach().requires_grad_()
        entry = _Proxy(kernel, proxy, versions)
        proxy.register_hook(functools.partial(self._on_grad, round_, idx, entry))
        round_.proxies[idx] = entry
        return proxy

    def mark_outputs(self, round_: _Round, output):
        """Route the outputs through :class:`_BackwardStart` when this round has kernel
        gradients to reduce (proxies, or gradients held from no_sync steps)."""
        if not round_.layout.buckets:
            return output
        leaves, spec = tree_flatten(output)
        positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.requires_grad]
        if not positions:
            return output
        marked = _BackwardStart.apply(
            functools.partial(self._start_backward, round_), *[leaves[i] for i in positions])
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
            flat = layout.flats[b] = torch.empty(numel + len(layers), dtype=dtype, device=device)
        used = []
        for idx in layers:
            dst = flat[layout.offset[idx]:layout.offset[idx] + self.numels[idx]]
            grad, acc = round_.grads.get(idx), self._take_held(idx)
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
            self.pending.clear()
        finally:
            round_.closed = True
            round_.proxies.clear()
            round_.grads.clear()
            round_.works.clear()
            if self.round is round_:
                self.round = None
            self._remove_retired()

    def _backprop(self, round_: _Round, b: int, flat: Tensor):
        layout = round_.layout
        layers = layout.buckets[b]
        numel = layout.bucket_numel[b]
        used = flat[numel:].tolist()
        kernels, grads, frozen = [], [], []
        with torch.enable_grad():
            for idx, flag in zip(layers, used):
                if flag <= 0:
                    continue  # used on no rank: its gradients stay as they are, as with DDP
                start = layout.offset[idx]
                grad = flat[start:start + self.numels[idx]].view(self.shapes[idx])
                entry = round_.proxies.get(idx)
                if entry is not None:
                    kernels.append(entry.kernel)
                    grads.append(grad)
                elif idx in round_.trainable:
                    kernels.append(self._generate(idx))
                    grads.append(grad)
                else:  # frozen since its no_sync steps
                    frozen.append((idx, grad))
            if kernels:
                torch.autograd.backward(kernels, grads)
            for idx, grad in frozen:
                params = list(self.pending[idx])
                with _requiring_grad(params):
                    torch.autograd.backward(self._generate(idx), grad, inputs=params)
        # A kernel that passed a gradient through unchanged could have had its view of the
        # (reused) bucket stored as a parameter's .grad: give such a gradient its own memory.
        storage = flat.untyped_storage().data_ptr()
        for idx in layers:
            for p in self.params[idx]:
                if p.grad is not None and p.grad.untyped_storage().data_ptr() == storage:
                    p.grad = p.grad.clone()

    # -- gradient accumulation ------------------------------------------------------------------
    def _hold_unsynced(self, round_: _Round):
        """A no_sync step: add its kernel gradients to the held ones; the branch ``.grad``
        keep what autograd put there directly."""
        for idx in round_.trainable:
            self.pending[idx] = tuple(p for p in self.params[idx] if p.requires_grad)
        for idx, grad in round_.grads.items():
            acc = self._take_held(idx)
            grad = grad.reshape(-1)
            self._hold(idx, grad.clone() if acc is None else acc.add_(grad))

    def _hold(self, idx: int, grad: Tensor):
        params = [p for p in self.params[idx] if p.requires_grad]
        for p in params:
            if p.grad is None:  # materialised, so that zero_grad() shows as None
                p.grad = torch.zeros_like(p)
        held = _Held(grad, params)
        for j, p in enumerate(params):
            held.handles.append(
                p.register_hook(functools.partial(_before_accumulation, self._ref, idx, held)))
            held.handles.append(
                p.register_post_accumulate_grad_hook(
                    functools.partial(_after_accumulation, held, j)))
        self.held[idx] = held

    def _take_held(self, idx: int) -> Optional[Tensor]:
        """The kernel gradient held from no_sync steps, unless the user reset the gradients."""
        held = self.held.pop(idx, None)
        if held is None:
            return None
        self._retired.extend(held.handles)
        return held.grad if self._still_holds(idx, held) else None

    def verify_held(self, idx: int):
        """Drop the held kernel gradient of layer ``idx`` if the user reset its gradients."""
        held = self.held[idx]
        if not self._still_holds(idx, held):
            self.held.pop(idx)
            self._retired.extend(held.handles)

    def _still_holds(self, idx: int, held: _Held) -> bool:
        """False if the user set every branch ``.grad`` of the layer to None since autograd
        last wrote them; raises for any other change (see the module docstring)."""
        changed = held.changed()
        if not changed:
            return True
        if len(changed) == len(held.params) and all(p.grad is None for p in held.params):
            return False
        raise RuntimeError(f'{NAME}: the gradients of {self.names[idx]} were changed between '
                           'no_sync steps other than by setting all of them to None, which '
                           'cannot be applied to its held kernel gradient; reset with '
                           'zero_grad() (set_to_none=True), and scale or clip gradients after '
                           'the synchronised backward.')

    def _remove_retired(self):
        """Remove the hooks of released held gradients (never from inside a hook)."""
        for handle in self._retired:
            handle.remove()
        self._retired.clear()


@MODEL_WRAPPERS.register_module(force=True)
class OREPADistributedDataParallel(CPUDistributedDataParallel):
    """``DistributedDataParallel`` that all-reduces OREPA kernel gradients, not branch ones.

    Same use as mmengine's ``MMDistributedDataParallel`` / torch's DDP (``forward``,
    ``loss.backward()``, optimizer step, ``no_sync``, ``train_step`` / ``val_step`` /
    ``test_step``, ``.module``; on CPUs no ``device_ids`` and CPU SyncBN, as
    :class:`CPUDistributedDataParallel`). Per step it communicates what the deployed (plain)
    model would: each re-param layer's kernel gradient instead of its branch gradients. The
    result equals stock DDP's to floating-point rounding, and replicas stay bit-identical.
    Under ``torch.compile`` its forward runs eagerly.

    Select it with ``model_wrapper_cfg = dict(type='OREPADistributedDataParallel')``; keyword
    arguments go to ``DistributedDataParallel`` (``bucket_cap_mb`` also sizes the kernel
    buckets). Not supported (refused): ``detect_anomalous_params``, DDP's
    ``mixed_precision`` (use AMP), ``join()``, communication hooks, ``create_graph=True``
    backward, and changing gradients in place between ``no_sync`` steps (see the module
    docstring).
    """

    def __init__(self, module: nn.Module, device_ids=None, detect_anomalous_params=False, **kwargs):
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

    # Kernel proxies and gradient hooks cannot be traced: under torch.compile (e.g. mmengine's
    # compile=True, which compiles train_step) this forward runs eagerly. torch's lazy form of
    # torch.compiler.disable, which DDP applies to its own methods, imports Dynamo on the first
    # call rather than on ``import orepa_mm`` (~0.5 s).
    @torch._disable_dynamo
    def forward(self, *inputs, **kwargs):
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
