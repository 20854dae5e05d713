"""The deployed model's config: the train-time config rewritten to stock OpenMMLab modules.

After re-parameterization every orepa_mm layer is a plain ``nn.Conv2d`` under the same name and
every orepa_mm backbone has the state dict of the library class it subclasses. The config has to
say so, otherwise inference, the libraries' own ``tools/test.py`` and mmdeploy would still need
``import orepa_mm`` (and would rebuild multi-branch blocks the weights no longer fit). So:

* ``OREPAResNet`` / ``OREPAResNetV1c`` / ``OREPAResNetV1d`` become the library's ``ResNet`` /
  ``ResNetV1c`` / ``ResNetV1d`` (same scope, same arguments);
* ``OREPAVGG`` becomes mmpretrain's ``RepVGG(deploy=True)``; outside the mmpretrain scope that is
  ``mmpretrain.RepVGG`` and ``mmpretrain.models`` is added to ``custom_imports``;
* every ``conv_cfg`` naming an orepa_mm conv type (``OREPA``, ``OREPAVGGConv``, ``DBB``, ...)
  becomes ``None`` (a stock conv), wherever it sits (backbone, neck, heads);
* ``orepa_mm`` leaves ``custom_imports``, and orepa_mm's hooks (``ReparamKernelCacheHook``)
  leave ``custom_hooks``;
* ``Pretrained`` init_cfg entries, ``pretrained='...'`` paths and ``load_from`` are dropped:
  the weights are in ``deploy.pth`` and nothing should overwrite or download them.
"""
import copy
from pathlib import Path
from typing import Any, Optional, Union

from mmengine.config import Config

from ..registry import CONV_TYPES

#: orepa_mm ResNets and the stock class (same scope) their deployed state dict belongs to.
STOCK_RESNETS = {
    'OREPAResNet': 'ResNet',
    'OREPAResNetV1c': 'ResNetV1c',
    'OREPAResNetV1d': 'ResNetV1d',
}
#: OREPAVGG deploys to mmpretrain's RepVGG(deploy=True); only mmpretrain has RepVGG.
STOCK_REPVGG_SCOPE, STOCK_REPVGG = 'mmpretrain', 'RepVGG'
#: conv_cfg types that build orepa_mm layers (all bake into stock convs).
REPARAM_CONV_TYPES = frozenset(CONV_TYPES)
#: orepa_mm's hooks: they have nothing to do in a deployed model.
OREPA_HOOKS = frozenset({'ReparamKernelCacheHook'})
#: What custom_imports needs to know ``mmpretrain.RepVGG`` from another library's scope.
MMPRETRAIN_IMPORT = 'mmpretrain.models'


def _split_type(type_name: str):
    """``'mmdet.OREPAResNet'`` -> ``('mmdet.', 'OREPAResNet')``; no scope -> ``('', name)``."""
    scope, _, name = type_name.rpartition('.')
    return (scope + '.' if scope else ''), name


def is_reparam_conv_cfg(conv_cfg: Any) -> bool:
    """Whether a ``conv_cfg`` value builds an orepa_mm re-param layer."""
    if not isinstance(conv_cfg, dict) or not isinstance(conv_cfg.get('type'), str):
        return False
    return _split_type(conv_cfg['type'])[1] in REPARAM_CONV_TYPES


def _without_pretrained(init_cfg: Any) -> Any:
    """``init_cfg`` minus its ``Pretrained`` entries (``None`` when nothing is left)."""
    entries = init_cfg if isinstance(init_cfg, (list, tuple)) else [init_cfg]
    kept = [
        entry for entry in entries
        if not (isinstance(entry, dict) and str(entry.get('type', '')).endswith('Pretrained'))
    ]
    if not kept:
        return None
    return kept if isinstance(init_cfg, (list, tuple)) else kept[0]


