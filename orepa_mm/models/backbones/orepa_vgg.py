"""OREPA-VGG: mmpretrain's RepVGG whose dense 3 x 3 branch is a five-branch OREPA block.

RepVGG keeps its own 1 x 1 conv+BN and identity-BN branches, so the OREPA block drops its 1x1
branch (``OREPA_VGG_BRANCHES``) and the 1 x 1 branch stays a plain conv: that is exactly the
``OREPAVGGConv`` conv type, and OREPAVGG is RepVGG built with it. Deploying first bakes the
OREPA kernels, then runs RepVGG's own branch fusion, so the result is mmpretrain's
``RepVGG(deploy=True)`` key for key.
"""
import functools

from mmpretrain.models.backbones.repvgg import RepVGG, RepVGGBlock

from ...deploy import check_structural_block, reparameterize_model
from ...registry import CONV_TYPES


def make_repvgg_blocks_deploy_to_stock_convs() -> None:
    """Make mmpretrain's own ``RepVGGBlock.switch_to_deploy`` give a stock deployed block.

    A ``RepVGG(conv_cfg=dict(type='OREPA'))`` block fuses its branches into a conv it builds
    with its ``conv_cfg``, i.e. into another OREPA layer: outputs agree, but the model is not
    the stock ``RepVGG(deploy=True)`` and mmdeploy (which calls ``backbone.switch_to_deploy()``)
    would export kernel generation. So, once, at ``import orepa_mm``, the method is wrapped to
    bake the re-param layers it leaves (:func:`reparameterize_model`; a no-op on stock blocks).
    This is the one place orepa_mm adapts a method of another library.
    """
    original = RepVGGBlock.switch_to_deploy
    if getattr(original, 'bakes_reparam_layers', False):
        return

    @functools.wraps(original)
    def switch_to_deploy(self):
        check_structural_block(self)
        conv_type = (self.conv_cfg or {}).get('type', '')
        if isinstance(conv_type, str) and conv_type.rpartition('.')[2] in CONV_TYPES:
            # The fused conv is built with conv_cfg in the default dtype and then takes the
            # fused kernel through ``weight.data =``: a stock conv takes it exactly (any dtype).
            self.conv_cfg = None
        original(self)
        reparameterize_model(self)

    switch_to_deploy.bakes_reparam_layers = True
    RepVGGBlock.switch_to_deploy = switch_to_deploy


class OREPAVGG(RepVGG):
    """RepVGG (A0-A2, B0-B3, grouped variants, custom arch dicts) with OREPA dense branches.

    Takes mmpretrain ``RepVGG``'s arguments; ``conv_cfg`` defaults to ``dict(type='OREPAVGGConv')``.
    With ``deploy=True`` it builds the deployed (stock) structure directly.
    """

    def __init__(self, arch, *args, conv_cfg=dict(type='OREPAVGGConv'), deploy=False, **kwargs):
        super().__init__(
            arch, *args, conv_cfg=None if deploy else conv_cfg, deploy=deploy, **kwargs)

    def switch_to_deploy(self):
        """Bake OREPA kernels, then fuse RepVGG's branches (idempotent); mmdeploy calls this."""
        reparameterize_model(self)
        for module in self.modules():
            if isinstance(module, RepVGGBlock):
                module.conv_cfg = None  # the fused conv must be a stock conv
        super().switch_to_deploy()
