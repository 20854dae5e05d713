"""OREPA-VGG: mmpretrain's RepVGG whose dense 3 x 3 branch is a five-branch OREPA block.

RepVGG keeps its own 1 x 1 conv+BN and identity-BN branches, so the OREPA block drops its 1x1
branch (``OREPA_VGG_BRANCHES``) and the 1 x 1 branch stays a plain conv: that is exactly the
``OREPAVGGConv`` conv type, and OREPAVGG is RepVGG built with it. Deploying first bakes the
OREPA kernels, then runs RepVGG's own branch fusion, so the result is mmpretrain's
``RepVGG(deploy=True)`` key for key.
"""
from mmpretrain.models.backbones.repvgg import RepVGG, RepVGGBlock

from ...deploy import reparameterize_model


class OREPAVGG(RepVGG):
    """RepVGG (A0-A2, B0-B3, grouped variants, custom arch dicts) with OREPA dense branches.

    Takes mmpretrain ``RepVGG``'s arguments; ``conv_cfg`` defaults to ``dict(type='OREPAVGGConv')``.
    With ``deploy=True`` it builds the deployed (stock) structure directly.
    """

    def __init__(self, arch, *args, conv_cfg=dict(type='OREPAVGGConv'), deploy=False, **kwargs):
        super().__init__(arch, *args, conv_cfg=None if deploy else conv_cfg, deploy=deploy,
                         **kwargs)

    def switch_to_deploy(self):
        """Bake OREPA kernels, then fuse RepVGG's branches (idempotent); mmdeploy calls this."""
        reparameterize_model(self)
        for module in self.modules():
            if isinstance(module, RepVGGBlock):
                module.conv_cfg = None  # the fused conv must be a stock conv
        super().switch_to_deploy()