class _Rewriter:
    """One walk over the model config; remembers whether mmpretrain must be imported."""

    def __init__(self, default_scope: Optional[str]):
        self.default_scope = default_scope
        self.needs_mmpretrain = False

    def visit(self, node: Any, scope: Optional[str]) -> Any:
        if isinstance(node, dict):
            return self._visit_dict(node, scope)
        if isinstance(node, (list, tuple)):
            return type(node)(self.visit(item, scope) for item in node)
        return node

    def _visit_dict(self, node: dict, scope: Optional[str]) -> dict:
        type_name = node.get('type')
        if isinstance(type_name, str):
            prefix, name = _split_type(type_name)
            scope = prefix[:-1] or scope
            if name in STOCK_RESNETS:
                node['type'] = prefix + STOCK_RESNETS[name]
            elif name == 'OREPAVGG':
                node['type'] = self._repvgg_type(prefix, scope)
                node['deploy'] = True
                node.pop('conv_cfg', None)  # RepVGG(deploy=True) builds stock convs
        for key in list(node.keys()):
            value = node[key]
            if key == 'conv_cfg' and is_reparam_conv_cfg(value):
                node[key] = None
            elif key == 'init_cfg' and value is not None:
                node[key] = _without_pretrained(value)
            elif key == 'pretrained' and isinstance(value, str):
                node[key] = None  # mmseg/mmdet's deprecated path argument
            else:
                node[key] = self.visit(value, scope)
        return node

    def _repvgg_type(self, prefix: str, scope: Optional[str]) -> str:
        if scope == STOCK_REPVGG_SCOPE:
            return prefix + STOCK_REPVGG
        self.needs_mmpretrain = True
        return f'{STOCK_REPVGG_SCOPE}.{STOCK_REPVGG}'


def _is_orepa_import(module: str) -> bool:
    return module == 'orepa_mm' or module.startswith('orepa_mm.')


def _rewrite_custom_imports(cfg: Config, needs_mmpretrain: bool) -> None:
    custom = cfg.get('custom_imports')
    imports = []
    if custom is not None:
        raw = custom.get('imports', [])
        imports = [raw] if isinstance(raw, str) else list(raw)
    imports = [module for module in imports if not _is_orepa_import(module)]
    if needs_mmpretrain and not any(m == 'mmpretrain' or m.startswith('mmpretrain.')
                                    for m in imports):
        imports.append(MMPRETRAIN_IMPORT)
    if imports:
        kept = dict(custom) if custom is not None else {}
        kept['imports'] = imports
        kept.setdefault('allow_failed_imports', False)
        cfg.custom_imports = kept
    elif 'custom_imports' in cfg:
        cfg._cfg_dict.pop('custom_imports')


def _drop_orepa_hooks(cfg: Config) -> None:
    hooks = cfg.get('custom_hooks')
    if not hooks:
        return
    kept = [
        hook for hook in hooks if not (isinstance(hook, dict) and isinstance(hook.get('type'), str)
                                       and _split_type(hook['type'])[1] in OREPA_HOOKS)
    ]
    if kept:
        cfg.custom_hooks = kept
    else:
        cfg._cfg_dict.pop('custom_hooks')


def deploy_config(cfg: Union[Config, str, Path]) -> Config:
    """The config of the re-parameterized model: stock modules only, no orepa_mm import.

    ``cfg`` is a train-time :class:`~mmengine.config.Config` or a path to one (it is not
    modified). The result's model builds, with nothing of orepa_mm registered, a network whose
    state dict is key for key that of the train-time model after re-parameterization.
    """
    if isinstance(cfg, (str, Path)):
        cfg = Config.fromfile(str(cfg))
    cfg = copy.deepcopy(cfg)
    if 'model' not in cfg:
        raise KeyError('the config has no `model`')
    rewriter = _Rewriter(cfg.get('default_scope'))
    cfg.model = rewriter.visit(cfg.model, cfg.get('default_scope'))
    _rewrite_custom_imports(cfg, rewriter.needs_mmpretrain)
    _drop_orepa_hooks(cfg)
    if cfg.get('load_from') is not None:
        cfg.load_from = None
    return cfg
